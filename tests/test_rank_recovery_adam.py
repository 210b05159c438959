"""Rank recovery under the optimizers users run (Adam, AdamW), through the whole stack: the default step with the
package defaults, and the coefficient rule (the rule for FSDP2) at scale 1 with the growth test it was measured with
(``growth_tol=0.2``).

Each problem fits a fixed low-rank target ``A`` by minimising ``½ ‖W − A‖²_F`` (``W`` is the adapter of a zero base
layer) for at most 1,000 steps. GeoLoRA must end at the target's rank with a relative error within
``max(2e-2, LoRA r=8's error + 1e-2)``, LoRA r = 8 running under the same optimizer, learning rate and steps.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_geolora import GeoLoraConfig, RankAllocator

from .helpers import Dense, adapter_matrix, geolora_dense


STEPS = 1000
PROBLEMS = {  # (m, n, singular values): the package's rank-5 problem and a taller rank-4 one
    "64x48_rank5": (64, 48, (5.0, 4.0, 3.0, 2.0, 1.0)),
    "80x40_rank4": (80, 40, (4.0, 3.0, 2.0, 1.0)),
}
# the same shapes with a tenth of the singular values: the size fine-tuning gives an adapter (on the suite's tasks
# the kept singular values of s · S end between 0.1 and 0.7)
FINE_TUNING_PROBLEMS = {
    "64x48_rank5_small": (64, 48, (0.5, 0.4, 0.3, 0.2, 0.1)),
    "80x40_rank4_small": (80, 40, (0.4, 0.3, 0.2, 0.1)),
}
ALL_PROBLEMS = {**PROBLEMS, **FINE_TUNING_PROBLEMS}


def low_rank_target(m: int, n: int, sigma: tuple[float, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))[0]
    return P @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ Q.T


def fit_loss(model: torch.nn.Module, A: torch.Tensor) -> torch.Tensor:
    """½ ‖W − A‖²_F through the forward: with x = I the layer outputs Wᵀ."""
    return 0.5 * (model(torch.eye(A.shape[1], dtype=A.dtype)) - A.T).square().sum()


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def relative_error(W: torch.Tensor, A: torch.Tensor) -> float:
    error = (torch.linalg.norm(W - A) / torch.linalg.norm(A)).item()
    return error if math.isfinite(error) else float("inf")


def run_geolora(target, r0: int, optimizer_name: str, lr: float, steps: int = STEPS, **config):
    """GeoLoRA on a zero base layer fitting ``target``: tau 0.05, max_rank 16, the default scale, the coefficient
    rule unless ``config`` names another; returns the layer too. No case may trip the runaway watch (a target of
    norm up to 7.4 is a large adapter, not a diverging one)."""
    config.setdefault("step_rule", "coefficient")
    A = target(0) if callable(target) else target
    torch.manual_seed(r0)
    config.setdefault("lora_alpha", GeoLoraConfig().lora_alpha)  # the default scale, whatever r0
    model, layer = geolora_dense(A.shape[0], A.shape[1], torch.float64, r=r0, max_rank=16, tau=0.05, **config)
    optimizer = make_optimizer(optimizer_name, [p for p in model.parameters() if p.requires_grad], lr)
    allocator = RankAllocator(model, optimizer)
    ranks = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            A = target(step) if callable(target) else target
            fit_loss(model, A).backward()
            optimizer.step()
            allocator.step()
            optimizer.zero_grad()
            kept = ranks[-1] if ranks else r0
            ranks.append(kept if allocator.is_augmented() else layer.rank["default"])  # the kept rank, not a cycle's
        allocator.finish()
    assert not [w for w in caught if "running away" in str(w.message)]
    return layer, relative_error(adapter_matrix(layer), A), ranks  # ranks: kept rank after every step


@functools.cache
def lora_error(problem: str, optimizer_name: str, lr: float) -> float:
    """LoRA r = 8 (PEFT's defaults) under the same optimizer, learning rate and steps."""
    A = low_rank_target(*ALL_PROBLEMS[problem])
    torch.manual_seed(0)
    model = get_peft_model(Dense(A.shape[1], A.shape[0], torch.float64), LoraConfig(target_modules=["lin"], r=8))
    optimizer = make_optimizer(optimizer_name, [p for p in model.parameters() if p.requires_grad], lr)
    for _ in range(STEPS):
        fit_loss(model, A).backward()
        optimizer.step()
        optimizer.zero_grad()
    return relative_error(model.base_model.model.lin.get_delta_weight("default").detach(), A)


# The default step with the package's defaults on the whole grid, and the coefficient rule (the rule for FSDP2) at scale
# 1 at lr 1e-2; `python benchmarks/rank_recovery_rules.py` runs both rules on the whole grid (the coefficient rule meets
# 20 of 24: from rank 1 at lr 3e-3 it needs more than 1,000 steps to reach singular values up to 5). Without the
# relative step of S the default step would miss every case here (0 of 24, docs/research.md, hypothesis 8).
RULES = {
    "optimizer": {"step_rule": "optimizer"},
    "coefficient": {"step_rule": "coefficient", "growth_tol": 0.2, "scaling": 1.0},
}


def _runs(rule: str, lr: float, r0: int) -> bool:
    return rule == "optimizer" or lr == 1e-2


CASES = [
    pytest.param(
        rule,
        problem,
        optimizer_name,
        lr,
        r0,
        id=f"{rule}-{problem}-{optimizer_name}-lr{lr:g}-r0={r0}",
    )
    for rule in RULES
    for problem in sorted(PROBLEMS)
    for optimizer_name in ("adam", "adamw")
    for lr in (3e-3, 1e-2, 3e-2)
    for r0 in (1, 16)
    if _runs(rule, lr, r0)
]


@pytest.mark.parametrize("rule, problem, optimizer_name, lr, r0", CASES)
def test_rank_recovery_under_adam(rule: str, problem: str, optimizer_name: str, lr: float, r0: int) -> None:
    m, n, sigma = PROBLEMS[problem]
    A = low_rank_target(m, n, sigma)
    allowed = max(2e-2, lora_error(problem, optimizer_name, lr) + 1e-2)
    layer, error, _ = run_geolora(A, r0, optimizer_name, lr, **RULES[rule])
    print(f"{rule} {problem} {optimizer_name} lr {lr:g} r0 {r0}: rank {layer.rank['default']} error {error:.2e} "
          f"(allowed {allowed:.2e})")  # fmt: skip
    assert layer.rank["default"] == len(sigma)
    assert error <= allowed


@pytest.mark.parametrize("r0", [1, 16])
@pytest.mark.parametrize("lr", [3e-3, 1e-2, 3e-2])
@pytest.mark.parametrize("optimizer_name", ["adam", "adamw"])
@pytest.mark.parametrize("problem", sorted(FINE_TUNING_PROBLEMS))
def test_rank_recovery_at_fine_tuning_scale_with_the_defaults(problem: str, optimizer_name: str, lr: float, r0: int):
    """Singular values of the size fine-tuning reaches: the defaults meet every case (at scale 1, 14 of 24: at lr
    3e-2, and at 1e-2 from r0 = 16 on the 80x40 problem, its steps are too large for errors within the bound;
    benchmarks/results/rank_recovery_fine_tuning.json)."""
    m, n, sigma = FINE_TUNING_PROBLEMS[problem]
    A = low_rank_target(m, n, sigma)
    allowed = max(2e-2, lora_error(problem, optimizer_name, lr) + 1e-2)
    layer, error, _ = run_geolora(A, r0, optimizer_name, lr, step_rule="optimizer")
    assert layer.rank["default"] == len(sigma)
    assert error <= allowed


@pytest.mark.parametrize(
    "rule, lr, within",
    # measured: the package defaults follow in 11 steps up, 39 down (at lr 3e-3 too); the coefficient rule 7 up, 51
    # down (the research log lists the variants the package no longer has)
    [("coefficient", 1e-2, 100), ("optimizer", 3e-3, 100), ("optimizer", 3e-2, 100)],
)
@pytest.mark.parametrize("direction", ["rises", "falls"])
def test_rank_follows_a_target_whose_rank_changes_mid_training(
    direction: str, rule: str, lr: float, within: int
) -> None:
    """Rank 3 then 6 (three more directions), or 6 then 3: the kept rank follows within 100 steps of the switch."""
    small = low_rank_target(64, 48, (5.0, 4.0, 3.0), seed=1)
    extra = low_rank_target(64, 48, (2.5, 2.0, 1.5), seed=2)
    extra = extra - small @ torch.linalg.pinv(small) @ extra  # new directions, orthogonal to the first three
    first, second = (small, small + extra) if direction == "rises" else (small + extra, small)
    before, after = (3, 6) if direction == "rises" else (6, 3)
    switch = 500

    def target(step: int) -> torch.Tensor:
        return first if step < switch else second

    layer, error, ranks = run_geolora(target, 2, "adamw", lr, **RULES[rule])
    assert ranks[switch - 1] == before  # found the first rank before the switch
    reached = next(step for step in range(switch, len(ranks)) if ranks[step] == after)
    print(
        f"rank {before} -> {after}: the kept rank followed {reached - switch} steps after the switch; error {error:.2e}"
    )
    assert reached - switch <= within
    assert ranks[-1] == after and layer.rank["default"] == after and error <= 2e-2
