"""The lean issue's trade-off: training memory against test score, for the default and its smaller storages.

    python benchmarks/lean_tradeoff.py

Joins two committed measurements, nothing new is run: the training memory of each configuration relative to LoRA r=8
on the same layers (``benchmarks/results/step_cost.json``, tensor by tensor, side by side in one process) and the
suite's test runs of the same settings (``benchmarks/results/suite/test/``, ``suite.py --phase lean``: seeds 0-2, the
suite's GeoLoRA lr), with AdaLoRA's and LoRA's test runs beside them. The rows measured before 0.3.0's storage read
``step_cost_0.2.json`` and their runs ``benchmarks/results/suite_0.2/test/`` (0.2.0's default's stay in ``suite/test/``). Writes
``benchmarks/results/lean_tradeoff.json`` and the table between the markers in ``docs/research.md``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "research.md"
BEGIN, END = "<!-- lean trade-off: begin (benchmarks/lean_tradeoff.py) -->", "<!-- lean trade-off: end -->"
BASE = "optimizer_mean_growth0.1_tau0.5_auto_rel1"
NOW = ("suite", "step_cost.json")  # the package as it is: storage max_rank, the bases recovered from Adam's state
# before the lean change (0.2.x): storage 2 * max_rank (max_rank with cycle 0), the bases copied; those runs moved to
# suite_0.2/ when 0.3.0's runs of the same settings took their place in suite/test/. 0.2.0's default (max_rank 16)
# keeps its runs in suite/test/ (it is one of the suite's test variants).
BEFORE = ("suite_0.2", "step_cost_0.2.json")
BEFORE_IN_SUITE = ("suite", "step_cost_0.2.json")


@dataclass(frozen=True)
class Row:
    """One configuration: its suite test runs (results folder, method, variant) and its step-cost entry."""

    label: str
    method: str
    variant: str
    cost_name: str
    source: tuple[str, str] = NOW  # (suite results folder, step-cost file) under benchmarks/results


ROWS = (
    Row("max_rank 8, storage 8 (0.3.0's default)", "geolora", f"{BASE}_max8", "geolora_adaptive"),
    Row("max_rank 7, storage 7 (0.3.0)", "geolora", f"{BASE}_max7", "geolora_max7_adaptive"),
    Row("max_rank 6, storage 6 (0.3.0)", "geolora", f"{BASE}_max6", "geolora_max6_adaptive"),
    Row("max_rank 4, storage 4 (0.3.0)", "geolora", f"{BASE}_max4", "geolora_max4_adaptive"),
    Row("max_rank 16, storage 32 (0.2.0's default)", "geolora", BASE, "geolora_adaptive", BEFORE_IN_SUITE),
    Row("max_rank 8, storage 16 (0.2.x)", "geolora", f"{BASE}_max8", "geolora_max8_adaptive", BEFORE),
    Row("max_rank 6, storage 12 (0.2.x)", "geolora", f"{BASE}_max6", "geolora_max6_adaptive", BEFORE),
    Row("max_rank 4, storage 8 (0.2.x)", "geolora", f"{BASE}_max4", "geolora_max4_adaptive", BEFORE),
    Row("max_rank 16, cycle 0 (0.2.x)", "geolora", f"{BASE}_c0", "geolora_cycle0_adaptive", BEFORE),
    Row("max_rank 8, cycle 0 (0.2.x)", "geolora", f"{BASE}_c0_max8", "geolora_cycle0_max8_adaptive", BEFORE),
    Row("AdaLoRA (init_r 12 → 8)", "adalora", "", "adalora"),
    Row("LoRA r=8", "lora", "", "lora_r8"),
)


def scores(row: Row) -> dict[str, list[float]]:
    """Task → the row's test scores (one per seed), with the adapter parameters at the end as ``params``."""
    out: dict[str, list[float]] = defaultdict(list)
    for path in sorted((RESULTS / row.source[0] / "test").glob("*.json")):
        record = json.loads(path.read_text())
        if (record["method"], record.get("variant") or "") == (row.method, row.variant):
            out[record["task"]].append(record["primary"]["test"])
            out["params"].append(record["adapter_params_end"])
    return out


def table() -> dict:
    costs = {source: json.loads((RESULTS / source).read_text()) for source in {row.source[1] for row in ROWS}}
    rows = []
    for row in ROWS:
        memory = costs[row.source[1]]["training_memory_bytes"]
        runs = scores(row)
        rows.append(
            {
                "label": row.label,
                "method": row.method,
                "variant": row.variant,
                "results": row.source[0],
                "step_cost": row.source[1],
                "memory_over_lora_r8": memory[row.cost_name]["total"] / memory["lora_r8"]["total"]
                if row.cost_name in memory
                else None,
                "tasks": {t: {"mean": statistics.mean(v), "seeds": len(v)} for t, v in runs.items() if t != "params"},
                "adapter_params_end": statistics.mean(runs["params"]) if runs.get("params") else None,
            }
        )
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "step_cost": {name: cost["command"] for name, cost in costs.items()},
        "tasks": sorted({t for row in rows for t in row["tasks"]}),
        "rows": rows,
    }


def markdown(data: dict) -> str:
    tasks = data["tasks"]
    lines = [
        "| configuration | training memory / LoRA r=8 | " + " | ".join(tasks) + " | average | adapter params (mean) |",
        "|---" * (4 + len(tasks)) + "|",
    ]
    for row in data["rows"]:
        mem = f"{row['memory_over_lora_r8']:.2f}×" if row["memory_over_lora_r8"] is not None else "not measured"
        cells = []
        for task in tasks:
            cell = row["tasks"].get(task)
            cells.append(f"{cell['mean']:.4f} ({cell['seeds']})" if cell else "")
        params = f"{row['adapter_params_end']:,.0f}" if row["adapter_params_end"] else ""
        complete = len(row["tasks"]) == len(tasks) and all(c["seeds"] == 3 for c in row["tasks"].values())
        average = f"{statistics.mean(c['mean'] for c in row['tasks'].values()):.4f}" if complete else ""
        lines.append(f"| {row['label']} | {mem} | " + " | ".join(cells) + f" | {average} | {params} |")
    return "\n".join(lines)


def main() -> dict:
    data = table()
    (RESULTS / "lean_tradeoff.json").write_text(json.dumps(data, indent=2))
    text = DOC.read_text()
    block = f"{BEGIN}\n{markdown(data)}\n{END}"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += (
            "\n## Lean: training memory against score\n\n"
            "Test scores (mean over seeds, count in brackets; the average once every task has three) of the default at smaller storage, beside the training "
            "memory of the same settings relative to LoRA r=8 (`benchmarks/step_cost.py`, tensor by tensor):\n\n"
            f"{block}\n"
        )
    DOC.write_text(text)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
