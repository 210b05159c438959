"""``RankAllocator``: after each optimizer step, advance every GeoLoRA adapter and apply the rank rule.

Data flow: batch → forward/backward (the layer exposes the K-, L- and S-gradients) → ``optimizer.step()`` (the
user's optimizer proposes ``U⁺``, ``S⁺``, ``V⁺``) → :meth:`RankAllocator.step` (augment, SVD, truncate with
:mod:`peft_geolora.integrator`) → factors rewritten in place → next batch. The allocator is the only thing that
changes ranks.

Schedules (``schedule``, ``cycle_length`` = c): the optimizer steps are grouped in cycles of c + 1. At the first
step of a cycle the bases are augmented with the optimizer's proposed directions; at the other steps only ``S``
trains (the optimizer's moves of ``U`` and ``V`` are undone); at the last step of a cycle the augmented adapter is
truncated. ``schedule="step"`` is c = 0: augment and truncate at every step (the paper's Algorithm 1).

Optimizer-state policy: when the bases change, the optimizer state of ``U``, ``S``, ``V`` is carried into the new
coordinates instead of being reset. Augmentation keeps the old columns, so their state is kept and the new
columns start from zero. Truncation rotates the coefficients by the small SVD ``Ŝ = P Σ Qᵀ``; the gradients then
transform as ``∇S → Pᵀ ∇S Q``, ``∇U = G V → (G V) Q``, ``∇V = Gᵀ U → (Gᵀ U) P``. First moments (``exp_avg``,
``momentum_buffer``) follow these linear maps exactly; second moments (``exp_avg_sq``, ``max_exp_avg_sq``) follow
the same maps with every entry squared, which is exact when the rotation is a signed permutation (the usual case
for a small step) and always keeps them non-negative. Other per-parameter state is reset to zero (with a warning).
Inactive capacity is zero in the factors and in the state.

Weight decay: the optimizer may decay ``U`` and ``V`` (the Trainer's AdamW does): only the components of the
proposed change orthogonal to the current bases enter the new factors, so decay along the bases is discarded and
``U``, ``V`` stay orthonormal. Decay of ``S`` acts as an ordinary decay of the adapter.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import integrator
from .config import GeoLoraConfig
from .layer import GeoLoraLayer


LINEAR_STATE_KEYS = ("exp_avg", "momentum_buffer")
QUADRATIC_STATE_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
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
)


@dataclass
class _Adapter:
    """One (layer, adapter) pair the allocator drives."""

    name: str
    layer: GeoLoraLayer
    adapter: str

    @property
    def U(self) -> nn.Parameter:
        return self.layer.geolora_U[self.adapter]

    @property
    def S(self) -> nn.Parameter:
        return self.layer.geolora_S[self.adapter]

    @property
    def V(self) -> nn.Parameter:
        return self.layer.geolora_V[self.adapter]

    @property
    def rank(self) -> int:
        return self.layer.rank[self.adapter]

    @property
    def capacity(self) -> int:
        return self.layer.capacity[self.adapter]

    def parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return self.U, self.S, self.V


def _unwrap_peft_model(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate wrappers; return the module that owns the GeoLoRA layers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config")
    ):
        model = model.module
    return model


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    return optimizer


class RankAllocator:
    """Drives the GeoLoRA integrator after every optimizer step and decides the ranks.

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
        a pre-step hook is registered on it to snapshot the factors and check the gradients.
    adapter_name : which adapter to drive; default: the active adapter
    sync_processes : in a distributed run, broadcast factors and ranks from process 0 after every rewrite so
        that all processes hold bit-identical adapters
    **options : overrides of the config's allocator fields (``tau``, ``budget``, ``schedule``, ...)

    Skipped steps (an fp16 GradScaler overflow, accelerate's accumulation micro-steps) never reach the
    optimizer's ``step`` and are skipped here too. A step whose adapter gradients are not finite is undone:
    the factors and their optimizer state are restored bit for bit, with a warning.
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

        self.num_steps = 0
        self._num_truncations = 0
        self._snapshot: Optional[list[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]] = None
        self._state_snapshot: Optional[dict[int, dict[str, Any]]] = None
        self._pending = False
        self._base_ranks: dict[int, int] = {}  # ranks before the last augmentation (kept while ranks are fixed)
        self._open_cycle = False  # augmented, not yet truncated
        self._warned: set[str] = set()
        self._hook = self.optimizer.register_step_pre_hook(self._before_optimizer_step)
        for a in self.adapters:
            a.layer.integrated[a.adapter] = True
        base_model = getattr(peft_model, "base_model", peft_model)
        base_model.__dict__["_geolora_allocator"] = self

    # ------------------------------------------------------------------ checks, hooks and bookkeeping
    def _check_parameters_are_whole(self, model: nn.Module) -> None:
        """The allocator rewrites whole factors in place: sharded ones (FSDP, DeepSpeed ZeRO-3) are refused."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        sharded = isinstance(model, FullyShardedDataParallel) or any(
            isinstance(m, FullyShardedDataParallel) for m in model.modules()
        )
        for a in self.adapters:
            for p in a.parameters():
                sharded |= hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor"
        if sharded:
            raise RuntimeError(
                "GeoLoRA's RankAllocator needs whole (unsharded) factors, but the model is sharded by FSDP or "
                "DeepSpeed ZeRO-3. Train with DDP (accelerate's MULTI_GPU / MULTI_CPU) or DeepSpeed ZeRO-1/2; the "
                "adapters are small, so sharding them saves little."
            )

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

    @torch.no_grad()
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Snapshot the factors; if an adapter gradient is not finite, snapshot the optimizer state too."""
        grads = [p.grad for p in self._factor_params() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        # U and V are needed by every step (augmentation reads the proposed moves, S-only steps undo them); S only
        # when the step is undone.
        self._snapshot = [
            (a.U.detach().clone(), None if finite else a.S.detach().clone(), a.V.detach().clone())
            for a in self.adapters
        ]
        self._state_snapshot = None
        if not finite:
            self._state_snapshot = {
                id(p): copy.deepcopy(self.optimizer.state[p])
                for p in self._factor_params()
                if p in self.optimizer.state
            }
        self._pending = True

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """Advance every adapter after a real optimizer step (a no-op if the optimizer did not step)."""
        if not self._pending:
            return
        self._pending = False
        self.num_steps += 1
        if self._state_snapshot is not None:
            self._undo_step()
            return
        cycle = self._cycle_length()
        position = (self.num_steps - 1) % (cycle + 1)
        if position == 0:
            self._augment(truncate=(cycle == 0))
        else:
            self._restore_bases()
            if position == cycle:
                self._truncate_in_place()
        self._snapshot = None
        self._publish()

    def _publish(self) -> None:
        """After a rewrite: make every process hold process 0's adapters, and tell the layers they are current."""
        if self.sync_processes:
            self._broadcast_from_main_process()
        for a in self.adapters:
            a.layer.mark_allocated(a.adapter)

    def _cycle_length(self) -> int:
        return self.config.cycle_length if self.config.schedule == "cycle" else 0

    def is_augmented(self) -> bool:
        """True between an augmentation and its truncation (cycle schedule): the adapters hold new directions."""
        return self._open_cycle

    @torch.no_grad()
    def finish(self) -> None:
        """End training on a truncation: if a cycle is open, truncate now so the adapters hold their kept ranks.

        Call it once after the last step (the Trainer callback does) before saving; a no-op otherwise.
        """
        if not self.is_augmented():
            return
        self._truncate_in_place()
        self._publish()

    def _ranks_may_change(self) -> bool:
        t = self.num_steps
        return t > self.config.warmup_steps and (self.config.freeze_step is None or t <= self.config.freeze_step)

    def _undo_step(self) -> None:
        for a, (U, S, V) in zip(self.adapters, self._snapshot):
            a.U.copy_(U)
            a.S.copy_(S)
            a.V.copy_(V)
        for p in self._factor_params():
            if id(p) in self._state_snapshot:
                self.optimizer.state[p] = self._state_snapshot[id(p)]
            else:
                self.optimizer.state.pop(p, None)
        self._state_snapshot = None
        self._snapshot = None
        self._warn_once(
            "nonfinite",
            f"GeoLoRA: non-finite adapter gradients at optimizer step {self.num_steps}; the step was undone "
            "(factors and optimizer state restored). Lower the learning rate or use gradient clipping if this repeats.",
        )

    def _restore_bases(self) -> None:
        """S-only step of the cycle schedule: undo the optimizer's moves of U and V."""
        for a, (U, _, V) in zip(self.adapters, self._snapshot):
            a.U.copy_(U)
            a.V.copy_(V)

    def _groups(self) -> dict[tuple, list[int]]:
        """Adapters that can be batched together: equal (m, n, rank, capacity, dtype, device)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, a in enumerate(self.adapters):
            groups[(a.U.shape[0], a.V.shape[0], a.rank, a.capacity, a.U.dtype, a.U.device)].append(i)
        return groups

    def _augment(self, truncate: bool) -> None:
        """Augment every adapter with the optimizer's proposed directions; optionally truncate at once."""
        pending: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._base_ranks = {i: a.rank for i, a in enumerate(self.adapters)}
        for (m, n, r, capacity, dtype, _), members in self._groups().items():
            cd = integrator.compute_dtype(dtype)
            U0 = torch.stack([self._snapshot[i][0][:, :r] for i in members]).to(cd)  # (B, m, r)
            V0 = torch.stack([self._snapshot[i][2][:, :r] for i in members]).to(cd)  # (B, n, r)
            dU = torch.stack([self.adapters[i].U[:, :r] for i in members]).to(cd) - U0  # (B, m, r)
            dV = torch.stack([self.adapters[i].V[:, :r] for i in members]).to(cd) - V0  # (B, n, r)
            S1 = torch.stack([self.adapters[i].S[:r, :r] for i in members]).to(cd)  # (B, r, r)
            U_tilde = integrator.augment_basis(U0, dU, max_new=capacity - r)  # (B, m, p)
            V_tilde = integrator.augment_basis(V0, dV, max_new=capacity - r)  # (B, n, q)
            p, q = U_tilde.shape[-1], V_tilde.shape[-1]
            if p != q:  # a side with no room left: keep the augmented coefficients square
                k = min(p, q)
                U_tilde, V_tilde = U_tilde[..., :k], V_tilde[..., :k]
            S_hat = integrator.assemble_coefficients(S1, U_tilde, dU, V_tilde, dV)  # (B, r + k, r + k)
            U_hat = torch.cat([U0, U_tilde], dim=-1)  # (B, m, r + k)
            V_hat = torch.cat([V0, V_tilde], dim=-1)  # (B, n, r + k)
            for i in members:
                self._pad_optimizer_state(self.adapters[i], r)
            pending.append((members, U_hat, S_hat, V_hat))
        if truncate:
            self._truncate(pending)
        else:
            self._open_cycle = True
            for members, U_hat, S_hat, V_hat in pending:
                for b, i in enumerate(members):
                    self._write(i, U_hat[b], S_hat[b], V_hat[b], record=False)

    def _truncate_in_place(self) -> None:
        """Truncate the (augmented) adapters as they are: SVD of their coefficient matrices."""
        pending = []
        for (m, n, r, capacity, dtype, _), members in self._groups().items():
            cd = integrator.compute_dtype(dtype)
            U = torch.stack([self.adapters[i].U[:, :r] for i in members]).to(cd)
            S = torch.stack([self.adapters[i].S[:r, :r] for i in members]).to(cd)
            V = torch.stack([self.adapters[i].V[:, :r] for i in members]).to(cd)
            pending.append((members, U, S, V))
        self._truncate(pending)

    def _truncate(self, pending: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """SVD of each group's coefficients, the rank rule, and the rewrite of every adapter."""
        self._num_truncations += 1
        if self._num_truncations % REORTHONORMALIZE_EVERY == 1:
            pending = [(members, *integrator.reorthonormalize(U, S, V)) for members, U, S, V in pending]
        spectra = []
        for members, U_hat, S_hat, V_hat in pending:
            P, sigma, Q = integrator.small_svd(S_hat)
            spectra.append((P, sigma, Q))
        ranks = self._decide_ranks(pending, spectra)
        self._open_cycle = False
        for (members, U_hat, _, V_hat), (P, sigma, Q) in zip(pending, spectra):
            U_new, V_new = integrator.rotate_factors(U_hat, V_hat, P, Q)  # (B, m, k), (B, n, k)
            for b, i in enumerate(members):
                r1 = ranks[i]
                self._rotate_optimizer_state(self.adapters[i], P[b], Q[b], r1)
                S_new = torch.diag(sigma[b, :r1])
                self._write(i, U_new[b, :, :r1], S_new, V_new[b, :, :r1])

    def _decide_ranks(self, pending: list, spectra: list) -> dict[int, int]:
        """New rank of every adapter: unchanged (warm-up, frozen), the tau rule, or the global budget."""
        cfg = self.config
        ranks: dict[int, int] = {}
        if not self._ranks_may_change():
            for members, _, _, _ in pending:
                for i in members:
                    ranks[i] = self._base_ranks.get(i, self.adapters[i].rank)
            return ranks
        if cfg.budget is None:
            for (members, _, _, _), (_, sigma, _) in zip(pending, spectra):
                caps = torch.tensor([min(cfg.max_rank, self.adapters[i].capacity) for i in members])
                floors = torch.minimum(torch.full_like(caps, cfg.min_rank), caps)
                chosen = integrator.truncation_rank(sigma, cfg.tau, floors, caps, cfg.abs_tol)
                ranks.update(zip(members, chosen.tolist()))
            return ranks
        order, sigmas = [], []
        for (members, _, _, _), (_, sigma, _) in zip(pending, spectra):
            for b, i in enumerate(members):
                order.append(i)
                s = sigma[b]
                sigmas.append(s[s > cfg.abs_tol] if cfg.abs_tol > 0 else s)
        caps = [min(cfg.max_rank, self.adapters[i].capacity) for i in order]
        floors = [min(cfg.min_rank, c) for c in caps]
        costs = None
        if cfg.budget_unit == "params":
            costs = [self.adapters[i].U.shape[0] + self.adapters[i].V.shape[0] for i in order]
        chosen = integrator.global_budget_ranks(sigmas, cfg.budget, floors, caps, costs)
        ranks.update(zip(order, chosen))
        return ranks

    def _write(self, i: int, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, record: bool = True) -> None:
        """Write new active factors in place (U: m × r₁, S: r₁ × r₁, V: n × r₁) and zero the rest.

        ``record``: a truncation's kept rank goes into the rank history; an augmentation's transient one does not.
        """
        a = self.adapters[i]
        r1 = U.shape[-1]
        a.U[:, :r1] = U.to(a.U.dtype)
        a.S[:r1, :r1] = S.to(a.S.dtype)
        a.V[:, :r1] = V.to(a.V.dtype)
        if record:
            history = a.layer.rank_history.setdefault(a.adapter, [])
            kept = history[-1][1] if history else self._base_ranks.get(i, a.rank)
            if r1 != kept:
                history.append((self.num_steps, r1))
        a.layer.set_rank(a.adapter, r1)

    # ------------------------------------------------------------------ optimizer state
    def _state_tensors(self, p: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
        for key, value in self.optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                yield key, value

    def _pad_optimizer_state(self, a: _Adapter, r: int) -> None:
        """Augmentation keeps the old columns: their state stays, everything beyond rank r starts at zero."""
        for p, is_s in ((a.U, False), (a.S, True), (a.V, False)):
            for _, value in self._state_tensors(p):
                if is_s:
                    value[r:, :] = 0
                    value[:, r:] = 0
                else:
                    value[:, r:] = 0

    def _rotate_optimizer_state(self, a: _Adapter, P: torch.Tensor, Q: torch.Tensor, r1: int) -> None:
        """Carry the state into the truncated SVD coordinates (see the module docstring for the maps)."""
        for p, left, right in ((a.S, P, Q), (a.U, None, Q), (a.V, None, P)):
            for key, value in self._state_tensors(p):
                if key in LINEAR_STATE_KEYS:
                    lmap, rmap = left, right
                elif key in QUADRATIC_STATE_KEYS:
                    lmap = left.square() if left is not None else None
                    rmap = right.square()
                else:
                    self._warn_once(
                        f"state:{key}",
                        f"GeoLoRA resets the optimizer state `{key}` of the factors when the bases rotate "
                        "(only exp_avg, exp_avg_sq, max_exp_avg_sq and momentum_buffer are carried over).",
                    )
                    value.zero_()
                    continue
                cd = rmap.dtype
                if left is None:  # U or V: (dim, k) @ (k, r1)
                    new = value[:, : rmap.shape[0]].to(cd) @ rmap[:, :r1]
                    value.zero_()
                    value[:, :r1] = new.to(value.dtype)
                else:  # S: (r1, a) @ (a, b) @ (b, r1)
                    block = value[: lmap.shape[0], : rmap.shape[0]].to(cd)
                    new = lmap[:, :r1].transpose(0, 1) @ block @ rmap[:, :r1]
                    value.zero_()
                    value[:r1, :r1] = new.to(value.dtype)

    # ------------------------------------------------------------------ distributed
    def _broadcast_from_main_process(self) -> None:
        """Make process 0's factors and ranks authoritative (bit-identical adapters on every process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() < 2:
            return
        try:
            self._broadcast_factors_and_ranks()
        except RuntimeError as exc:  # a peer stopped responding or died: say so instead of a bare gloo/NCCL error
            raise RuntimeError(
                f"GeoLoRA could not synchronise the adapters across processes (this is process "
                f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()}): another process stopped "
                "responding or exited. The wait is bounded "
                "by the process-group timeout (accelerate: InitProcessGroupKwargs(timeout=...)). Cause: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc

    def _broadcast_factors_and_ranks(self) -> None:
        by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for a in self.adapters:
            for t in (a.U, a.S, a.V):
                by_key[(t.dtype, t.device)].append(t)
        for tensors in by_key.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        device = self.adapters[0].U.device
        ranks = torch.tensor([a.rank for a in self.adapters], dtype=torch.int64, device=device)
        torch.distributed.broadcast(ranks, src=0)
        for a, r in zip(self.adapters, ranks.tolist()):
            if r != a.rank:
                a.layer.set_rank(a.adapter, r)

    # ------------------------------------------------------------------ reporting and resume
    def ranks(self) -> dict[str, int]:
        """Active rank of every adapted layer, by module name."""
        return {a.name: a.rank for a in self.adapters}

    def rank_history(self) -> dict[str, list[tuple[int, int]]]:
        """Per layer, the (optimizer step, kept rank) pairs at which a truncation changed its rank."""
        return {a.name: list(a.layer.rank_history.get(a.adapter, [])) for a in self.adapters}

    def total_rank(self) -> int:
        return sum(a.rank for a in self.adapters)

    def num_adapter_parameters(self) -> int:
        """Trainable adapter parameters at the current ranks: Σ r (m + n + r)."""
        return sum(a.layer.num_active_parameters(a.adapter) for a in self.adapters)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the adapter weights: the step count and the rank history."""
        return {
            "num_steps": self.num_steps,
            "num_truncations": self._num_truncations,
            "base_ranks": [self._base_ranks.get(i, a.rank) for i, a in enumerate(self.adapters)],
            "open_cycle": self._open_cycle,
            "rank_history": {k: [list(e) for e in v] for k, v in self.rank_history().items()},
        }

    def resume_at_step(self, step: int) -> None:
        """Continue a run at optimizer step ``step`` when no allocator state was saved (derives the truncation count)."""
        self.num_steps = step
        self._num_truncations = step // (self._cycle_length() + 1)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._num_truncations = int(state.get("num_truncations", 0))
        self._base_ranks = dict(enumerate(state.get("base_ranks", [])))
        self._open_cycle = bool(state.get("open_cycle", False))
        history = state.get("rank_history", {})
        for a in self.adapters:
            a.layer.rank_history[a.adapter] = [tuple(e) for e in history.get(a.name, [])]

    def remove(self) -> None:
        """Detach from the optimizer and the layers (they go back to plain gradients)."""
        self._hook.remove()
        for a in self.adapters:
            a.layer.integrated[a.adapter] = False
