"""How S's relative step should grow with the adapter: bounded growth against the rank-recovery targets.

    python benchmarks/relative_step_bound.py            # → benchmarks/results/relative_step_bound.json
    python benchmarks/relative_step_bound.py --smoke    # CI: each gain on one case of each instrument

The default step scales the optimizer's adaptive step of ``S`` by a gain ``g(x)`` of the adapter's size relative to
ρ = 1, ``x = ‖s S‖_F / ρ`` (:func:`peft_geolora.integrator.relative_step`). With ``g(x) = x`` (0.2.0) the step is
scale-free: under Adam's noise the norm performs a multiplicative random walk, which grows geometrically whatever the
weight decay (both scale with ``‖S‖``). The gains compared:

* ``linear``: ``max(1, x)`` (0.2.0 as first released);
* ``sqrt``: ``max(1, √x)``: LoRA's own feedback (``d(BA) = dB A + B dA`` with balanced factors of norm ``√‖ΔW‖``
  moves ``ΔW`` by about ``λ √‖ΔW‖``), so AdamW's decay (``∝ ‖S‖``) bounds the norm again;
* ``cap10``: ``clamp(x, 1, 10)``: relative up to ``‖ΔW‖_F = 10``, absolute above (chosen: the product's
  ``RELATIVE_STEP_UP_TO``);
* ``off``: 1 (the absolute step).

Instruments, each on the same code path as the product (the gain patched into ``integrator.relative_step``):

* the rank-recovery problems of ``tests/test_rank_recovery_adam.py`` (24 cases, singular values up to 5, and the
  same 24 at fine-tuning scale): cases met;
* the divergence case of the trust issue: a tiny Llama, every linear layer, AdamW, a scale of 16 (``lora_alpha=16`` as
  0.2.0 first read it; ``scaling=16`` now) at lr 2e-2 and
  2e-3, and the defaults at 2e-2, 60 steps: the largest ``‖ΔW‖_F``;
* the soak of ``benchmarks/soak.py`` (fp32, 3,000 steps): ``‖ΔW‖_F`` growth after the loss plateaus.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peft_geolora import integrator


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from tests.test_rank_recovery_adam import (  # noqa: E402
    FINE_TUNING_PROBLEMS,
    PROBLEMS,
    lora_error,
    low_rank_target,
    run_geolora,
)
from tests.test_reliability import _llama_run  # noqa: E402

import soak  # noqa: E402


GAINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: torch.clamp(x, min=1.0),
    "sqrt": lambda x: torch.clamp(x, min=1.0).sqrt(),
    "cap10": lambda x: torch.clamp(x, min=1.0, max=10.0),
    "off": lambda x: torch.ones_like(x),
}


def patched_relative_step(gain: Callable[[torch.Tensor], torch.Tensor]):
    def relative_step(S0, S1, scale, rho, kept_after_decay=1.0, rho_max=None):  # rho_max: the gain says it
        x = torch.linalg.matrix_norm(S0, keepdim=True) * (scale / rho)
        return torch.lerp(S0 * kept_after_decay, S1, gain(x).to(S1.dtype))

    return relative_step


def rank_recovery(problems: dict, smoke: bool) -> dict[str, Any]:
    cases, met, worst = 0, 0, 0.0
    grid = [
        (p, o, lr, r0)
        for p in sorted(problems)
        for o in ("adam", "adamw")
        for lr in (3e-3, 1e-2, 3e-2)
        for r0 in (1, 16)
    ]
    for problem, optimizer_name, lr, r0 in grid[:1] if smoke else grid:
        m, n, sigma = problems[problem]
        A = low_rank_target(m, n, sigma)
        allowed = max(2e-2, lora_error(problem, optimizer_name, lr) + 1e-2)
        layer, error, _ = run_geolora(A, r0, optimizer_name, lr, steps=20 if smoke else 1000, step_rule="optimizer")
        cases += 1
        met += layer.rank["default"] == len(sigma) and error <= allowed
        worst = max(worst, error)
    return {"cases": cases, "met": met, "largest_error": worst}


def divergence(lr: float, steps: int, **config: Any) -> float:
    """The largest ``‖ΔW‖_F`` after ``steps`` on a tiny Llama, every linear layer, AdamW at ``lr`` (the runaway
    tests' run, ``tests/test_reliability.py``)."""
    return _llama_run(steps, lr, **config)[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gains", nargs="+", default=list(GAINS), choices=list(GAINS))
    parser.add_argument("--soak_steps", type=int, default=3000)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "relative_step_bound.json"))
    args = parser.parse_args(argv)
    original = integrator.relative_step
    rows = []
    try:
        for name in args.gains:
            integrator.relative_step = patched_relative_step(GAINS[name])
            t0 = time.perf_counter()
            steps = 3 if args.smoke else 60
            row = {
                "gain": name,
                "rank_recovery": rank_recovery(PROBLEMS, args.smoke),
                "rank_recovery_fine_tuning_scale": rank_recovery(FINE_TUNING_PROBLEMS, args.smoke),
                "divergence_alpha16_lr2e-2": divergence(2e-2, steps, scaling=16.0),
                "divergence_alpha16_lr2e-3": divergence(2e-3, steps, scaling=16.0),
                "defaults_lr2e-2": divergence(2e-2, steps),
                "soak_fp32": soak.soak(50 if args.smoke else args.soak_steps, "fp32")["summary"],
            }
            row["wall_s"] = time.perf_counter() - t0
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        integrator.relative_step = original
    data = {"command": " ".join([sys.executable, *sys.argv]), "torch_threads": torch.get_num_threads(), "rows": rows}
    if not args.smoke:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    main()
