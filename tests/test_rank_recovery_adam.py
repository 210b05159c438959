"""Rank recovery under the optimizers users run (Adam, AdamW), through the whole stack: the default step rule with the
package defaults (``lora_alpha="auto"``, ``moment_init="mean"``, ``growth_tol=0.1``) and at scale 1 (the default
before ``"auto"``; with 0.1.0's zero moments the ``"optimizer"`` rule ended at relative errors 2e-2 ... 3e-1 here:
``benchmarks/rank_recovery_rules.py``), and the other two rules at scale 1 with the growth test they were measured
with (``growth_tol=0.2``).

Each problem fits a fixed low-rank target ``A`` by minimising ``½ ‖W − A‖²_F`` (``W`` is the adapter of a zero base
layer) for at most 1,000 steps. GeoLoRA must end at the target's rank with a relative error within
``max(2e-2, LoRA r=8's error + 1e-2)``, LoRA r = 8 running under the same optimizer, learning rate and steps.
"""

from __future__ import annotations

import functools
import math

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
    """GeoLoRA's coefficient step rule with the default scale: tau 0.05, max_rank 16; returns the layer too.

    (The default step rule, ``"optimizer"``, misses these targets: README, "Choosing the defaults".)
    """
    config.setdefault("step_rule", "coefficient")
    A = target(0) if callable(target) else target
    torch.manual_seed(r0)
    config.setdefault("lora_alpha", GeoLoraConfig().lora_alpha)  # the default scale, whatever r0
    model, layer = geolora_dense(A.shape[0], A.shape[1], torch.float64, r=r0, max_rank=16, tau=0.05, **config)
    optimizer = make_optimizer(optimizer_name, [p for p in model.parameters() if p.requires_grad], lr)
    allocator = RankAllocator(model, optimizer)
    ranks = []
    for step in range(steps):
        A = target(step) if callable(target) else target
        fit_loss(model, A).backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        kept = ranks[-1] if ranks else r0
        ranks.append(kept if allocator.is_augmented() else layer.rank["default"])  # the kept rank, not a cycle's
    allocator.finish()
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


# Known misses of the method issue's target, kept visible (strict: a test fails if its case starts to pass). At the
# default scale 1 both adaptive rules move a coefficient by about lr per step, and late in the fit by less (the second
# moment remembers the large early gradients), so reaching singular values up to 5 at lr 3e-3 needs more than 1,000
# steps: the coefficient rule from rank 1 (2.8e-2 ... 9.6e-2; its shared second moment lets the largest entries move
# faster than lr), the optimizer and split rules from any rank (per-entry Adam: 0.24 ... 0.61). A scale of 4 meets it, but
# collapses on the offline task from lr 5e-3 on (README, "Choosing the defaults"). The split rule also ends at
# 2.1e-2 (allowed 2.0e-2) on the rank-5 problem from rank 1 under AdamW at lr 1e-2.
SLOW_AT_SCALE_ONE = pytest.mark.xfail(
    strict=True, reason="scale 1, lr 3e-3: more than 1,000 Adam steps to reach the target's singular values"
)
JUST_ABOVE = pytest.mark.xfail(strict=True, reason="split rule: 2.1e-2 where 2.0e-2 is allowed")


# lora_alpha="auto" alone sets the scale to 5e-3 / lr, so under Adam every case here runs the same adapter steps, about
# 5e-3 per step in each coefficient of ΔW, whatever its lr: 1,000 steps reach at most a singular value of about 5, and
# Adam's steps shrink as the fit nears (errors 0.11 ... 0.30, the right rank in 12 of 24). The suite's tasks train
# best at that step and fall to chance at four times it (README, "Choosing the defaults"). The package's default adds
# relative_step_above=1: once ‖ΔW‖_F exceeds 1 (the suite's adapters mostly stay below), S's step grows in
# proportion to it, and every case is met.
AT_THE_SUITES_STEP = pytest.mark.xfail(
    strict=True, reason="lora_alpha='auto' without the relative step: too slow for singular values up to 5"
)

RULES = {  # the default rule with the package's defaults and without the relative step; the other rules at scale 1
    "optimizer": {"step_rule": "optimizer"},
    "optimizer_absolute": {"step_rule": "optimizer", "relative_step_above": None},
    "coefficient": {"step_rule": "coefficient", "growth_tol": 0.2, "lora_alpha": 1.0},
    "split": {"step_rule": "split", "growth_tol": 0.2, "lora_alpha": 1.0},
}
# the opt-in settings of the default rule, measured on the previous default's growth test (the suite's variants too)
PREVIOUS_DEFAULT = {"step_rule": "optimizer", "growth_tol": 0.2, "lora_alpha": 1.0, "relative_step_above": None}
# the package's defaults before lora_alpha="auto" and the relative step
SCALE_ONE = {"step_rule": "optimizer", "lora_alpha": 1.0, "relative_step_above": None}


