"""The user's optimizer as the allocator meets it: its parameter groups, its hyperparameters, and its state of the
factors carried through basis changes.

Under the default step rule the user's optimizer holds per-parameter state for the factors. When the bases change,
that state is carried into the new coordinates instead of being reset. Augmentation keeps the old columns, so
their state is kept and the new columns start from zero. Truncation rotates the coefficients by the small SVD
``Ŝ = P Σ Qᵀ``; the gradients then transform as ``∇S → Pᵀ ∇S Q``, ``∇U = G V → (G V) Q``, ``∇V = Gᵀ U → (Gᵀ U) P``.
First moments (``exp_avg``, ``momentum_buffer``) follow these linear maps exactly; second moments
(``exp_avg_sq``, ``max_exp_avg_sq``) follow the same maps with every entry squared, which is exact when the
rotation is a signed permutation and always keeps them non-negative. Other per-parameter state is reset to zero.
Inactive capacity is zero in the factors and in the state. New entries of an augmentation start with the mean
second moment of the established ones (:func:`pad_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


LINEAR_STATE_KEYS = ("exp_avg", "momentum_buffer")
QUADRATIC_STATE_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


def state_tensors(optimizer: Any, p: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
    """The optimizer's per-entry state tensors of ``p`` (those shaped like ``p``); ``optimizer``: a torch optimizer,
    or anything with its ``.state`` mapping (FSDP2: :class:`~peft_geolora.sharding.WholeState`; a wider
    augmentation: :class:`WidenedState`, whose entries are shaped as its ``shape_of`` says)."""
    if hasattr(optimizer, "shape_of"):
        shape = optimizer.shape_of(p)
    else:
        shape = getattr(p, "ds_shape", p.shape)  # DeepSpeed ZeRO-3 leaves an empty placeholder in p itself
    for key, value in optimizer.state.get(p, {}).items():
        if torch.is_tensor(value) and value.shape == shape:
            yield key, value


def pad_state(
    optimizer: Any,
    U: nn.Parameter,
    S: nn.Parameter,
    V: nn.Parameter,
    r: int,
) -> None:
    """Augmentation keeps the old columns: their state stays; beyond rank r the first moments start at zero and the
    second moments at the mean of the established ones (per row of U and V, over S's r × r active block).

    Why not zero: a zero second moment makes Adam's first step of an entry
    ``±λ`` whatever its gradient (``m̂ / √v̂ = g / |g|``), so every cycle's new coefficients would take full-size
    steps in the direction of the latest, noisy gradient: on low-rank fitting that leaves a relative-error floor
    of about 2e-2 at λ = 1e-2. Seeded with the layer's typical second moment, a new entry moves in proportion to
    its gradient, like the established ones.
    """
    for p, is_s in ((U, False), (S, True), (V, False)):
        for key, value in state_tensors(optimizer, p):
            if is_s:
                fill = value[:r, :r].mean() if key in QUADRATIC_STATE_KEYS else 0
                value[r:, :] = fill
                value[:, r:] = fill
            else:
                fill = value[:, :r].mean(dim=1, keepdim=True) if key in QUADRATIC_STATE_KEYS else 0
                value[:, r:] = fill


def rotate_states(
    optimizer: Any,
    factors: list[tuple[nn.Parameter, nn.Parameter, nn.Parameter]],
    P: torch.Tensor,
    Q: torch.Tensor,
    ranks: list[int],
    warn: Callable[[str, str], None],
) -> None:
    """Carry the state of a batch of equally shaped adapters into their truncated SVD coordinates.

    ``factors``: (U, S, V) of each adapter; ``P``, ``Q`` (B, k, k): the small SVD ``Ŝ = P Σ Qᵀ`` of each augmented
    coefficient matrix; ``ranks``: the kept rank ``r₁`` of each. The maps are those of the module docstring with
    ``P[:, :r₁]``, ``Q[:, :r₁]``: the columns of ``P`` and ``Q`` beyond each ``r₁`` are zeroed, so one batched
    product per state key gives every adapter's state in its new coordinates, zero beyond ``r₁``, and one fused
    copy writes them all.
    """
    k = Q.shape[-1]
    dropped = torch.arange(k, device=Q.device)[None, :] >= torch.tensor(ranks, device=Q.device)[:, None]  # (B, k)
    P = P.masked_fill(dropped[:, None, :], 0)
    Q = Q.masked_fill(dropped[:, None, :], 0)
    for f, left, right in ((1, P, Q), (0, None, Q), (2, None, P)):
        by_key: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        for b, params in enumerate(factors):
            for key, value in state_tensors(optimizer, params[f]):
                members, values = by_key.setdefault(key, ([], []))
                members.append(b)
                values.append(value)
        for key, (members, values) in by_key.items():
            if key in LINEAR_STATE_KEYS:
                lmap, rmap = left, right
            elif key in QUADRATIC_STATE_KEYS:
                lmap = left.square() if left is not None else None
                rmap = right.square()
            else:
                warn(
                    f"state:{key}",
                    f"GeoLoRA resets the optimizer state `{key}` of the factors when the bases rotate "
                    "(only exp_avg, exp_avg_sq, max_exp_avg_sq and momentum_buffer are carried over).",
                )
                torch._foreach_zero_(values)
                continue
            index = torch.tensor(members, device=rmap.device)
            rmap = rmap[index]
            width = values[0].shape[-1] - k
            if lmap is None:  # U or V: (B, dim, k) @ (B, k, k)
                new = torch.stack([v[:, :k] for v in values]).to(rmap.dtype) @ rmap
                new = torch.nn.functional.pad(new, (0, width))
            else:  # S: (B, k, k)ᵀ @ (B, k, k) @ (B, k, k)
                block = torch.stack([v[:k, :k] for v in values]).to(rmap.dtype)
                new = lmap[index].transpose(-2, -1) @ block @ rmap
                new = torch.nn.functional.pad(new, (0, width, 0, width))
            copy_all(values, list(new.unbind(0)))


class WidenedState:
    """The optimizer's state of some adapters' factors widened to ``width`` columns, as ``.state[param]`` (``U``:
    (m, width), ``S``: (width, width), ``V``: (n, width)), for an augmentation wider than the factors' storage.

    With ``cycle_length=0`` every step augments and truncates at once, so the augmented adapter (rank r + k, up to
    ``2 · max_rank``) lives only inside one allocator step, wider than the factors' ``max_rank`` columns. Its
    state lives here between :func:`pad_state` and :func:`rotate_states`; :meth:`write_back` keeps the first columns
    that fit the storage (the truncation's kept ranks, zero beyond) and writes them into ``base``'s state (then
    ``base.write_back()``, where ``base`` gathered sharded state whole).

    ``factors``: (U, S, V) of each adapter; ``base``: the optimizer, or a whole-state view of it.
    """

    def __init__(self, base: Any, factors: list[tuple[nn.Parameter, nn.Parameter, nn.Parameter]], width: int) -> None:
        self.base = base
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self._shapes: dict[nn.Parameter, tuple[int, int]] = {}
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        for U, S, V in factors:
            for p, square in ((U, False), (S, True), (V, False)):
                entries = {}
                for key, value in state_tensors(base, p):
                    rows, cols = value.shape
                    wide = value.new_zeros((width if square else rows, width))
                    wide[:rows, :cols] = value
                    entries[key] = wide
                    self._targets.append((value, wide))
                self.state[p] = entries
                self._shapes[p] = (width, width) if square else (getattr(p, "ds_shape", p.shape)[0], width)

    def shape_of(self, p: nn.Parameter) -> tuple[int, int]:
        return self._shapes[p]

    def write_back(self) -> None:
        copy_all([t for t, _ in self._targets], [w[: t.shape[0], : t.shape[1]] for t, w in self._targets])
        if hasattr(self.base, "write_back"):
            self.base.write_back()


def copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``target.copy_(source)`` (with a cast to the target's dtype) for every pair, one fused copy per device."""
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for target, source in zip(targets, sources):
        group = by_device.setdefault(target.device, ([], []))
        group[0].append(target)
        group[1].append(source)
    for group_targets, group_sources in by_device.values():
        torch._foreach_copy_(group_targets, group_sources)


def copy_into(buffers: Optional[list[torch.Tensor]], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` in ``buffers``, reused unless absent (first step), or the shapes changed (a rank did) or
    the model was moved or cast since; one fused copy (:func:`copy_all`)."""
    if buffers is None or any(
        b.shape != t.shape or b.device != t.device or b.dtype != t.dtype for b, t in zip(buffers, tensors)
    ):
        buffers = [torch.empty_like(t) for t in tensors]
    copy_all(buffers, tensors)
    return buffers


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
