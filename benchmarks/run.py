"""Side-by-side benchmarks of GeoLoRA, LoRA and AdaLoRA on the offline task (MiniLM-L6, Rotten-Tomatoes snippets).

    python benchmarks/run.py --study lr               # 4: learning-rate robustness (run first: it picks each method's lr)
    python benchmarks/run.py --study quality          # 1: accuracy and adapter size, 3 seeds, each method at its best lr
    python benchmarks/run.py --study init_rank        # 5: initial-rank invariance (300 steps)
    python benchmarks/run.py --study init_rank_long   # 5b: r0 = 1, 8, 32 over two epochs (1070 steps)
    python benchmarks/run.py --study init_rank_budget # 5c: initial ranks under a global parameter budget
    python benchmarks/run.py --study schedule         # 6: every-step schedule vs cycle
    python benchmarks/run.py --study all --smoke      # CI: every training study with a few steps

Every training run is ``scripts/glue/run_glue.py`` in its own process (same data order, steps, seeds and
evaluation for every method; adapters on every Linear inside the encoder, the pooler excluded), so its peak memory
(max RSS) is its own; ``--smoke`` runs a one-layer model for a few steps in this process (seconds per run). Each study writes ``benchmarks/results/<study>.json`` (the command, versions, machine, every
figure) and a PNG. Step cost and allocation overhead have their own scripts (``step_cost.py``,
``alloc_overhead.py``), which time the methods side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "glue" / "rt_polarity.yaml"
METHODS = ("geolora", "lora", "adalora")
LRS = (1e-4, 5e-4, 2e-3, 5e-3, 2e-2)
DEFAULT_LR = {"geolora": 5e-3, "lora": 5e-4, "adalora": 2e-3}
LONG_STEPS = 1070  # two epochs of the offline task's 8,566 training snippets at batch 16
BUDGET = 150_000  # the budgeted initial-rank study's parameter budget (about 45 % of LoRA r=8's 331,776)


SMOKE = ["max_steps=4", "max_train_samples=64", "validation_size=200", "num_hidden_layers=1", "batch_size=8"]


def run(method: str, overrides: list[str], smoke: bool) -> dict[str, Any]:
    """One training run (its own process; a smoke run in this one); its results.json."""
    if smoke:
        overrides = [*overrides, *SMOKE]
    import suite  # its run_glue: one process per run, smoke runs in this one

    results, _ = suite.run_glue(["--config", str(CONFIG), "--method", method, "--set", *overrides], smoke)
    accuracy = results["metrics"]["validation"]["accuracy"]
    summary = {
        "method": method,
        "overrides": overrides,
        "accuracy": accuracy,
        "final_train_loss": results["final_train_loss"],
        "adapter_params_start": results["trainable_adapter_params_start"],
        "adapter_params_end": results["trainable_adapter_params_end"],
        "head_params": results["head_params"],
        "median_step_s": results["median_step_s"],
        "wall_s": results["wall_s"],
        "cpu_over_wall": results["cpu_over_wall"],
        "max_rss_mb": results["max_rss_mb"],
        "ranks": results["ranks"],
        "total_rank_by_step": total_rank_by_step(results),
        "diverged": results["final_train_loss"] is None or not math.isfinite(results["final_train_loss"]),
    }
    summary["collapsed"] = accuracy < 0.55  # chance level on this balanced binary task is about 0.5
    print(json.dumps({k: v for k, v in summary.items() if k != "ranks"}), flush=True)
    return summary


def total_rank_by_step(results: dict[str, Any]) -> Optional[list[list[int]]]:
    """GeoLoRA: [step, Σ kept ranks] after every rank change (from the per-layer rank history), else None."""
    history = results.get("rank_history")
    if not history:
        return None
    current = dict(results["initial_ranks"])
    events = sorted((step, name, rank) for name, changes in history.items() for step, rank in changes)
    trajectory = [[0, sum(current.values())]]
    for step, name, rank in events:
        current[name] = rank
        if trajectory[-1][0] == step:
            trajectory[-1][1] = sum(current.values())
        else:
            trajectory.append([step, sum(current.values())])
    return trajectory


def best_lrs() -> dict[str, float]:
    """Each method's best learning rate from the lr study, or the defaults when it has not run."""
    path = RESULTS / "lr.json"
    if not path.is_file():
        return dict(DEFAULT_LR)
    return json.loads(path.read_text())["best_lr"]


def study_lr(smoke: bool) -> dict[str, Any]:
    runs = [run(m, [f"lr={lr}", "max_steps=150"], smoke) | {"lr": lr} for m in METHODS for lr in LRS]
    best = {m: max((r for r in runs if r["method"] == m), key=lambda r: r["accuracy"])["lr"] for m in METHODS}
    return {"runs": runs, "best_lr": best, "steps": 150}


