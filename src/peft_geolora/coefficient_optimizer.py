"""The allocator's own step of the coefficient matrices (``step_rule="coefficient"``, the default).

Why the allocator steps ``Ŝ`` itself
------------------------------------
Handing the K- and L-gradients to the user's Adam as the gradients of ``U`` and ``V`` (the 0.1.0 rule) makes
Adam normalise every entry of the m × r bases: new directions then enter at about ``λ √m`` per column while
``S`` moves by about ``λ`` per entry, so the step is unbalanced by ``√(m / r)`` (noise at high learning rates)
and depends on the layer's shape. Here the adapter gradients are taken from ``U``, ``S``, ``V`` just before
``optimizer.step()`` (so the optimizer keeps no state for them and never decays the bases), assembled into the
gradient of the augmented coefficients

.. math::  \hat G = \begin{bmatrix} U^\top G V & (G^\top U)^\top \tilde V \\ \tilde U^\top G V & 0 \end{bmatrix}

(:func:`~peft_geolora.integrator.assemble_coefficients`), and ``Ŝ`` takes one step with the user's optimizer's
hyperparameters, read from the parameter group of ``S`` at that moment (learning-rate schedule included):

* Adam-family optimizers (a group with ``betas``): :func:`~peft_geolora.integrator.adaptive_coefficient_step`,
  first moment ``M`` (same shape as ``Ŝ``) and one second moment ``v`` per adapter, so old coefficients and new
  directions move at one rate and the step commutes with the truncation's rotation;
* ``torch.optim.SGD`` (a group with ``momentum``): :func:`~peft_geolora.integrator.sgd_coefficient_step`, plain
  Algorithm 1 of the paper when ``momentum = 0``.

State transport: augmentation pads ``M`` with zeros (new directions have no history); a truncation
``Ŝ = P Σ Qᵀ`` maps it exactly as it maps the gradient, ``M ← Pᵀ M Q`` restricted to the kept ``r₁`` directions;
``v`` is a scalar and stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StepHyperparameters:
    """What one coefficient step needs from the user's optimizer, read at ``optimizer.step()`` time."""

    kind: str  # "adam" or "sgd"
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decoupled_weight_decay: bool = True
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """``"adam"`` for optimizers whose groups have ``betas``, ``"sgd"`` for ``momentum``; otherwise a clear error."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "adam"
    if "momentum" in group:
        return "sgd"
    raise ValueError(
        f"GeoLoRA's coefficient step follows Adam-family optimizers (param groups with `betas`) and SGD (with "
        f'`momentum`); {type(optimizer).__name__} has neither. Use one of those, or `step_rule="optimizer"` to '
        "let your optimizer step the factors."
    )


def read_hyperparameters(optimizer: torch.optim.Optimizer, kind: str, group_index: int) -> StepHyperparameters:
    """The current hyperparameters of parameter group ``group_index`` (its lr follows the user's scheduler)."""
    group: dict[str, Any] = optimizer.param_groups[group_index]
    lr = float(group["lr"])
    weight_decay = float(group.get("weight_decay", 0.0))
    if kind == "adam":
        # AdamW (and Adam-family optimizers that say so) decay decoupled; torch's Adam adds the decay to the gradient
        default = isinstance(optimizer, torch.optim.AdamW) or type(optimizer).__name__ != "Adam"
        decoupled = bool(group.get("decoupled_weight_decay", default))
        return StepHyperparameters(
            kind=kind,
            lr=lr,
            weight_decay=weight_decay,
            betas=tuple(float(b) for b in group["betas"]),
            eps=float(group.get("eps", 1e-8)),
            decoupled_weight_decay=decoupled,
        )
    return StepHyperparameters(
        kind=kind,
        lr=lr,
        weight_decay=weight_decay,
        momentum=float(group.get("momentum", 0.0)),
        dampening=float(group.get("dampening", 0.0)),
        nesterov=bool(group.get("nesterov", False)),
    )


def group_index_of(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> int:
    """Index of the parameter group holding ``parameter``."""
    for index, group in enumerate(optimizer.param_groups):
        if any(p is parameter for p in group["params"]):
            return index
    raise ValueError("The optimizer does not hold this GeoLoRA coefficient matrix.")


class CoefficientState:
    """Per-adapter state of the coefficient step: ``M`` (R × R), ``v`` (a scalar) and the cycle's start ``Ŝ₀``.

    Stored at the adapter's capacity R in float32 (float64 for float64 adapters); inactive entries are zero.
    """

    def __init__(self, capacities: list[int], dtypes: list[torch.dtype], devices: list[torch.device]) -> None:
        self.exp_avg = [torch.zeros(R, R, dtype=d, device=dev) for R, d, dev in zip(capacities, dtypes, devices)]
        self.exp_avg_sq = [torch.zeros((), dtype=d, device=dev) for d, dev in zip(dtypes, devices)]
        self.cycle_start = [torch.zeros(R, R, dtype=d, device=dev) for R, d, dev in zip(capacities, dtypes, devices)]
        self.num_steps = 0

    def tensors(self) -> list[torch.Tensor]:
        return [*self.exp_avg, *self.exp_avg_sq, *self.cycle_start]

    def store(self, i: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, cycle_start: torch.Tensor) -> None:
        """Write adapter i's state for its new active size (``exp_avg``, ``cycle_start``: k × k)."""
        k = exp_avg.shape[-1]
        for target, value in ((self.exp_avg[i], exp_avg), (self.cycle_start[i], cycle_start)):
            target.zero_()
            target[:k, :k] = value.to(target.dtype)
        self.exp_avg_sq[i].copy_(exp_avg_sq)

    def state_dict(self, names: list[str]) -> dict[str, Any]:
        tensors = {}
        for name, M, v, S0 in zip(names, self.exp_avg, self.exp_avg_sq, self.cycle_start):
            tensors[f"{name}.exp_avg"] = M.detach().cpu().clone()
            tensors[f"{name}.exp_avg_sq"] = v.detach().cpu().clone()
            tensors[f"{name}.cycle_start"] = S0.detach().cpu().clone()
        return {"num_steps": self.num_steps, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any], names: list[str]) -> None:
        self.num_steps = int(state["num_steps"])
        tensors = state["tensors"]
        for i, name in enumerate(names):
            self.exp_avg[i].copy_(tensors[f"{name}.exp_avg"])
            self.exp_avg_sq[i].copy_(tensors[f"{name}.exp_avg_sq"])
            self.cycle_start[i].copy_(tensors[f"{name}.cycle_start"])
