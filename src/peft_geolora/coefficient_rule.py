"""The coefficient step (``step_rule="coefficient"``): the allocator steps the augmented coefficients itself.

The optimizer keeps no state for the factors, so under FSDP2 (``fully_shard``) only the factors and their gradients
need gathering (:mod:`peft_geolora.sharding`). It scores below the default step on the suite (docs/research.md);
it is chosen by ``step_rule="coefficient"``.

Why the allocator steps ``Ŝ`` itself
------------------------------------
Handing the K- and L-gradients to the user's Adam as the gradients of ``U`` and ``V`` (the default rule) makes
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

from typing import Any, Optional

import torch

from . import integrator, optimizer_state, sharding
from .adapters import Batch
from .schedule import CycleSchedule
from .step_rule import StepRule, all_finite, new_directions
from .truncation import Truncated


def _pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, r, r) → (B, r + k, r + k), zeros in the new rows and columns."""
    return torch.nn.functional.pad(x, (0, k, 0, k))


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

    def stacked(
        self, members: list[int], r: int, cd: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active state of ``members`` in the compute dtype ``cd``: ``M`` (B, r, r), ``v`` (B,), ``Ŝ₀`` (B, r, r)."""
        M = torch.stack([self.exp_avg[i][:r, :r] for i in members]).to(cd)
        v = torch.stack([self.exp_avg_sq[i] for i in members]).to(cd)
        S0 = torch.stack([self.cycle_start[i][:r, :r] for i in members]).to(cd)
        return M, v, S0

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


class CoefficientRule(StepRule):
    """The coefficient step rule (see the module docstring)."""

    name = "coefficient"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kind = optimizer_state.optimizer_kind(self.optimizer)
        self.group_of = [optimizer_state.group_index_of(self.optimizer, a.S) for a in self.adapters]
        self.state = CoefficientState(
            [a.capacity for a in self.adapters],
            [integrator.compute_dtype(a.S.dtype) for a in self.adapters],
            [a.S.device for a in self.adapters],
        )
        # the gradients taken from the factors at the last optimizer step, and that step's hyperparameters
        self._grads: Optional[list[tuple[Optional[torch.Tensor], ...]]] = None
        self._hyper: dict[int, optimizer_state.StepHyperparameters] = {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Take the adapter gradients away from the optimizer (gathered whole under FSDP2), with its current
        hyperparameters."""
        flat = sharding.gather_columns(
            [p.grad for p in self.adapters.factor_params()], [a.rank for a in self.adapters for _ in "USV"]
        )
        grads = [tuple(flat[3 * i : 3 * i + 3]) for i in range(len(self.adapters))]
        self.finite = all_finite(g for per_adapter in grads for g in per_adapter)
        self._grads = grads if self.finite else None
        for p in self.adapters.factor_params():
            p.grad = None
        self._hyper = {
            g: optimizer_state.read_hyperparameters(self.optimizer, self._kind, g) for g in sorted(set(self.group_of))
        }

    def steps_bases(self, schedule: CycleSchedule) -> bool:
        return schedule.next_augments()  # the bases' gradients are read at augmentations only

    def advance(self, augment: bool, truncate: bool) -> list[Batch]:
        """Augment (first step of a cycle) and step the coefficients of every adapter."""
        state = self.state
        state.num_steps += 1
        out = []
        for (m, n, r, capacity, dtype, _, group), members in self.adapters.groups(self.group_of).items():
            cd = integrator.compute_dtype(dtype)
            U, S, V = self.adapters.stack(members, r, cd)
            GU, GS, GV = self._stack_gradients(members, r, cd)  # G V, Uᵀ G V, Gᵀ U
            M, v, S0 = state.stacked(members, r, cd)
            if augment:
                U_tilde, V_tilde = new_directions(U, GU, V, GV, capacity - r)
                k = U_tilde.shape[-1]
                G_hat = integrator.assemble_coefficients(GS, U_tilde, GU, V_tilde, GV)  # (B, r + k, r + k)
                U, V = torch.cat([U, U_tilde], dim=-1), torch.cat([V, V_tilde], dim=-1)
                S, M = _pad(S, k), _pad(M, k)
                S0 = S.clone()
                num_entries = (r + k) ** 2 - k**2  # the lower-right block of Ĝ is zero by construction
            else:
                G_hat = GS
                num_entries = r * r
            S, M, v = self._step_coefficients(S, G_hat, M, v, num_entries, self._hyper[group])
            out.append(Batch(members, U, S, V, S0=S0, M=M, v=v))
        self._grads = None
        return out

    def batches(self) -> list[Batch]:
        out = []
        for (m, n, r, capacity, dtype, _, _), members in self.adapters.groups(self.group_of).items():
            cd = integrator.compute_dtype(dtype)
            M, v, S0 = self.state.stacked(members, r, cd)
            out.append(Batch(members, *self.adapters.stack(members, r, cd), S0=S0, M=M, v=v))
        return out

    def keep(self, batches: list[Batch]) -> None:
        for batch in batches:
            for b, i in enumerate(batch.members):
                self.state.store(i, batch.M[b], batch.v[b], batch.S0[b])

    def carry(self, truncated: Truncated) -> None:
        """The first moment in the new basis, ``M ← Pᵀ M Q`` at the kept ranks; the cycle's start is the kept Σ."""
        batch, P, Q, sigma = truncated.batch, truncated.P, truncated.Q, truncated.sigma
        M_new = P.transpose(-2, -1) @ batch.M @ Q
        for b, (i, r1) in enumerate(zip(batch.members, truncated.ranks)):
            self.state.store(i, M_new[b, :r1, :r1], batch.v[b], torch.diag(sigma[b, :r1]))

    def shared_tensors(self) -> list[torch.Tensor]:
        return self.state.tensors()

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict([a.name for a in self.adapters])

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state is None:
            raise ValueError(
                "The allocator state holds no coefficient-step moments; resume with the step rule it was saved with."
            )
        self.state.load_state_dict(state, [a.name for a in self.adapters])

    def resume_at_step(self, step: int) -> None:
        self.state.num_steps = step

    def _stack_gradients(self, members: list[int], r: int, cd: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The gradients taken at the pre-step hook: G V (B, m, r), Uᵀ G V (B, r, r), Gᵀ U (B, n, r); zero if
        absent."""
        out = []
        for f, (rows, cols) in enumerate(((None, r), (r, r), (None, r))):
            stacked = []
            for i in members:
                p = self.adapters[i].parameters()[f]
                g = self._grads[i][f]
                g = torch.zeros_like(p) if g is None else g
                stacked.append(g[:rows, :cols] if rows is not None else g[:, :cols])
            out.append(torch.stack(stacked).to(cd))
        return tuple(out)

    def _step_coefficients(
        self,
        S: torch.Tensor,
        G_hat: torch.Tensor,
        M: torch.Tensor,
        v: torch.Tensor,
        num_entries: int,
        hp: optimizer_state.StepHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.state.num_steps
        if hp.kind == "adam":
            return integrator.adaptive_coefficient_step(
                S, G_hat, M, v, num_entries, t, hp.lr, hp.betas, hp.eps, hp.weight_decay, hp.decoupled_weight_decay
            )
        S, M = integrator.sgd_coefficient_step(
            S, G_hat, M, hp.lr, hp.momentum, hp.dampening, hp.nesterov, hp.weight_decay, first_step=(t == 1)
        )
        return S, M, v
