"""``RankAllocator``: advance every GeoLoRA adapter at each optimizer step and apply the rank rule.

Data flow: batch → forward/backward (the layer exposes the K-, L- and S-gradients) → ``optimizer.step()`` →
:meth:`RankAllocator.step` (augment, step the coefficients, SVD, truncate, with :mod:`peft_geolora.integrator`) →
factors rewritten in place → next batch. The allocator is the only thing that changes ranks.

Step rules (``step_rule``):

* ``"coefficient"``: a pre-step hook on the optimizer takes the adapter gradients (so the optimizer
  skips ``U``, ``S``, ``V`` and keeps no state for them) and :meth:`RankAllocator.step` steps the augmented
  coefficient matrix with the optimizer's current hyperparameters (:mod:`peft_geolora.coefficient_optimizer`).
* ``"optimizer"`` (the default, and 0.1.0's rule): the user's optimizer steps ``U``, ``S``, ``V``; the allocator reads the proposed moves
  and carries the optimizer's state through basis changes (:mod:`peft_geolora.optimizer_state`). With
  ``basis_steps="augment"`` the optimizer steps ``U`` and ``V`` only at a cycle's first step. With
  ``relative_step_above`` (the default) an Adam-family step of ``S`` is scaled up in proportion to the adapter
  once ``‖s S‖_F`` exceeds it (:func:`~peft_geolora.integrator.relative_step`).
* ``"split"`` (the authors' experiments): the pre-step hook takes the gradients of ``U`` and ``V`` only, the user's
  optimizer steps ``S``, and the new directions come from a plain gradient step ``−λ G V``, ``−λ Gᵀ U`` with the
  learning rate of ``S``'s parameter group; ``S``'s optimizer state is carried like the optimizer rule's.

Schedules (``schedule``, ``cycle_length`` = c; :mod:`peft_geolora.schedule`): the optimizer steps are grouped in
cycles of c + 1. At the first step of a cycle the bases are augmented with the new directions of the gradient; at
the other steps only the coefficients train on the augmented basis; at the last step of a cycle the augmented
adapter is truncated. ``schedule="step"`` is c = 0: augment and truncate at every step (the paper's Algorithm 1).
Before each step the allocator tells the layers whether its backward must compute the bases' (K- and L-)
gradients: only at a cycle's first step, unless the optimizer rule steps the bases at every step
(``basis_steps="every"``, its default). :meth:`RankAllocator.finish` closes an open cycle early (truncates now) and
the next step starts a new one; the Trainer callback does this before every evaluation and checkpoint, so they
only ever see kept adapters.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import integrator, optimizer_state, rank_rule, scale, sharding
from .coefficient_optimizer import (
    CoefficientState,
    StepHyperparameters,
    group_index_of,
    optimizer_kind,
    read_hyperparameters,
)
from .config import GeoLoraConfig
from .distributed import broadcast_ints, broadcast_tensors, is_distributed, peer_failure_message
from .layer import GeoLoraLayer
from .schedule import CycleSchedule


# At the first truncation and then every this many, the augmented bases are re-orthonormalised (QR, folded into S):
# this removes the rounding of factors that were created in a low-precision base model's dtype before PEFT upcast
# them, and the drift that repeated rotations accumulate (about 1e-8 per rotation in fp32).
REORTHONORMALIZE_EVERY = 25
ALLOCATOR_OPTIONS = (
    "tau",
    "abs_tol",
    "min_rank",
    "max_rank",
    "budget",
    "budget_unit",
    "schedule",
    "cycle_length",
    "warmup_steps",
    "freeze_step",
    "step_rule",
    "growth_tol",
    "moment_init",
    "balance_bases",
    "basis_steps",
    "relative_step_above",
)


@dataclass
class _Adapter:
    """One (layer, adapter) pair the allocator drives."""

    name: str
    layer: GeoLoraLayer
    adapter: str
    # FSDP2: the whole factors (U, S, V) gathered for one rewrite; the allocator reads and writes these instead
    whole: Optional[list[torch.Tensor]] = None

    def __post_init__(self) -> None:
        # the layer's ParameterDicts (their entries are looked up at every use: FSDP2 replaces the parameters)
        self._factors = (self.layer.geolora_U, self.layer.geolora_S, self.layer.geolora_V)

    @property
    def U(self) -> torch.Tensor:
        return self.whole[0] if self.whole is not None else self._factors[0][self.adapter]

    @property
    def S(self) -> torch.Tensor:
        return self.whole[1] if self.whole is not None else self._factors[1][self.adapter]

    @property
    def V(self) -> torch.Tensor:
        return self.whole[2] if self.whole is not None else self._factors[2][self.adapter]

    @property
    def rank(self) -> int:
        return self.layer.rank[self.adapter]

    @property
    def capacity(self) -> int:
        return self.layer.capacity[self.adapter]

    def parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """The factor parameters themselves (sharded ``DTensor``s under FSDP2)."""
        return tuple(factor[self.adapter] for factor in self._factors)


@dataclass
class _Pending:
    """A batch of equally shaped adapters between the step and the rewrite (leading dimension B = len(members)).

    ``U`` (B, m, k), ``S`` (B, k, k), ``V`` (B, n, k); with the coefficient rule also the first moment ``M``
    (B, k, k), the second moment ``v`` (B,) and the coefficients at the cycle's start ``S0`` (B, k, k).
    """

    members: list[int]
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    M: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    S0: Optional[torch.Tensor] = None


def _unwrap_peft_model(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate wrappers; return the module that owns the GeoLoRA layers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config")
    ):
        model = model.module
    return model


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    wrapper = optimizer
    while wrapper is not None:
        if type(wrapper).__module__.startswith("deepspeed.runtime.zero"):
            raise RuntimeError(
                "GeoLoRA's RankAllocator cannot run under DeepSpeed ZeRO stages 1-3: their optimizer steps flat "
                "partitions of the parameters, so neither the factors' gradients nor their optimizer steps are "
                "visible per factor. Use ZeRO stage 0 (checked on 2 CPU processes), torch DDP, or FSDP2 "
                "(`fully_shard`) with `step_rule='coefficient'`."
            )
        wrapper = getattr(wrapper, "optimizer", None)
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    return optimizer


def _new_directions(
    U: torch.Tensor, dU: torch.Tensor, V: torch.Tensor, dV: torch.Tensor, room: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ũ (B, m, k) ⊥ U and Ṽ (B, n, k) ⊥ V from the moves dU, dV, at most ``room`` each and equally many on both
    sides (a side with no room left keeps Ŝ square)."""
    U_tilde = integrator.augment_basis(U, dU, max_new=room)  # (B, m, p)
    V_tilde = integrator.augment_basis(V, dV, max_new=room)  # (B, n, q)
    k = min(U_tilde.shape[-1], V_tilde.shape[-1])
    return U_tilde[..., :k], V_tilde[..., :k]


