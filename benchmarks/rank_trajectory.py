"""How the adapter's size evolves from different initial ranks: the total kept rank over training.

    python benchmarks/rank_trajectory.py                       # trec6, default settings, r0 = 1, 8, 32
    python benchmarks/rank_trajectory.py --task rt_polarity --r0 1 32
    python benchmarks/rank_trajectory.py --variant optimizer_mean_growth_aug   # an ablation variant at its own lr

The suite's initial-rank phase (``benchmarks/suite.py --phase init_rank``: MiniLM-L6, 300 steps, the suite's lr for
GeoLoRA, ``max_rank`` 32) records only the final size. This runs the same training for each r0 and records the
total kept rank Σ r over the 36 adapters after every step (from the allocator's rank history), so one can tell
whether the sizes from different r0 converge slowly (they would meet with more steps) or settle at different levels
(the rank rule keeps a memory of the start). Writes ``benchmarks/results/rank_trajectory_<task>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import suite
from run import machine, total_rank_by_step


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r0, run in data["runs"].items():
        trajectory = run["total_rank_by_step"] + [[data["steps"], run["total_rank_by_step"][-1][1]]]
        ax.step([t for t, _ in trajectory], [k for _, k in trajectory], where="post", label=f"r0 = {r0}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total kept rank (36 adapters)")
    ax.set_title(f"{data['task']}: {data['variant']}, lr {data['lr']:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="trec6", choices=suite.OFFLINE_TASKS)
    parser.add_argument("--r0", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--variant", default=suite.DEFAULT_VARIANT, choices=sorted(suite.RUNNABLE))
    parser.add_argument("--smoke", action="store_true", help="one-layer model, a few steps (CI)")
    parser.add_argument("--out_dir", default=str(suite.ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    suite_lr = suite.chosen_lrs(suite.RESULTS).get("geolora")
    if suite_lr is None:
        raise SystemExit("GeoLoRA's suite lr is not chosen yet: run `benchmarks/suite.py --phase lr` first.")
    lr = suite.variant_lrs([args.variant], suite_lr, suite.RESULTS)[args.variant]
    data: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine(),
        "task": args.task,
        "lr": lr,
        "variant": args.variant,
        "settings": list(suite.RUNNABLE[args.variant]),
        "runs": {},
    }
    for r0 in args.r0:
        overrides = (*suite.RUNNABLE[args.variant], f"geolora.r={r0}", "geolora.max_rank=32")
        run = suite.Run("init_rank", args.task, "geolora", lr, 0, f"{args.variant}_r{r0}", overrides)
        out, command = suite.train(run, args.smoke)
        data["steps"] = out["steps"]
        totals = total_rank_by_step(out)  # [[step, Σ r from that step on], ...]
        data["runs"][str(r0)] = {
            "command": command,
            "total_rank_by_step": totals,
            "adapter_params_end": out["trainable_adapter_params_end"],
            "validation": suite.primary_score(args.task, out["metrics"]["validation"]),
            "cpu_over_wall": out["cpu_over_wall"],
        }
        every_20 = [[t for s, t in totals if s <= step][-1] for step in range(0, out["steps"] + 1, 20)]
        print(f"r0 = {r0}: total rank every 20 steps {every_20}", flush=True)
    if not args.smoke:
        out_dir = Path(args.out_dir)
        name = f"rank_trajectory_{args.task}" + ("" if args.variant == suite.DEFAULT_VARIANT else f"_{args.variant}")
        (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2))
        plot(data, out_dir / f"{name}.png")
    return data


if __name__ == "__main__":
    main()