def study_quality(smoke: bool) -> dict[str, Any]:
    lrs = best_lrs()
    runs = [run(m, [f"lr={lrs[m]}", f"seed={seed}"], smoke) | {"seed": seed} for m in METHODS for seed in (0, 1, 2)]
    table = {}
    for m in METHODS:
        mine = [r for r in runs if r["method"] == m]
        accuracies = [r["accuracy"] for r in mine]
        table[m] = {
            "lr": lrs[m],
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "adapter_params_end_mean": statistics.mean(r["adapter_params_end"] for r in mine),
            "max_rss_mb_max": max(r["max_rss_mb"] for r in mine),
        }
    lora = table["lora"]["adapter_params_end_mean"]
    for m in METHODS:
        table[m]["params_vs_lora_r8"] = table[m]["adapter_params_end_mean"] / lora
    return {"runs": runs, "table": table}


def study_init_rank(
    smoke: bool, steps: int = 300, r0s: tuple[int, ...] = (1, 2, 4, 8, 16, 32), extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    lr = best_lrs()["geolora"]
    runs = [
        run("geolora", [f"lr={lr}", f"geolora.r={r}", "geolora.max_rank=32", f"max_steps={steps}", *extra], smoke)
        | {"r0": r}
        for r in r0s
    ]
    params = [r["adapter_params_end"] for r in runs]
    return {
        "runs": runs,
        "steps": steps,
        "params_spread_vs_mean": (max(params) - min(params)) / statistics.mean(params),
        "params_max_over_min": max(params) / min(params),
    }


def study_init_rank_long(smoke: bool) -> dict[str, Any]:
    """Study 5 over two epochs, for the smallest, default and largest initial rank."""
    return study_init_rank(smoke, steps=LONG_STEPS, r0s=(1, 8, 32))


def study_init_rank_budget(smoke: bool) -> dict[str, Any]:
    """Study 5 with a global parameter budget (``BUDGET`` parameters, ``budget_unit=params``) instead of the tau rule."""
    return study_init_rank(smoke, extra=(f"geolora.budget={BUDGET}", "geolora.budget_unit=params")) | {
        "budget": BUDGET
    }


CYCLE = {"step": 0, "cycle": 3}  # the schedules' cycle_length: the paper's every-step one and the default


def study_schedule(smoke: bool) -> dict[str, Any]:
    lr = best_lrs()["geolora"]
    runs = [
        run("geolora", [f"lr={lr}", f"seed={seed}", f"geolora.cycle_length={CYCLE[schedule]}"], smoke)
        | {"schedule": schedule}
        for schedule in ("step", "cycle")
        for seed in (0, 1)
    ]
    return {"runs": runs}


STUDIES = {
    "lr": study_lr,
    "quality": study_quality,
    "init_rank": study_init_rank,
    "init_rank_long": study_init_rank_long,
    "init_rank_budget": study_init_rank_budget,
    "schedule": study_schedule,
}


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def plot(study: str, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    runs = data["runs"]
    if study == "lr":
        for m in METHODS:
            mine = [r for r in runs if r["method"] == m]
            ax.plot([r["lr"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation accuracy")
    elif study == "quality":
        for m in METHODS:
            mine = [r for r in runs if r["method"] == m]
            ax.scatter([r["adapter_params_end"] for r in mine], [r["accuracy"] for r in mine], label=m)
        ax.set_xlabel("adapter parameters at the end")
        ax.set_ylabel("validation accuracy")
    elif study in ("init_rank", "init_rank_budget"):
        ax.plot([r["r0"] for r in runs], [r["adapter_params_end"] for r in runs], marker="o", label="params at end")
        ax.plot(
            [r["r0"] for r in runs], [r["adapter_params_start"] for r in runs], marker="x", label="params at start"
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("initial rank")
        ax.set_ylabel("adapter parameters")
    elif study == "init_rank_long":
        for r in runs:
            trajectory = r["total_rank_by_step"] + [[data["steps"], r["total_rank_by_step"][-1][1]]]
            ax.step([t for t, _ in trajectory], [k for _, k in trajectory], where="post", label=f"r0 = {r['r0']}")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("total kept rank (36 layers)")
    else:
        for schedule in ("step", "cycle"):
            mine = [r for r in runs if r["schedule"] == schedule]
            ax.scatter([r["adapter_params_end"] for r in mine], [r["accuracy"] for r in mine], label=schedule)
        ax.set_xlabel("adapter parameters at the end")
        ax.set_ylabel("validation accuracy")
    ax.set_title(f"{study} (MiniLM-L6, rt_polarity)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", choices=[*STUDIES, "all"], required=True)
    parser.add_argument("--smoke", action="store_true", help="a few steps each, written to a temporary folder")
    parser.add_argument("--results_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    for study in STUDIES if args.study == "all" else [args.study]:
        data = STUDIES[study](args.smoke)
        data = {"study": study, "command": " ".join([sys.executable, *sys.argv]), "smoke": args.smoke,
                "machine": machine(), **data}  # fmt: skip
        (out / f"{study}.json").write_text(json.dumps(data, indent=2))
        plot(study, data, out / f"{study}.png")


if __name__ == "__main__":
    main()
