"""Low-rank fitting under Adam and AdamW for GeoLoRA's step rules, beside LoRA r = 8.

    python benchmarks/rank_recovery_rules.py [--problems fine_tuning]

The problems, bounds and LoRA reference of ``tests/test_rank_recovery_adam.py`` (64×48 rank 5 and 80×40 rank 4,
singular values up to 5, or with ``--problems fine_tuning`` the same shapes at a tenth of them; 1,000 steps,
r0 ∈ {1, 16}, lr ∈ {3e-3, 1e-2, 3e-2}, tau 0.05, max_rank 16), for each step rule: the final
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


# the product's two step rules; the research variants that 0.2.0 removed keep their records in the JSON files (their
# code: commit eb087f3). The default's name is the one its records carry.
VARIANTS = {
    "optimizer_mean_growth0.1_auto_rel1": {},
    "coefficient": {"step_rule": "coefficient", "growth_tol": 0.2, "scaling": 1.0},
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
