"""The default step: the user's optimizer steps ``U``, ``S``, ``V``; the allocator augments with its proposed moves.

Within a cycle (:mod:`peft_geolora.schedule`), for every adapter:

* **Every step** the optimizer steps all three factors, so its moments of the bases see every gradient. Under an
  Adam-family optimizer the step of ``S`` is then made relative between the adapter sizes ``ρ`` = 1 and
  ``ρ_max`` = 10 (:data:`RELATIVE_STEP_ABOVE`, :data:`RELATIVE_STEP_UP_TO`,
  :func:`~peft_geolora.integrator.relative_step`): ``S ← d S₀ + g (S₁ − d S₀)`` with
  ``g = clamp(‖s S₀‖_F, ρ, ρ_max) / ρ``, so a large adapter moves in proportion to its size, as its bases' moves
  do, and no adapter's step feeds on its own growth without bound.
* **The first step** (augmentation) reads the optimizer's proposed moves ``dU = U₁ − U₀``, ``dV = V₁ − V₀`` and
  augments the bases with their parts orthogonal to ``U₀``, ``V₀`` (QR,
  :func:`~peft_geolora.step_rule.new_directions`):
  ``Û = [U₀ | Ũ]``, ``V̂ = [V₀ | Ṽ]``, ``Ŝ = [[S₁, dVᵀ Ṽ], [Ũᵀ dU, 0]]``
  (:func:`~peft_geolora.integrator.assemble_coefficients`). The optimizer's state of the new entries starts at the
  mean second moment of the established ones (:func:`~peft_geolora.optimizer_state.pad_state`), so a new entry moves
  in proportion to its gradient; ``Ŝ`` is remembered as the cycle's start (the growth test's reference).
* **The other steps** train ``S`` on the augmented basis: the bases go back to where they stood before the
  optimizer's step (the moves are proposals, taken only at augmentations).
* **The truncation** rotates the optimizer's state of the factors with them
  (:func:`~peft_geolora.optimizer_state.rotate_states`).

A step whose adapter gradients are not finite takes the factors' gradients away before the optimizer sees them, so
the factors and their optimizer state stay exactly as they were.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch

from . import bases_before, integrator, optimizer_state, sharding, truncation, zero
from .adapters import Batch, per_adapter
from .schedule import CycleSchedule
from .step_rule import StepRule, all_finite, new_directions


# ρ: the adapter norm ‖s S‖_F (= ‖ΔW‖_F) above which S's Adam step grows in proportion to it. 1 by measurement:
# the suite's adapters mostly stay below it and train as with the absolute step, and with it the rank-recovery
# problems (singular values up to 5) are fitted in 1,000 steps at every learning rate (docs/research.md, hypothesis 8).
RELATIVE_STEP_ABOVE = 1.0
# ρ_max: the adapter norm above which S's step stops growing with it (the relative step is scale-free, so without a
# ceiling the noise of a plateau grows ‖ΔW‖_F geometrically: lora_alpha=16 at lr 2e-2 on a tiny Llama reached 6.5e9 in
# 60 steps). 10 by measurement: above every rank-recovery target (‖A‖_F ≤ 7.4, all 48 cases still met) and every
# suite adapter, so the default's results do not change; the divergence case stays at 249
# (benchmarks/results/relative_step_bound.json).
RELATIVE_STEP_UP_TO = 10.0


class OptimizerRule(StepRule):
    """The default step rule (see the module docstring)."""

    name = "optimizer"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Ŝ at the start of the open cycle, per adapter at its capacity (the growth test's reference)
        self.cycle_start = [
            torch.zeros(a.capacity, a.capacity, dtype=integrator.compute_dtype(a.S.dtype), device=a.S.device)
            for a in self.adapters
        ]
        self._group_of = [optimizer_state.group_index_of(self.optimizer, a.S) for a in self.adapters]
        # before each step: U₀, V₀ of every adapter (active columns; recovered from torch Adam's state, or copied)
        # and a copy of S₀ (reused buffers, new ones when a rank changed); and what decoupled decay keeps of S₀
        self._bases_before = bases_before.bases_before_for(
            self.optimizer, [p for a in self.adapters for p in (a.U, a.V)]
        )
        self._coefficients_before: Optional[list[torch.Tensor]] = None
        self._kept_after_decay: list[Optional[float]] = []
        # augmented batches wider than their storage (cycle_length=0): their widened optimizer state, by members,
        # from the augmentation to the truncation of the same allocator step
        self._widened: dict[tuple[int, ...], optimizer_state.WidenedState] = {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Save the factors the optimizer is about to move, or keep it off them if a gradient is not finite
        (torch optimizers skip a parameter whose grad is None)."""
        factors = list(self.adapters.factor_params())
        partitioned = zero.is_zero_param(factors[0])
        self.finite = all_finite(zero.full_grads(factors) if partitioned else (p.grad for p in factors))
        if not self.finite:
            for p in factors:
                if partitioned:  # ZeRO steps flat partitions whole: a zero gradient keeps the NaN out of the moments
                    zero.zero_grad(p)
                else:
                    p.grad = None
            return
        ranks = [a.rank for a in self.adapters]
        if partitioned:  # DeepSpeed ZeRO: the whole factors from their fp32 masters
            factors = zero.gather(factors)
        elif sharding.is_sharded(factors[0]):  # FSDP2: the whole factors (their active columns), one all-gather
            factors = sharding.gather_columns(factors, [r for r in ranks for _ in "USV"])
        self._coefficients_before = optimizer_state.copy_into(self._coefficients_before, factors[1::3])
        self._kept_after_decay = self._decoupled_decay_factors()
        # the bases' active columns only (everything beyond is zero): this copy grows with the rank, not the capacity
        bases = [f[:, :r] for r, i in zip(ranks, range(0, len(factors), 3)) for f in (factors[i], factors[i + 2])]
        self._bases_before.record(bases)

    def steps_bases(self, schedule: CycleSchedule) -> bool:
        return True  # the optimizer steps the bases at every step

    def advance(self, augment: bool, truncate: bool) -> list[Batch]:
        self._grow_coefficient_steps()
        if augment:
            return self._augment()
        # the bases take no move outside an augmentation: back to U₀, V₀ (zero beyond the rank, as they were)
        bases = [p for a in self.adapters for p in (a.U, a.V)]
        ranks = [a.rank for a in self.adapters for _ in "UV"]
        active = [p[:, :r] for p, r in zip(bases, ranks)]
        optimizer_state.copy_all(active, self._bases_before.before(list(range(len(bases))), active))
        torch._foreach_zero_([p[:, r:] for p, r in zip(bases, ranks)])
        return []

    def batches(self) -> list[Batch]:
        out = []
        for (m, n, r, capacity, dtype, _, _), members in self.adapters.groups().items():
            cd = integrator.compute_dtype(dtype)
            batch = Batch(members, *self.adapters.stack(members, r, cd))
            batch.S0 = torch.stack([self.cycle_start[i][:r, :r] for i in members]).to(cd)
            out.append(batch)
        return out

    def carry(self, truncated: truncation.Truncated) -> None:
        factors = [self.adapters[i].parameters() for i in truncated.batch.members]
        state = self._widened.pop(tuple(truncated.batch.members), None)
        if state is None:
            state = self._state_of([p for f in factors for p in f])
        optimizer_state.rotate_states(state, factors, truncated.P, truncated.Q, truncated.ranks, self.warn_once)
        if hasattr(state, "write_back"):
            state.write_back()

    def _state_of(self, params: list[torch.Tensor]) -> Any:
        """The optimizer (its ``.state``) for a rewrite of ``params``' state; under FSDP2 or DeepSpeed ZeRO a view with
        the moments gathered whole (:class:`~peft_geolora.sharding.WholeState`, :class:`~peft_geolora.zero.WholeState`,
        written back by the caller)."""
        if zero.is_zero_param(params[0]):
            return zero.WholeState(params)
        return sharding.WholeState(self.optimizer, params) if sharding.is_sharded(params[0]) else self.optimizer

    def shared_tensors(self) -> list[torch.Tensor]:
        return list(self.cycle_start)

    def held_tensors(self) -> list[torch.Tensor]:
        return [*self.cycle_start, *self._bases_before.held_tensors(), *(self._coefficients_before or [])]

    def state_dict(self) -> dict[str, Any]:
        tensors = {
            f"{a.name}.cycle_start": S0.detach().cpu().clone() for a, S0 in zip(self.adapters, self.cycle_start)
        }
        return {"num_steps": 0, "tensors": tensors}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state is None:  # saved by 0.1.0, at a cycle's end
            return
        for a, S0 in zip(self.adapters, self.cycle_start):
            S0.copy_(state["tensors"][f"{a.name}.cycle_start"])

    # ------------------------------------------------------------------ the parts of the step
    def _decoupled_decay_factors(self) -> list[Optional[float]]:
        """Per adapter: ``1 − lr · weight_decay`` if the coming step is an Adam-family one that decays S decoupled
        (AdamW), 1 for another Adam-family step, None if it is not adaptive (SGD's step already follows the
        gradient's size) — read before the step, with the scheduler's current lr."""
        factors: dict[int, Optional[float]] = {}
        for g in set(self._group_of):
            if "betas" not in self.optimizer.param_groups[g]:
                factors[g] = None
                continue
            hp = optimizer_state.read_hyperparameters(self.optimizer, "adam", g)
            factors[g] = 1.0 - hp.lr * hp.weight_decay if hp.decoupled_weight_decay else 1.0
        return [factors[g] for g in self._group_of]

    def _grow_coefficient_steps(self) -> None:
        """The optimizer's adaptive step of every adapter's S made relative between ρ and ρ_max
        (:func:`~peft_geolora.integrator.relative_step`, in the compute dtype), batched over adapters of one shape,
        written back in one fused copy."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (a, kept) in enumerate(zip(self.adapters, self._kept_after_decay)):
            if kept is not None:
                groups[(a.S.shape, a.S.dtype, a.S.device)].append(i)
        targets, sources = [], []
        for (_, dtype, _), members in groups.items():
            cd = integrator.compute_dtype(dtype)
            S = torch.stack([self.adapters[i].S for i in members]).to(cd)  # (B, c, c)
            S1 = integrator.relative_step(
                torch.stack([self._coefficients_before[i] for i in members]).to(cd),
                S,
                per_adapter([self.adapters[i].scaling for i in members], S),
                RELATIVE_STEP_ABOVE,
                per_adapter([self._kept_after_decay[i] for i in members], S),
                RELATIVE_STEP_UP_TO,
            )
            targets += [self.adapters[i].S for i in members]
            sources += list(S1.unbind())
        optimizer_state.copy_all(targets, sources)

    def _augment(self) -> list[Batch]:
        """Every adapter augmented with the optimizer's proposed directions: ``Û = [U₀ | Ũ]``, ``Ŝ``,
        ``V̂ = [V₀ | Ṽ]``.

        An adapter with free columns grows into them (cycle_length=0: up to ``2 · max_rank`` columns, in temporaries
        that the same step's truncation cuts back). A full adapter (rank = storage) under cycles rotates instead: it
        is augmented with up to r new directions in temporaries and keeps the leading r directions of ``Ŝ``'s SVD at
        once (:meth:`_rotate_full`), so its bases follow the gradient as a growing adapter's do. The optimizer's state
        of the new entries starts at the mean second moment of the established ones, and ``Ŝ`` (for a full adapter
        its kept part) is remembered as the cycle's start.
        """
        out = []
        before = self._bases_before.before
        for (m, n, r, capacity, dtype, _, _), members in self.adapters.groups().items():
            cd = integrator.compute_dtype(dtype)
            U0 = torch.stack(before([2 * i for i in members], [self.adapters[i].U[:, :r] for i in members])).to(cd)
            V0 = torch.stack(before([2 * i + 1 for i in members], [self.adapters[i].V[:, :r] for i in members])).to(cd)
            U1, S1, V1 = self.adapters.stack(members, r, cd)
            dU, dV = U1 - U0, V1 - V0  # the optimizer's proposed moves
            full = self.config.cycle_length > 0 and r == capacity
            # an open cycle lives in the parameters: it augments into the storage's free columns; cycle_length=0 and
            # a full adapter augment up to 2 · max_rank columns in temporaries, cut back within this step
            limit = min(m, n, 2 * self.config.max_rank) if self.config.cycle_length == 0 or full else capacity
            U_tilde, V_tilde = new_directions(U0, dU, V0, dV, limit - r)
            S_hat = integrator.assemble_coefficients(S1, U_tilde, dU, V_tilde, dV)  # (B, r + k, r + k)
            factors = [self.adapters[i].parameters() for i in members]
            state = self._state_of([p for f in factors for p in f])
            width = S_hat.shape[-1]
            if width > capacity:  # the augmented adapter outgrows its storage: its state lives until the truncation
                state = optimizer_state.WidenedState(state, factors, width)
                if not full:
                    self._widened[tuple(members)] = state
            for b in range(len(members)):
                optimizer_state.pad_state(state, *factors[b], r)
            batch = Batch(members, torch.cat([U0, U_tilde], -1), S_hat, torch.cat([V0, V_tilde], -1))
            if full and width > capacity:
                batch = self._rotate_full(batch, state, factors, r)
            elif isinstance(state, (sharding.WholeState, zero.WholeState)):
                state.write_back()
            for b, i in enumerate(members):
                start = self.cycle_start[i]
                start.zero_()
                if batch.S.shape[-1] <= capacity:  # (a cycle that outgrows the storage never stays open to read it)
                    start[: batch.S.shape[-1], : batch.S.shape[-1]] = batch.S[b]
            out.append(batch)
        return out

    def _rotate_full(
        self, batch: Batch, state: optimizer_state.WidenedState, factors: list[tuple[Any, Any, Any]], r: int
    ) -> Batch:
        """A full adapter's augmentation cut back to its rank r at once: ``Ŝ = P Σ Qᵀ``, ``U = Û P[:, :r]``,
        ``S = Σ[:r, :r]``, ``V = V̂ Q[:, :r]``, with the optimizer's state rotated alike and written back."""
        fixed = dict.fromkeys(batch.members, r)
        item = truncation.truncate(self.config, [batch], {}, None, fixed, reorthonormalize_first=False)[0]
        optimizer_state.rotate_states(state, factors, item.P, item.Q, item.ranks, self.warn_once)
        state.write_back()
        return Batch(batch.members, item.U[..., :r], torch.diag_embed(item.sigma[..., :r]), item.V[..., :r])
