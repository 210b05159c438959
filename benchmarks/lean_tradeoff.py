"""The lean issue's trade-off: training memory against test score, for the default and its smaller storages.

    python benchmarks/lean_tradeoff.py

Joins two committed measurements, nothing new is run: the training memory of each configuration relative to LoRA r=8
on the same layers (``benchmarks/results/step_cost.json``, tensor by tensor, side by side in one process) and the
suite's test runs of the same settings (``benchmarks/results/suite/test/``, ``suite.py --phase lean``: seeds 0-2, the
suite's GeoLoRA lr), with AdaLoRA's and LoRA's test runs beside them. Writes
``benchmarks/results/lean_tradeoff.json`` and the table between the markers in ``docs/research.md``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "research.md"
BEGIN, END = "<!-- lean trade-off: begin (benchmarks/lean_tradeoff.py) -->", "<!-- lean trade-off: end -->"
BASE = "optimizer_mean_growth0.1_tau0.5_auto_rel1"
# (suite test method, variant) → step_cost.json configuration (same settings: r 8 unless max_rank is smaller)
ROWS = {
    ("geolora", BASE): ("geolora_adaptive", "max_rank 16, cycle 3 (0.2.0's default)"),
    ("geolora", f"{BASE}_max8"): ("geolora_max8_adaptive", "max_rank 8, cycle 3"),
    ("geolora", f"{BASE}_max6"): ("geolora_max6_adaptive", "max_rank 6, cycle 3"),
    ("geolora", f"{BASE}_max4"): ("geolora_max4_adaptive", "max_rank 4, cycle 3"),
    ("geolora", f"{BASE}_c0"): ("geolora_cycle0_adaptive", "max_rank 16, cycle 0"),
    ("geolora", f"{BASE}_c0_max8"): ("geolora_cycle0_max8_adaptive", "max_rank 8, cycle 0"),
    ("adalora", ""): ("adalora", "AdaLoRA (init_r 12 → 8)"),
    ("lora", ""): ("lora_r8", "LoRA r=8"),
}


def scores() -> dict[tuple[str, str], dict[str, list[float]]]:
    """(method, variant) → task → test scores (one per seed), with the adapter parameters at the end as ``params``."""
    out: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((RESULTS / "suite" / "test").glob("*.json")):
        record = json.loads(path.read_text())
        key = (record["method"], record.get("variant") or "")
        if key in ROWS:
            out[key][record["task"]].append(record["primary"]["test"])
            out[key]["params"].append(record["adapter_params_end"])
    return out


def table() -> dict:
    cost = json.loads((RESULTS / "step_cost.json").read_text())
    memory = cost["training_memory_bytes"]
    by_key = scores()
    tasks = sorted({t for rows in by_key.values() for t in rows if t != "params"})
    rows = []
    for key, (name, label) in ROWS.items():
        runs = by_key.get(key, {})
        row = {
            "label": label,
            "method": key[0],
            "variant": key[1],
            "memory_over_lora_r8": memory[name]["total"] / memory["lora_r8"]["total"] if name in memory else None,
            "tasks": {t: {"mean": statistics.mean(v), "seeds": len(v)} for t, v in runs.items() if t != "params"},
            "adapter_params_end": statistics.mean(runs["params"]) if runs.get("params") else None,
        }
        rows.append(row)
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "step_cost": cost["command"],
        "tasks": tasks,
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