def _copy_into(buffers: Optional[list[torch.Tensor]], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` in ``buffers``, reused unless absent (first step) or the model was moved or cast since."""
    if buffers is None or any(
        b.shape != t.shape or b.device != t.device or b.dtype != t.dtype for b, t in zip(buffers, tensors)
    ):
        buffers = [torch.empty_like(t) for t in tensors]
    optimizer_state.copy_all(buffers, tensors)
    return buffers


def _per_adapter(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One number per adapter of a batch ``like`` (B, a, b), as (B, 1, 1) in its dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]


def _pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, r, r) → (B, r + k, r + k), zeros in the new rows and columns."""
    return torch.nn.functional.pad(x, (0, k, 0, k))


class RankAllocator:
    """Drives the GeoLoRA integrator at every optimizer step and decides the ranks.

    Usage (plain PyTorch or accelerate)::

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        allocator = RankAllocator(model, optimizer)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            allocator.step()            # after every optimizer step, before zero_grad
            optimizer.zero_grad()

    Parameters
    ----------
    model : the ``PeftModel`` (DDP- or accelerate-wrapped is fine)
    optimizer : the optimizer over the trainable parameters (an accelerate ``AcceleratedOptimizer`` is fine);
        a pre-step hook is registered on it. With ``step_rule="coefficient"`` the hook takes the adapter
        gradients, so the optimizer steps everything else (heads, biases) and the allocator the adapters, with
        the optimizer's own learning rate, betas and weight decay. With ``lora_alpha="auto"`` (the default) and no
        scale written yet, its peak learning rate sets the adapter's scale (:mod:`peft_geolora.scale`): create the
        allocator after a OneCycleLR (which records its ``max_lr`` in the groups); CyclicLR does not record its peak
        there, so give ``lora_alpha`` a number with it.
    adapter_name : which adapter to drive; default: the active adapter
    sync_processes : in a distributed run, broadcast factors, ranks and the coefficient state from process 0
        after every rewrite so that all processes hold bit-identical adapters
    **options : overrides of the config's allocator fields (``tau``, ``budget``, ``schedule``, ``step_rule``, ...)

    Skipped steps (an fp16 GradScaler overflow, accelerate's accumulation micro-steps) never reach the
    optimizer's ``step`` and are skipped here too. A step whose adapter gradients are not finite leaves the
    adapters (and their optimizer state) exactly as they were, with a warning.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        adapter_name: Optional[str] = None,
        sync_processes: bool = True,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(ALLOCATOR_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown RankAllocator option(s) {unknown}; allowed: {list(ALLOCATOR_OPTIONS)}.")
        peft_model = _unwrap_peft_model(model)
        configs = getattr(peft_model, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise TypeError("`model` must be a PeftModel with a GeoLoRA adapter (from peft.get_peft_model).")
        if adapter_name is None:
            active = getattr(peft_model, "active_adapter", "default")
            adapter_name = active if isinstance(active, str) else active[0]
        config = configs.get(adapter_name)
        if not isinstance(config, GeoLoraConfig):
            raise TypeError(
                f"Adapter `{adapter_name}` is not a GeoLoRA adapter (its config is {type(config).__name__})."
            )
        # A validated copy of the config carries the effective options; the model's config is never changed.
        self.config: GeoLoraConfig = copy.deepcopy(config)
        for key, value in options.items():
            setattr(self.config, key, value)
        self.config._validate()

        self.adapter_name = adapter_name
        self.sync_processes = sync_processes
        self.adapters: list[_Adapter] = [
            _Adapter(name, module, adapter_name)
            for name, module in peft_model.named_modules()
            if isinstance(module, GeoLoraLayer) and adapter_name in module.geolora_U
        ]
        if not self.adapters:
            raise ValueError(f"The model has no GeoLoRA layers for adapter `{adapter_name}`.")
        self._check_parameters_are_whole(model)
        self._check_budget_covers_floors()
        self.optimizer = _unwrap_optimizer(optimizer)
        self._check_optimizer_covers_factors()
        if config.lora_alpha == "auto" and config.scaling is None:
            self._resolve_auto_scale(config)

        self.schedule = CycleSchedule.from_config(self.config)
        self._num_truncations = 0
        self._pending = False
        self._base_ranks: dict[int, int] = {}  # ranks before the last augmentation (kept while ranks are fixed)
        self._open_cycle = False  # augmented, not yet truncated
        # a continued run (adapter loaded with its rank history) records its changes after the earlier run's
        self._history_offset = max(
            (event[0] for a in self.adapters for event in a.layer.rank_history.get(a.adapter, [])), default=0
        )
        self._warned: set[str] = set()
        # step_rule="optimizer": U₁, V₁, U₂, … before an optimizer step that moves the bases (buffers reused), and
        # whether the step's adapter gradients were not finite (taken away)
        self._basis_buffers: Optional[list[torch.Tensor]] = None
        # relative_step_above: S before the optimizer's step (buffers reused), and what decoupled decay keeps of it
        self._coefficient_buffers: Optional[list[torch.Tensor]] = None
        self._kept_after_decay: list[Optional[float]] = []
        self._skipped = False
        # step_rule="coefficient": the gradients taken from the factors, and the hyperparameters of the step
        self._grads: Optional[list[tuple[Optional[torch.Tensor], ...]]] = None
        self._hyper: dict[int, StepHyperparameters] = {}
        self._coefficients: Optional[CoefficientState] = None
        # step_rule="optimizer" or "split": Ŝ at the start of the open cycle (the growth test's reference)
        self._cycle_start: Optional[list[torch.Tensor]] = None
        self._group_of = [group_index_of(self.optimizer, a.S) for a in self.adapters]  # S's parameter group
        if self.uses_coefficient_step:
            self._kind = optimizer_kind(self.optimizer)
            self._coefficients = CoefficientState(
                [a.capacity for a in self.adapters],
                [integrator.compute_dtype(a.S.dtype) for a in self.adapters],
                [a.S.device for a in self.adapters],
            )
            hook = self._take_gradients
        else:
            self._cycle_start = [
                torch.zeros(a.capacity, a.capacity, dtype=integrator.compute_dtype(a.S.dtype), device=a.S.device)
                for a in self.adapters
            ]
            if self.config.step_rule == "split":
                self._lrs: list[float] = []
                hook = self._take_basis_gradients
            else:
                hook = self._snapshot_before_step
        # balance_bases: which adapters an Adam-family optimizer (param groups with `betas`) steps
        self._adaptive = [
            self.config.balance_bases
            and self.config.step_rule == "optimizer"
            and "betas" in self.optimizer.param_groups[group_index_of(self.optimizer, a.U)]
            for a in self.adapters
        ]
        self._hook = self.optimizer.register_step_pre_hook(hook)
        for a in self.adapters:
            a.layer.integrated[a.adapter] = True
        self._announce_next_step()
        base_model = getattr(peft_model, "base_model", peft_model)
        base_model.__dict__["_geolora_allocator"] = self

    @property
    def num_steps(self) -> int:
        """Optimizer steps the allocator has followed (see :class:`~peft_geolora.schedule.CycleSchedule`)."""
        return self.schedule.num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self.schedule.num_steps = value

    @property
    def uses_coefficient_step(self) -> bool:
        return self.config.step_rule == "coefficient"

    # ------------------------------------------------------------------ checks, hooks and bookkeeping
    def _check_parameters_are_whole(self, model: nn.Module) -> None:
        """FSDP2 shards are gathered around each rewrite (coefficient rule); FSDP1 and DeepSpeed ZeRO-3 are refused."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = isinstance(model, FullyShardedDataParallel) or any(
            isinstance(m, FullyShardedDataParallel) for m in model.modules()
        )
        params = [p for a in self.adapters for p in a.parameters()]
        if fsdp1 or any(hasattr(p, "ds_id") for p in params):
            raise RuntimeError(
                "GeoLoRA's RankAllocator cannot see whole factors under FSDP1 (FullyShardedDataParallel) or DeepSpeed "
                "ZeRO-3. Shard with FSDP2 (`torch.distributed.fsdp.fully_shard`, accelerate's `fsdp_version: 2`) and "
                "`step_rule='coefficient'`, or train with DDP or DeepSpeed ZeRO stage 0."
            )
        self._sharded = any(sharding.is_sharded(p) for p in params)
        if self._sharded and not self.uses_coefficient_step:
            raise RuntimeError(
                "The model's GeoLoRA factors are sharded by FSDP2. Use `step_rule='coefficient'` (in GeoLoraConfig or "
                "RankAllocator(..., step_rule='coefficient')): the allocator then steps the factors itself and the "
                "optimizer keeps no state for them, so only the factors need gathering. The default rule would need "
                "the optimizer's sharded moments as well."
            )

    def _resolve_auto_scale(self, model_config: GeoLoraConfig) -> None:
        """``lora_alpha="auto"``: set the scale from the optimizer's peak learning rate (:mod:`peft_geolora.scale`) in
        every layer and in the model's config (saved with the adapter; resolving it completes the adapter's creation,
        and a resumed run resolves it to the same value from the same optimizer)."""
        group = self.optimizer.param_groups[group_index_of(self.optimizer, self.adapters[0].S)]
        value = scale.auto_scale(group, self.config.step_rule)
        for a in self.adapters:
            a.layer.scaling[a.adapter] = value
        model_config.scaling = value
        self.config.scaling = value

    def _check_budget_covers_floors(self) -> None:
        cfg = self.config
        if cfg.budget is None:
            return
        floors = [(min(cfg.min_rank, cfg.max_rank, a.capacity), a.U.shape[0] + a.V.shape[0]) for a in self.adapters]
        if cfg.budget_unit == "rank":
            need = sum(f for f, _ in floors)
        else:
            need = sum(f * (mn + f) for f, mn in floors)
        if cfg.budget < need:
            raise ValueError(
                f"`budget` must be >= {need} {'singular values' if cfg.budget_unit == 'rank' else 'parameters'} "
                f"(what `min_rank` = {cfg.min_rank} keeps on the {len(self.adapters)} adapted layers), got "
                f"{cfg.budget}. Raise the budget or lower `min_rank`."
            )

    def _check_optimizer_covers_factors(self) -> None:
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [a.name for a in self.adapters if not all(id(p) in in_optimizer for p in a.parameters())]
        if missing:
            raise ValueError(
                f"The optimizer does not update the GeoLoRA factors of {missing[:3]}{'...' if len(missing) > 3 else ''}."
                " Build it over the trainable parameters, e.g. "
                "`torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])`, before the allocator."
            )

    def _factor_params(self) -> Iterator[nn.Parameter]:
        for a in self.adapters:
            yield from a.parameters()

    @staticmethod
    def _all_finite(grads: Iterable[Optional[torch.Tensor]]) -> bool:
        """Every given gradient (None: absent) is finite.

        Plain tensors are checked through their norms, one fused ``_foreach_norm`` per device accumulated in
        float64 (a NaN or an infinity makes its norm non-finite; a finite float32 or float16 gradient cannot
        overflow it): one kernel instead of one per tensor, which on 36 adapters was 4 ms of every step on CPU.
        Sharded ``DTensor`` gradients (FSDP2) are checked one by one.
        """
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        checks = []
        for g in grads:
            if g is None:
                continue
            if sharding.is_sharded(g):
                checks.append(torch.isfinite(g).all())
            else:
                by_device[g.device].append(g)
        for tensors in by_device.values():
            checks.append(torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))).all())
        return all(bool(c) for c in checks)

    @torch.no_grad()
    def _take_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Coefficient rule: take the adapter gradients away from the optimizer, with its current hyperparameters."""
        self._warn_if_step_missed()
        flat = sharding.gather_columns(
            [p.grad for a in self.adapters for p in a.parameters()], [a.rank for a in self.adapters for _ in "USV"]
        )
        grads = [tuple(flat[3 * i : 3 * i + 3]) for i in range(len(self.adapters))]
        finite = self._all_finite(g for per_adapter in grads for g in per_adapter)
        self._grads = grads if finite else None
        for p in self._factor_params():
            p.grad = None
        self._hyper = {g: read_hyperparameters(self.optimizer, self._kind, g) for g in sorted(set(self._group_of))}
        self._pending = True

    @torch.no_grad()
    def _take_basis_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Split rule: take the K- and L-gradients (those of U and V) away, leave S's to the optimizer.

        A step with a non-finite adapter gradient takes S's gradient too, so the optimizer leaves S and its state
        as they were.
        """
        self._warn_if_step_missed()
        finite = self._all_finite(p.grad for p in self._factor_params())
        self._grads = (
            [(a.layer.geolora_U[a.adapter].grad, None, a.layer.geolora_V[a.adapter].grad) for a in self.adapters]
            if finite
            else None
        )
        for a in self.adapters:
            U, S, V = a.parameters()
            U.grad = V.grad = None
            if not finite:
                S.grad = None
        self._lrs = [float(self.optimizer.param_groups[g]["lr"]) for g in self._group_of]
        self._pending = True

    @torch.no_grad()
    def _snapshot_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer rule: save the bases the optimizer is about to move, or keep the optimizer off the factors.

        A step with a non-finite adapter gradient takes all the factors' gradients away, so the optimizer leaves
        the factors and their state exactly as they were (torch optimizers skip a parameter whose grad is None).
        With ``basis_steps="augment"``, an S-only step of a cycle takes the bases' gradients away (zeros: the
        backward did not compute them), so the optimizer steps S alone and nothing needs saving or undoing.
        """
        self._pending = True
        self._skipped = not self._all_finite(p.grad for p in self._factor_params())
        if self._skipped:
            for p in self._factor_params():
                p.grad = None
            return
        if self.config.relative_step_above is not None:
            self._coefficient_buffers = _copy_into(self._coefficient_buffers, [a.S for a in self.adapters])
            self._kept_after_decay = self._decoupled_decay_factors()
        steps_bases = self._steps_bases()
        if not steps_bases:
            for a in self.adapters:
                U, _, V = a.parameters()
                U.grad = V.grad = None
        if self.config.moment_init == "prior":
            for a in self.adapters:
                optimizer_state.seed_fresh_state(self.optimizer, *a.parameters(), a.rank)
        if not steps_bases:
            return
        # U and V are read by an augmentation (the proposed moves) and restored after an S-only step
        self._basis_buffers = _copy_into(self._basis_buffers, [p for a in self.adapters for p in (a.U, a.V)])

    def _steps_bases(self) -> bool:
        """Whether the coming optimizer step reads the bases' (K- and L-) gradients: always at a cycle's first step
        (the augmentation), and at every step under the optimizer rule with ``basis_steps="every"``."""
        if self.config.step_rule == "optimizer" and self.config.basis_steps == "every":
            return True
        return self.schedule.next_augments()

    def _announce_next_step(self) -> None:
        """Tell the layers whether the coming backward must compute the bases' gradients (see :meth:`_steps_bases`)."""
        bases = self._steps_bases()
        for a in self.adapters:
            a.layer.basis_gradients[a.adapter] = bases

    def _warn_if_step_missed(self) -> None:
        if self._pending:
            self._warn_once(
                "missing-step",
                "GeoLoRA: optimizer.step() ran twice without allocator.step() in between; the adapters skipped a "
                "step. Call allocator.step() after every optimizer.step() (the Trainer callback does).",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _warn_nonfinite(self) -> None:
        self._warn_once(
            "nonfinite",
            f"GeoLoRA: non-finite adapter gradients at optimizer step {self.num_steps}; the adapters were left as "
            "they were (factors and optimizer state). Lower the learning rate or use gradient clipping if this "
            "repeats.",
        )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """Advance every adapter after a real optimizer step (a no-op if the optimizer did not step)."""
        if not self._pending:
            return
        self._advance()
        self._announce_next_step()

    def _advance(self) -> None:
        """The step proper: augment, train S, or truncate, by the step's position in its cycle and the rule."""
        self._pending = False
        augment, truncate = self.schedule.advance()
        if self.uses_coefficient_step:
            if self._grads is None:
                self._warn_nonfinite()
                return
            self._gather()
            self._coefficient_step(augment, truncate)
            self._grads = None
        elif self.config.step_rule == "split":
            if self._grads is None:
                self._warn_nonfinite()
                return
            if augment:
                self._augment_from_gradients(truncate=truncate)
            elif truncate:
                self._truncate_in_place()
            self._grads = None
        else:
            if self._skipped:
                self._warn_nonfinite()
                return
            if self.config.relative_step_above is not None:
                self._grow_coefficient_steps()
            if augment:
                self._augment_from_optimizer(truncate=truncate)
            else:
                if self.config.basis_steps == "every":  # the optimizer moved the bases (saved by the hook): undo
                    self._restore_bases()
                if truncate:
                    self._truncate_in_place()
        self._publish()

    def _gather(self) -> None:
        """FSDP2: gather every factor whole before a rewrite (the allocator then reads and writes those)."""
        if self._sharded:
            flat = sharding.gather_columns(
                [p for a in self.adapters for p in a.parameters()], [a.rank for a in self.adapters for _ in "USV"]
            )
            for i, a in enumerate(self.adapters):
                a.whole = flat[3 * i : 3 * i + 3]

    def _publish(self) -> None:
        """After a rewrite: make every process hold process 0's adapters (FSDP2: each writes its shard back), and
        tell the layers they are current."""
        if self.sync_processes:
            self._broadcast_from_main_process()
        for a in self.adapters:
            if a.whole is not None:
                for param, whole in zip(a.parameters(), a.whole):
                    sharding.write_local(param, whole)
                a.whole = None
            a.layer.mark_allocated(a.adapter)

    def is_augmented(self) -> bool:
        """True between an augmentation and its truncation (cycle schedule): the adapters hold new directions."""
        return self._open_cycle

    @torch.no_grad()
    def finish(self) -> None:
        """Close an open cycle now: truncate, so the adapters hold their kept ranks; a no-op otherwise.

        Call it after the last step, and before evaluating or saving in the middle of training (the Trainer
        callback does both). Training may continue afterwards: the next step starts a new cycle.
        """
        if not self.is_augmented():
            return
        self._gather()
        self._truncate_in_place()
        self._publish()
        self.schedule.restart()
        self._announce_next_step()

    def _groups(self) -> dict[tuple, list[int]]:
        """Adapters that can be batched together: equal shapes, rank, capacity, dtype, device and param group."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, a in enumerate(self.adapters):
            group = self._group_of[i] if self.config.step_rule != "optimizer" else 0
            groups[(a.U.shape[0], a.V.shape[0], a.rank, a.capacity, a.U.dtype, a.U.device, group)].append(i)
        return groups

    def _stack(self, members: list[int], r: int, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active factors of ``members``: U (B, m, r), S (B, r, r), V (B, n, r) in the compute dtype."""
        U = torch.stack([self.adapters[i].U[:, :r] for i in members]).to(cd)
        S = torch.stack([self.adapters[i].S[:r, :r] for i in members]).to(cd)
        V = torch.stack([self.adapters[i].V[:, :r] for i in members]).to(cd)
        return U, S, V

    def _stack_gradients(self, members: list[int], r: int, cd: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The gradients taken at the pre-step hook: G V (B, m, r), Uᵀ G V (B, r, r), Gᵀ U (B, n, r); zero if absent."""
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

    # ------------------------------------------------------------------ coefficient rule
    def _coefficient_step(self, augment: bool, truncate: bool) -> None:
        """Augment (first step of a cycle), step the coefficients, and truncate (last step of a cycle)."""
        state = self._coefficients
        state.num_steps += 1
        if augment:
            self._base_ranks = {i: a.rank for i, a in enumerate(self.adapters)}
        pending: list[_Pending] = []
        for (m, n, r, capacity, dtype, _, group), members in self._groups().items():
            cd = integrator.compute_dtype(dtype)
            U, S, V = self._stack(members, r, cd)
            GU, GS, GV = self._stack_gradients(members, r, cd)  # G V, Uᵀ G V, Gᵀ U
            M = torch.stack([state.exp_avg[i][:r, :r] for i in members]).to(cd)
            v = torch.stack([state.exp_avg_sq[i] for i in members]).to(cd)
            if augment:
                U_tilde, V_tilde = _new_directions(U, GU, V, GV, capacity - r)
                k = U_tilde.shape[-1]
                G_hat = integrator.assemble_coefficients(GS, U_tilde, GU, V_tilde, GV)  # (B, r + k, r + k)
                U, V = torch.cat([U, U_tilde], dim=-1), torch.cat([V, V_tilde], dim=-1)
                S, M = _pad(S, k), _pad(M, k)
                S0 = S.clone()
                num_entries = (r + k) ** 2 - k**2  # the lower-right block of Ĝ is zero by construction
            else:
                G_hat = GS
                S0 = torch.stack([state.cycle_start[i][:r, :r] for i in members]).to(cd)
                num_entries = r * r
            S, M, v = self._step_coefficients(S, G_hat, M, v, num_entries, self._hyper[group])
            pending.append(_Pending(members, U, S, V, M, v, S0))
        self._finish_step(pending, truncate)

    def _step_coefficients(
        self,
        S: torch.Tensor,
        G_hat: torch.Tensor,
        M: torch.Tensor,
        v: torch.Tensor,
        num_entries: int,
        hp: StepHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self._coefficients.num_steps
        if hp.kind == "adam":
            return integrator.adaptive_coefficient_step(
                S, G_hat, M, v, num_entries, t, hp.lr, hp.betas, hp.eps, hp.weight_decay, hp.decoupled_weight_decay
            )
        S, M = integrator.sgd_coefficient_step(
            S, G_hat, M, hp.lr, hp.momentum, hp.dampening, hp.nesterov, hp.weight_decay, first_step=(t == 1)
        )
        return S, M, v

    # ------------------------------------------------------------------ optimizer rule (0.1.0)
    def _decoupled_decay_factors(self) -> list[Optional[float]]:
        """Per adapter: ``1 − lr · weight_decay`` if the coming step is an Adam-family one that decays S decoupled
        (AdamW), 1 for another Adam-family step, None if it is not adaptive (SGD's step already follows the
        gradient's size) — read before the step, with the scheduler's current lr."""
        factors: dict[int, Optional[float]] = {}
        for g in set(self._group_of):
            if "betas" not in self.optimizer.param_groups[g]:
                factors[g] = None
                continue
            hp = read_hyperparameters(self.optimizer, "adam", g)
            factors[g] = 1.0 - hp.lr * hp.weight_decay if hp.decoupled_weight_decay else 1.0
        return [factors[g] for g in self._group_of]

    def _grow_coefficient_steps(self) -> None:
        """``relative_step_above``: the optimizer's adaptive step of every adapter's S made relative above that size
        (:func:`~peft_geolora.integrator.relative_step`, in the compute dtype), batched over adapters of one shape,
        written back in one fused copy."""
        rho = float(self.config.relative_step_above)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (a, kept) in enumerate(zip(self.adapters, self._kept_after_decay)):
            if kept is not None:
                groups[(a.S.shape, a.S.dtype, a.S.device)].append(i)
        targets, sources = [], []
        for (_, dtype, _), members in groups.items():
            cd = integrator.compute_dtype(dtype)
            S = torch.stack([self.adapters[i].S for i in members]).to(cd)  # (B, c, c)
            S1 = integrator.relative_step(
                torch.stack([self._coefficient_buffers[i] for i in members]).to(cd),
                S,
                _per_adapter([self.adapters[i].layer.scaling[self.adapters[i].adapter] for i in members], S),
                rho,
                _per_adapter([self._kept_after_decay[i] for i in members], S),
            )
            targets += [self.adapters[i].S for i in members]
            sources += list(S1.unbind())
        optimizer_state.copy_all(targets, sources)

    def _restore_bases(self) -> None:
        """S-only step of the cycle schedule: undo the optimizer's moves of U and V."""
        optimizer_state.copy_all([p for a in self.adapters for p in (a.U, a.V)], self._basis_buffers)

    def _augment_from_optimizer(self, truncate: bool) -> None:
        """Augment every adapter with the optimizer's proposed directions; optionally truncate at once."""
        pending: list[_Pending] = []
        self._base_ranks = {i: a.rank for i, a in enumerate(self.adapters)}
        for (m, n, r, capacity, dtype, _, _), members in self._groups().items():
            cd = integrator.compute_dtype(dtype)
            U0 = torch.stack([self._basis_buffers[2 * i][:, :r] for i in members]).to(cd)  # (B, m, r)
            V0 = torch.stack([self._basis_buffers[2 * i + 1][:, :r] for i in members]).to(cd)  # (B, n, r)
            U1, S1, V1 = self._stack(members, r, cd)
            dU, dV = U1 - U0, V1 - V0  # the optimizer's proposed moves
            if self.config.balance_bases:
                dU, dV = self._balance(members, dU, dV)
            pending.append(self._augment_group(members, capacity, U0, S1, V0, dU, dV))
        self._finish_step(pending, truncate)

    def _balance(self, members: list[int], dU: torch.Tensor, dV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``balance_bases``: the moves ``dU`` (B, m, r) and ``dV`` (B, n, r) of adapters stepped by an Adam-family
        optimizer scaled by ``√(r/m)`` and ``√(r/n)``: Adam moves each entry by about λ, so a column of ``dU`` has
        norm about ``λ√m`` against ``λ√r`` for a column of S's step; scaled, the new directions enter with the
        weight of S's own step. Adapters stepped by an optimizer without ``betas`` (SGD) keep their exact moves."""
        m, r = dU.shape[-2:]
        n = dV.shape[-2]
        adaptive = [self._adaptive[i] for i in members]
        u = torch.tensor([(r / m) ** 0.5 if a else 1.0 for a in adaptive], dtype=dU.dtype, device=dU.device)
        v = torch.tensor([(r / n) ** 0.5 if a else 1.0 for a in adaptive], dtype=dV.dtype, device=dV.device)
        return dU * u[:, None, None], dV * v[:, None, None]

    def _augment_from_gradients(self, truncate: bool) -> None:
        """Split rule: augment every adapter with the new directions of a plain gradient step of K and L.

        ``ΔU = −λ G V`` and ``ΔV = −λ Gᵀ U`` with λ the current learning rate of S's parameter group; the optimizer
        has already stepped S, so Ŝ = [[S⁺, ΔVᵀ Ṽ], [Ũᵀ ΔU, 0]] (the authors' experiments).
        """
        pending: list[_Pending] = []
        self._base_ranks = {i: a.rank for i, a in enumerate(self.adapters)}
        for (m, n, r, capacity, dtype, _, _), members in self._groups().items():
            cd = integrator.compute_dtype(dtype)
            U, S, V = self._stack(members, r, cd)
            GU, _, GV = self._stack_gradients(members, r, cd)
            lr = torch.tensor([self._lrs[i] for i in members], dtype=cd, device=U.device)[:, None, None]
            dU, dV = -lr * GU, -lr * GV
            pending.append(self._augment_group(members, capacity, U, S, V, dU, dV))
        self._finish_step(pending, truncate)

    def _augment_group(
        self,
        members: list[int],
        capacity: int,
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor,
        dU: torch.Tensor,
        dV: torch.Tensor,
    ) -> _Pending:
        """Optimizer and split rules: the augmented adapters of one group from the proposed moves ``dU``, ``dV``.

        ``U`` (B, m, r), ``S`` (B, r, r, already stepped), ``V`` (B, n, r) → ``Û = [U | Ũ]``, ``Ŝ``, ``V̂ = [V | Ṽ]``;
        the optimizer's state of the new entries is zeroed or seeded (``moment_init``), and ``Ŝ`` is remembered as
        the cycle's start (the growth test's reference).
        """
        r = U.shape[-1]
        U_tilde, V_tilde = _new_directions(U, dU, V, dV, capacity - r)
        S_hat = integrator.assemble_coefficients(S, U_tilde, dU, V_tilde, dV)  # (B, r + k, r + k)
        for b, i in enumerate(members):
            a = self.adapters[i]
            optimizer_state.pad_state(
                self.optimizer, a.U, a.S, a.V, r, seed_second_moments=self.config.moment_init in ("mean", "prior")
            )
            start = self._cycle_start[i]
            start.zero_()
            start[: S_hat.shape[-2], : S_hat.shape[-1]] = S_hat[b]
        return _Pending(members, torch.cat([U, U_tilde], -1), S_hat, torch.cat([V, V_tilde], -1))

    def _finish_step(self, pending: list[_Pending], truncate: bool) -> None:
        """Truncate the stepped adapters, or write them as they are (an open cycle), with their coefficient state."""
        if truncate:
            self._truncate(pending)
            return
        self._open_cycle = True
        for item in pending:
            if item.M is not None:
                for b, i in enumerate(item.members):
                    self._coefficients.store(i, item.M[b], item.v[b], item.S0[b])
            width = item.U.shape[-1]
            self._write_group(item.members, item.U, item.S, item.V, [width] * len(item.members), record=False)

    # ------------------------------------------------------------------ truncation
    def _truncate_in_place(self) -> None:
        """Truncate the (augmented) adapters as they are: SVD of their coefficient matrices."""
        pending = []
        state = self._coefficients
        for (m, n, r, capacity, dtype, _, _), members in self._groups().items():
            cd = integrator.compute_dtype(dtype)
            item = _Pending(members, *self._stack(members, r, cd))
            if self._cycle_start is not None:
                item.S0 = torch.stack([self._cycle_start[i][:r, :r] for i in members]).to(cd)
            if state is not None:
                item.M = torch.stack([state.exp_avg[i][:r, :r] for i in members]).to(cd)
                item.v = torch.stack([state.exp_avg_sq[i] for i in members]).to(cd)
                item.S0 = torch.stack([state.cycle_start[i][:r, :r] for i in members]).to(cd)
            pending.append(item)
        self._truncate(pending)

    def _truncate(self, pending: list[_Pending]) -> None:
        """SVD of each group's coefficients, the rank rule, and the rewrite of every adapter and its state."""
        self._num_truncations += 1
        if self._num_truncations % REORTHONORMALIZE_EVERY == 1:
            for item in pending:
                U, S, V = item.U, item.S, item.V
                item.U, item.S, item.V = integrator.reorthonormalize(U, S, V)
                # the moment and the cycle's start in the same coordinates as S
                if item.M is not None:
                    _, item.M, _ = integrator.reorthonormalize(U, item.M, V)
                if item.S0 is not None:
                    _, item.S0, _ = integrator.reorthonormalize(U, item.S0, V)
        spectra = [integrator.small_svd(item.S) for item in pending]  # (P, sigma, Q) per group
        ranks = self._decide_ranks(pending, spectra)
        self._open_cycle = False
        for item, (P, sigma, Q) in zip(pending, spectra):
            U_new, V_new = integrator.rotate_factors(item.U, item.V, P, Q)  # (B, m, k), (B, n, k)
            kept = [ranks[i] for i in item.members]
            if item.M is not None:
                M_new = P.transpose(-2, -1) @ item.M @ Q  # the moment in the new basis
                for b, (i, r1) in enumerate(zip(item.members, kept)):
                    S_kept = torch.diag(sigma[b, :r1])
                    self._coefficients.store(i, M_new[b, :r1, :r1], item.v[b], S_kept)
            else:
                factors = [self.adapters[i].parameters() for i in item.members]
                optimizer_state.rotate_states(self.optimizer, factors, P, Q, kept, self._warn_once)
            self._write_group(item.members, U_new, torch.diag_embed(sigma), V_new, kept)

    def _decide_ranks(self, pending: list[_Pending], spectra: list) -> dict[int, int]:
        """New rank of every adapter: unchanged while ranks are fixed (warm-up, frozen), else the rank rule
        (:mod:`peft_geolora.rank_rule`: the tau rule with the growth test, or the global budget)."""
        if not self.schedule.ranks_may_change():
            return {i: self._base_ranks.get(i, self.adapters[i].rank) for item in pending for i in item.members}
        caps = {i: min(self.config.max_rank, a.capacity) for i, a in enumerate(self.adapters)}
        costs = None  # what one rank costs, read by a budget in parameters only
        if self.config.budget is not None and self.config.budget_unit == "params":
            costs = {i: a.U.shape[0] + a.V.shape[0] for i, a in enumerate(self.adapters)}
        views = [
            rank_rule.Spectrum(item.members, item.S, P, sigma, Q, item.S0)
            for item, (P, sigma, Q) in zip(pending, spectra)
        ]
        return rank_rule.kept_ranks(self.config, views, caps, costs)

    def _write_group(
        self,
        members: list[int],
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor,
        ranks: list[int],
        record: bool = True,
    ) -> None:
        """Write new active factors of equally shaped adapters in place and zero the rest (one fused copy).

        ``U`` (B, m, w), ``S`` (B, w, w), ``V`` (B, n, w): adapter ``members[b]`` gets the first ``ranks[b]``
        columns (rows and columns of ``S``); everything beyond is zero. ``record``: a truncation's kept rank goes
        into the rank history; an augmentation's transient one does not.
        """
        width = U.shape[-1]
        pad = self.adapters[members[0]].capacity - width
        drop = torch.arange(width, device=U.device)[None, :] >= torch.tensor(ranks, device=U.device)[:, None]
        U = torch.nn.functional.pad(U.masked_fill(drop[:, None, :], 0), (0, pad))
        V = torch.nn.functional.pad(V.masked_fill(drop[:, None, :], 0), (0, pad))
        S = S.masked_fill(drop[:, None, :] | drop[:, :, None], 0)
        S = torch.nn.functional.pad(S, (0, pad, 0, pad))
        targets = [p for i in members for p in (self.adapters[i].U, self.adapters[i].S, self.adapters[i].V)]
        optimizer_state.copy_all(targets, [x for b in range(len(members)) for x in (U[b], S[b], V[b])])
        for i, r1 in zip(members, ranks):
            self._record(i, r1, record)

    def _record(self, i: int, r1: int, record: bool) -> None:
        """Set adapter ``i``'s active rank to ``r₁`` (its factors are written) and, if ``record``, log a change."""
        a = self.adapters[i]
        if record:
            history = a.layer.rank_history.setdefault(a.adapter, [])
            kept = history[-1][1] if history else self._base_ranks.get(i, a.rank)
            if r1 != kept:
                history.append((self.num_steps + self._history_offset, r1))
        a.layer.set_rank(a.adapter, r1, zero_rest=False)

    # ------------------------------------------------------------------ distributed
    def _broadcast_from_main_process(self) -> None:
        """Make process 0's factors, ranks and coefficient state authoritative (bit-identical on every process).

        Process 0's ranks travel first, then only the active blocks ``U[:, :r]``, ``S[:r, :r]``, ``V[:, :r]``; a
        process whose rank differed zeroes what lies beyond process 0's rank.
        """
        if not is_distributed():
            return
        try:
            ranks = broadcast_ints([a.rank for a in self.adapters], self.adapters[0].U.device)
            tensors = []
            for a, r in zip(self.adapters, ranks):
                if r != a.rank:
                    a.U[:, r:] = 0
                    a.V[:, r:] = 0
                    a.S[r:, :] = 0
                    a.S[:, r:] = 0
                    a.layer.set_rank(a.adapter, r, zero_rest=False)
                tensors += [a.U[:, :r], a.S[:r, :r], a.V[:, :r]]  # FSDP2: the gathered whole factors
            if self._coefficients is not None:
                tensors += self._coefficients.tensors()
            if self._cycle_start is not None:
                tensors += self._cycle_start
            broadcast_tensors(tensors)
        except RuntimeError as exc:  # a peer stopped responding or died: say so instead of a bare gloo/NCCL error
            raise RuntimeError(peer_failure_message(exc)) from exc

    # ------------------------------------------------------------------ reporting and resume
    def ranks(self, kept: bool = False) -> dict[str, int]:
        """Active rank of every adapted layer, by module name.

        ``kept=True``: during an open cycle, the ranks kept before its augmentation (what training keeps so far)
        instead of the transient augmented ones; outside a cycle both are the same.
        """
        if kept and self._open_cycle:
            return {a.name: self._base_ranks.get(i, a.rank) for i, a in enumerate(self.adapters)}
        return {a.name: a.rank for a in self.adapters}

    def rank_history(self) -> dict[str, list[tuple[int, int]]]:
        """Per layer, the (optimizer step, kept rank) pairs at which a truncation changed its rank."""
        return {a.name: list(a.layer.rank_history.get(a.adapter, [])) for a in self.adapters}

    def total_rank(self, kept: bool = False) -> int:
        """Σ r over the adapted layers (``kept``: as in :meth:`ranks`)."""
        return sum(self.ranks(kept).values())

    def num_adapter_parameters(self, kept: bool = False) -> int:
        """Trainable adapter parameters at the active ranks: Σ r (m + n + r) (``kept``: as in :meth:`ranks`)."""
        ranks = self.ranks(kept)
        return sum(r * (a.U.shape[0] + a.V.shape[0] + r) for a, r in zip(self.adapters, ranks.values()))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the adapter weights and the optimizer's own state.

        Plain values, plus under ``"coefficient"`` the coefficient step's count and its tensors (first and second
        moments and the cycle's start per layer, CPU copies) when ``step_rule="coefficient"``.
        """
        state: dict[str, Any] = {
            "num_steps": self.num_steps,
            "num_truncations": self._num_truncations,
            "base_ranks": [self._base_ranks.get(i, a.rank) for i, a in enumerate(self.adapters)],
            "open_cycle": self._open_cycle,
            "cycle_origin": self.schedule.origin,
            "history_offset": self._history_offset,
            "rank_history": {k: [list(e) for e in v] for k, v in self.rank_history().items()},
            "step_rule": self.config.step_rule,
        }
        if self._coefficients is not None:
            state["coefficient"] = self._coefficients.state_dict([a.name for a in self.adapters])
        if self._cycle_start is not None:  # saved beside the coefficient rule's tensors, in the same file
            tensors = {
                f"{a.name}.cycle_start": S0.detach().cpu().clone() for a, S0 in zip(self.adapters, self._cycle_start)
            }
            state["coefficient"] = {"num_steps": 0, "tensors": tensors}
        return state

    def resume_at_step(self, step: int) -> None:
        """Continue a run at optimizer step ``step`` when no allocator state was saved (derives the truncation count).

        With the coefficient rule the moments then restart from zero, so the run continues, but not exactly.
        """
        self.num_steps = step
        self._num_truncations = step // (self.schedule.cycle_length + 1)
        if self._coefficients is not None:
            self._coefficients.num_steps = step
        self._announce_next_step()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_rule = state.get("step_rule", "optimizer")
        if saved_rule != self.config.step_rule:
            raise ValueError(
                f"The allocator state was saved with `step_rule={saved_rule!r}` but this allocator uses "
                f"`step_rule={self.config.step_rule!r}`; resume with the same rule (RankAllocator(..., "
                f"step_rule={saved_rule!r}))."
            )
        self.num_steps = int(state["num_steps"])
        self._num_truncations = int(state.get("num_truncations", 0))
        self._base_ranks = dict(enumerate(state.get("base_ranks", [])))
        self._open_cycle = bool(state.get("open_cycle", False))
        self.schedule.origin = int(state.get("cycle_origin", 0))
        self._history_offset = int(state.get("history_offset", 0))
        history = state.get("rank_history", {})
        for a in self.adapters:
            a.layer.rank_history[a.adapter] = [tuple(e) for e in history.get(a.name, [])]
        if self._coefficients is not None:
            self._coefficients.load_state_dict(state["coefficient"], [a.name for a in self.adapters])
        if self._cycle_start is not None and "coefficient" in state:  # absent: saved by 0.1.0, at a cycle's end
            tensors = state["coefficient"]["tensors"]
            for a, S0 in zip(self.adapters, self._cycle_start):
                S0.copy_(tensors[f"{a.name}.cycle_start"])
        self._announce_next_step()

    def remove(self) -> None:
        """Detach from the optimizer and the layers (they go back to plain gradients)."""
        self._hook.remove()
        for a in self.adapters:
            a.layer.integrated[a.adapter] = False
            a.layer.basis_gradients[a.adapter] = True