def _marks(rule: str, problem: str, optimizer_name: str, lr: float, r0: int) -> list:
    if rule == "optimizer":
        return []
    if rule == "optimizer_absolute":
        return [AT_THE_SUITES_STEP]
    if lr == 3e-3 and (rule != "coefficient" or r0 == 1):
        return [SLOW_AT_SCALE_ONE]
    if (rule, problem, optimizer_name, lr, r0) == ("split", "64x48_rank5", "adamw", 1e-2, 1):
        return [JUST_ABOVE]
    return []


CASES = [
    pytest.param(
        rule,
        problem,
        optimizer_name,
        lr,
        r0,
        id=f"{rule}-{problem}-{optimizer_name}-lr{lr:g}-r0={r0}",
        marks=_marks(rule, problem, optimizer_name, lr, r0),
    )
    for rule in RULES
    for problem in sorted(PROBLEMS)
    for optimizer_name in ("adam", "adamw")
    for lr in (3e-3, 1e-2, 3e-2)
    for r0 in (1, 16)
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


# the rank-change test also runs the optimizer rule with its opt-in balance_bases and moment_init="prior"
CHANGE_RULES = {
    **RULES,
    "optimizer_scale1": SCALE_ONE,
    "optimizer_previous": PREVIOUS_DEFAULT,
    "optimizer_balanced": {**PREVIOUS_DEFAULT, "balance_bases": True},
    "optimizer_prior": {**PREVIOUS_DEFAULT, "moment_init": "prior"},
    "optimizer_c7": {**PREVIOUS_DEFAULT, "cycle_length": 7},
    "optimizer_c15": {**PREVIOUS_DEFAULT, "cycle_length": 15},
    "optimizer_alpha8": {**PREVIOUS_DEFAULT, "lora_alpha": 8.0},
    "optimizer_aug": {**PREVIOUS_DEFAULT, "basis_steps": "augment"},
}


@pytest.mark.parametrize(
    "rule, lr, within",
    # measured (scale 1 unless said): the package defaults 11 steps up, 39 down (at lr 3e-3 too); without the relative
    # step (optimizer_absolute, at 5e-3 per step) the rise ends at rank 5 and the fall starts from 5; coefficient 7
    # up, 51 down; split 7 up, 31 down; the optimizer rule with the defaults before "auto" (optimizer_scale1) 11 up, 43
    # down; growth_tol 0.2 (the previous default) 55 up, 27 down, and with it:
    # balance_bases 31 up, 27 down; with moment_init="prior" 39 up, 27 down; with cycle_length 7: 11 up, 27 down, 15:
    # 43 and 43; with lora_alpha=8 at lr 1e-2: 11 up, 31 down (at 3e-2 it follows too, but ends at errors 3.3e-2). At
    # lr 1e-2 the per-entry rules at scale 1 fall in 123-167 steps: Adam shrinks a coefficient of 2.5 by at most lr
    # per step.
    [
        ("coefficient", 1e-2, 100),
        ("split", 3e-2, 100),
        ("optimizer", 3e-3, 100),
        ("optimizer", 3e-2, 100),
        pytest.param("optimizer_absolute", 3e-2, 100, marks=AT_THE_SUITES_STEP),  # the first target is not fitted
        ("optimizer_scale1", 3e-2, 100),
        ("optimizer_previous", 3e-2, 100),
        ("optimizer_balanced", 3e-2, 100),
        ("optimizer_prior", 3e-2, 100),
        ("optimizer_c7", 3e-2, 100),
        ("optimizer_c15", 3e-2, 100),
        ("optimizer_alpha8", 1e-2, 100),
        ("optimizer_aug", 3e-2, 100),
    ],
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

    layer, error, ranks = run_geolora(target, 2, "adamw", lr, **CHANGE_RULES[rule])
    assert ranks[switch - 1] == before  # found the first rank before the switch
    reached = next(step for step in range(switch, len(ranks)) if ranks[step] == after)
    print(
        f"rank {before} -> {after}: the kept rank followed {reached - switch} steps after the switch; error {error:.2e}"
    )
    assert reached - switch <= within
    assert ranks[-1] == after and layer.rank["default"] == after and error <= 2e-2
