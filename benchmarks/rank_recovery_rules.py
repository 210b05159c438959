"""Low-rank fitting under Adam and AdamW for every GeoLoRA step-rule variant, beside LoRA r = 8.

    python benchmarks/rank_recovery_rules.py [--problems fine_tuning]

The problems, bounds and LoRA reference of ``tests/test_rank_recovery_adam.py`` (64×48 rank 5 and 80×40 rank 4,
singular values up to 5, or with ``--problems fine_tuning`` the same shapes at a tenth of them; 1,000 steps,
r0 ∈ {1, 16}, lr ∈ {3e-3, 1e-2, 3e-2}, tau 0.05, max_rank 16), for each variant of the suite's ablation: the final
rank, the relative error and whether it meets ``max(2e-2, LoRA r=8's error + 1e-2)`` at the target's rank. Writes
``benchmarks/results/rank_recovery_rules.json`` (``rank_recovery_fine_tuning.json``), replacing the runs of the
variants it ran and keeping the others (each variant's command is recorded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_rank_recovery_adam import (  # noqa: E402
    FINE_TUNING_PROBLEMS,
    PROBLEMS,
    lora_error,
    low_rank_target,
    run_geolora,
)


# the optimizer rule as first measured (the suite's optimizer_mean_growth, the default before growth_tol 0.1); the
# optimizer-rule variants below change one of its settings
DEFAULT_RULE = {
    "step_rule": "optimizer",
    "moment_init": "mean",
    "growth_tol": 0.2,
    "lora_alpha": 1.0,
    "relative_step_above": None,
}
# the suite's step-rule variants, without the setting the toy problems fix (tau); scale 1 and S's absolute step unless
# given
VARIANTS = {
    "optimizer": {**DEFAULT_RULE, "moment_init": "zero", "growth_tol": None},
    "optimizer_mean": {**DEFAULT_RULE, "growth_tol": None},
    "optimizer_mean_growth": DEFAULT_RULE,
    "coefficient": {"step_rule": "coefficient", "growth_tol": 0.2, "lora_alpha": 1.0},
    "split": {"step_rule": "split", "moment_init": "mean", "growth_tol": 0.2, "lora_alpha": 1.0},
    "optimizer_mean_growth_balanced": {**DEFAULT_RULE, "balance_bases": True},
    "optimizer_prior_growth": {**DEFAULT_RULE, "moment_init": "prior"},
    # the default at 8 times its scale (the suite's optimizer_mean_growth_alpha8)
    "optimizer_mean_growth_alpha8": {**DEFAULT_RULE, "lora_alpha": 8.0},
    # the default with longer cycles (the suite's optimizer_mean_growth_c7 and _c15)
    "optimizer_mean_growth_c7": {**DEFAULT_RULE, "cycle_length": 7},
    "optimizer_mean_growth_c15": {**DEFAULT_RULE, "cycle_length": 15},
    # the default with the bases stepped only at each cycle's augmentation (the suite's optimizer_mean_growth_aug)
    "optimizer_mean_growth_aug": {**DEFAULT_RULE, "basis_steps": "augment"},
    # the looser growth test: the package default (the suite's optimizer_mean_growth0.1_tau0.4; tau is fixed here)
    "optimizer_mean_growth0.1": {**DEFAULT_RULE, "growth_tol": 0.1},
    # the package default since lora_alpha="auto" (the suite's optimizer_mean_growth0.1_tau0.4_auto): scale 5e-3 / lr
    "optimizer_mean_growth0.1_auto": {**DEFAULT_RULE, "growth_tol": 0.1, "lora_alpha": "auto"},
    # "auto" with S's step growing in proportion to the adapter above ||ΔW||_F = rho (relative_step_above; rho 1: the
    # package default)
    **{
        f"optimizer_mean_growth0.1_auto_rel{rho:g}": {
            **DEFAULT_RULE,
            "growth_tol": 0.1,
            "lora_alpha": "auto",
            "relative_step_above": rho,
        }
        for rho in (0.5, 1.0, 2.0)
    },
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--problems",
        choices=["issue", "fine_tuning"],
        default="issue",
        help="the method issue's problems (singular values up to 5) or the same shapes at a tenth of them",
    )
    parser.add_argument("--out", help="default: benchmarks/results/rank_recovery_{rules,fine_tuning}.json")
    args = parser.parse_args(argv)
    problems = PROBLEMS if args.problems == "issue" else FINE_TUNING_PROBLEMS
    default_name = "rank_recovery_rules.json" if args.problems == "issue" else "rank_recovery_fine_tuning.json"
    args.out = args.out or str(ROOT / "benchmarks" / "results" / default_name)
    rows = []
    for variant in args.variants:
        for problem, optimizer_name, lr, r0 in itertools.product(
            sorted(problems), ("adam", "adamw"), (3e-3, 1e-2, 3e-2), (1, 16)
        ):
            m, n, sigma = problems[problem]
            A = low_rank_target(m, n, sigma)
            t0 = time.perf_counter()
            layer, error, _ = run_geolora(A, r0, optimizer_name, lr, steps=args.steps, **VARIANTS[variant])
            lora = lora_error(problem, optimizer_name, lr)
            allowed = max(2e-2, lora + 1e-2)
            rank = layer.rank["default"]
            rows.append(
                {
                    "variant": variant,
                    "problem": problem,
                    "optimizer": optimizer_name,
                    "lr": lr,
                    "r0": r0,
                    "rank": rank,
                    "target_rank": len(sigma),
                    "relative_error": error,
                    "lora_r8_error": lora,
                    "allowed": allowed,
                    "met": rank == len(sigma) and error <= allowed,
                    "wall_s": time.perf_counter() - t0,
                }
            )
            print(f"{variant} {problem} {optimizer_name} lr {lr:g} r0 {r0}: rank {rank} error {error:.2e} "
                  f"(allowed {allowed:.2e}) {'met' if rows[-1]['met'] else 'missed'}", flush=True)  # fmt: skip
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    commands = earlier.get("commands") or {r["variant"]: earlier["command"] for r in earlier["runs"]}
    commands.update(dict.fromkeys(args.variants, " ".join([sys.executable, *sys.argv])))
    rows = [r for r in earlier["runs"] if r["variant"] not in args.variants] + rows
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    summary = {
        v: {"met": sum(r["met"] for r in rows if r["variant"] == v), "of": sum(r["variant"] == v for r in rows)}
        for v in variants
    }
    result = {"commands": commands, "torch": torch.__version__, "summary": summary, "runs": rows}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
