"""Where the bases stood before the optimizer's step: the proposals the default step reads, without a copy where it can.

Under the default step rule (:mod:`peft_geolora.optimizer_rule`) the user's optimizer steps ``U`` and ``V`` at every
step so that its moments see every gradient, but a basis takes the move only as a proposal: the augmentation reads
``dU = U₁ − U₀`` and the other steps of a cycle put ``U₀`` back. Two ways to know ``U₀`` (m × r, the active columns):

* :class:`InvertedAdamStep` holds nothing. For torch's ``Adam`` and ``AdamW`` the step is invertible from the
  parameter and the optimizer's state after it (t: the step count, λ: the lr, μ: the decoupled decay, 0 for Adam):

  .. math::  U_1 = (1 - λμ)\\,U_0 - \\frac{λ}{1 - β_1^t}\\,\\frac{m_t}{\\sqrt{v_t / (1 - β_2^t)} + ε}
             \\quad\\Longrightarrow\\quad
             U_0 = \\Bigl(U_1 + \\frac{λ}{1 - β_1^t}\\,\\frac{m_t}{\\sqrt{v_t / (1 - β_2^t)} + ε}\\Bigr) / (1 - λμ)

  (torch's coupled weight decay of ``Adam`` is inside ``m_t``). The hyperparameters are read in the optimizer's
  pre-step hook, before a scheduler moves the lr. ``U₀`` comes back up to rounding (about one ulp of the step per
  entry), which the truncation's periodic re-orthonormalisation removes with the rest of the drift.
* :class:`CopiedBases` copies the active columns before the step: any optimizer, sharded engines (FSDP2, ZeRO),
  low-precision factors, AMSGrad and ``maximize``.

:func:`bases_before_for` chooses; the training state of the first is the factors and the optimizer's moments only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import optimizer_state, sharding, zero


class BasesBefore:
    """The interface: ``record`` in the optimizer's pre-step hook, ``before`` after the step (before any rewrite)."""

    def record(self, bases: list[torch.Tensor]) -> None:
        """The pre-step hook: ``bases`` are the active columns (m × r) of every adapter's ``U`` and ``V``, in order."""
        raise NotImplementedError

    def before(self, indices: list[int], afters: list[torch.Tensor]) -> list[torch.Tensor]:
        """The bases ``indices`` (positions in ``record``'s list) as they stood before the step; ``afters``: their
        active columns now (not changed). Read-only results: they may be the held copies themselves."""
        raise NotImplementedError

    def held_tensors(self) -> list[torch.Tensor]:
        """What it keeps between steps (its part of the training memory)."""
        return []


class CopiedBases(BasesBefore):
    """A copy of every basis' active columns, taken before each step (buffers reused while the shapes hold)."""

    def __init__(self) -> None:
        self._copies: Optional[list[torch.Tensor]] = None

    def record(self, bases: list[torch.Tensor]) -> None:
        self._copies = optimizer_state.copy_into(self._copies, bases)

    def before(self, indices: list[int], afters: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._copies[i] for i in indices]

    def held_tensors(self) -> list[torch.Tensor]:
        return list(self._copies or [])


class InvertedAdamStep(BasesBefore):
    """``U₀`` from ``U₁`` and torch Adam's / AdamW's state after the step (module docstring); holds no tensor.
    Computed for all requested bases at once with fused ``_foreach`` kernels."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.params = params  # the U and V parameters, in record's order
        self._groups = [optimizer_state.group_index_of(optimizer, p) for p in params]
        self._hyper: dict[int, optimizer_state.StepHyperparameters] = {}

    def record(self, bases: list[torch.Tensor]) -> None:
        self._hyper = {g: optimizer_state.read_hyperparameters(self.optimizer, "adam", g) for g in set(self._groups)}

    def before(self, indices: list[int], afters: list[torch.Tensor]) -> list[torch.Tensor]:
        moments, squares, step_sizes, corrections, eps, decays = [], [], [], [], [], []
        for i, after in zip(indices, afters):
            hp = self._hyper[self._groups[i]]
            state = self.optimizer.state[self.params[i]]
            r = after.shape[-1]
            t = float(state["step"])
            moments.append(state["exp_avg"][:, :r])
            squares.append(state["exp_avg_sq"][:, :r])
            step_sizes.append(hp.lr / (1.0 - hp.betas[0] ** t))
            corrections.append((1.0 - hp.betas[1] ** t) ** 0.5)
            eps.append(hp.eps)
            decays.append(1.0 - hp.lr * hp.weight_decay if hp.decoupled_weight_decay else 1.0)
        denominators = torch._foreach_sqrt(squares)  # √v / √(1 − β₂ᵗ) + ε
        torch._foreach_div_(denominators, corrections)
        torch._foreach_add_(denominators, eps)
        befores = torch._foreach_addcdiv(afters, moments, denominators, step_sizes)
        torch._foreach_div_(befores, decays)
        return list(befores)


def inverts(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
    """Whether :class:`InvertedAdamStep` applies: exactly torch's ``Adam`` or ``AdamW`` without AMSGrad or
    ``maximize``, over plain (unsharded) float32/float64 parameters."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    groups = [optimizer.param_groups[optimizer_state.group_index_of(optimizer, p)] for p in params]
    if any(g.get("amsgrad", False) or g.get("maximize", False) for g in groups):
        return False
    return all(
        p.dtype in (torch.float32, torch.float64) and not sharding.is_sharded(p) and not zero.is_zero_param(p)
        for p in params
    )


def bases_before_for(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> BasesBefore:
    """The way to know the bases before a step: :class:`InvertedAdamStep` where :func:`inverts`, else
    :class:`CopiedBases`."""
    return InvertedAdamStep(optimizer, params) if inverts(optimizer, params) else CopiedBases()
