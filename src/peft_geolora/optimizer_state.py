"""Carrying the user's optimizer state of ``U``, ``S``, ``V`` through basis changes (``step_rule="optimizer"``).

With the 0.1.0 step rule the user's optimizer holds per-parameter state for the factors. When the bases change,
that state is carried into the new coordinates instead of being reset. Augmentation keeps the old columns, so
their state is kept and the new columns start from zero. Truncation rotates the coefficients by the small SVD
``Ŝ = P Σ Qᵀ``; the gradients then transform as ``∇S → Pᵀ ∇S Q``, ``∇U = G V → (G V) Q``, ``∇V = Gᵀ U → (Gᵀ U) P``.
First moments (``exp_avg``, ``momentum_buffer``) follow these linear maps exactly; second moments
(``exp_avg_sq``, ``max_exp_avg_sq``) follow the same maps with every entry squared, which is exact when the
rotation is a signed permutation and always keeps them non-negative. Other per-parameter state is reset to zero.
Inactive capacity is zero in the factors and in the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .coefficient_optimizer import group_index_of


LINEAR_STATE_KEYS = ("exp_avg", "momentum_buffer")
# optimizers whose state layout (step, exp_avg, exp_avg_sq, max_exp_avg_sq) seed_fresh_state writes
PRIOR_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
QUADRATIC_STATE_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


def state_tensors(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
    """The optimizer's per-entry state tensors of ``p`` (those shaped like ``p``)."""
    for key, value in optimizer.state.get(p, {}).items():
        if torch.is_tensor(value) and value.shape == p.shape:
            yield key, value


def pad_state(
    optimizer: torch.optim.Optimizer,
    U: nn.Parameter,
    S: nn.Parameter,
    V: nn.Parameter,
    r: int,
    seed_second_moments: bool = False,
) -> None:
    """Augmentation keeps the old columns: their state stays, everything beyond rank r starts at zero.

    ``seed_second_moments`` (``moment_init="mean"`` or ``"prior"``): the new rows and columns of S's second moments
    start at the mean of the r × r active block instead. A zero second moment makes Adam's first step of an entry
    ``±λ`` whatever its gradient (``m̂ / √v̂ = g / |g|``), so every cycle's new coefficients would take full-size
    steps in the direction of the latest, noisy gradient: on low-rank fitting that leaves a relative-error floor
    of about 2e-2 at λ = 1e-2. Seeded with the layer's typical second moment, a new entry moves in proportion to
    its gradient, like the established ones.
    """
    for p, is_s in ((U, False), (S, True), (V, False)):
        for key, value in state_tensors(optimizer, p):
            if is_s:
                fill = value[:r, :r].mean() if seed_second_moments and key in QUADRATIC_STATE_KEYS else 0
                value[r:, :] = fill
                value[:, r:] = fill
            else:
                fill = (
                    value[:, :r].mean(dim=1, keepdim=True)
                    if seed_second_moments and key in QUADRATIC_STATE_KEYS
                    else 0
                )
                value[:, r:] = fill


def rotate_states(
    optimizer: torch.optim.Optimizer,
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


def copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``target.copy_(source)`` (with a cast to the target's dtype) for every pair, one fused copy per device."""
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for target, source in zip(targets, sources):
        group = by_device.setdefault(target.device, ([], []))
        group[0].append(target)
        group[1].append(source)
    for group_targets, group_sources in by_device.values():
        torch._foreach_copy_(group_targets, group_sources)


def seed_fresh_state(
    optimizer: torch.optim.Optimizer, U: nn.Parameter, S: nn.Parameter, V: nn.Parameter, r: int
) -> None:
    r"""``moment_init="prior"``: Adam's state of a factor that has none yet starts from one pseudo-observation.

    Called before the optimizer's first step of the factors (their gradients are set, their state is empty). A fresh
    Adam state makes the first step ``λ m̂ / √v̂ = λ g / |g|``: every entry of ``U``, ``S``, ``V`` moves by ``±λ``
    whatever its gradient, so an adapter created at a large initial rank starts with a full-size random-sign
    matrix in all its r² coefficients and r new directions per basis. Here the second moment starts at

    .. math::  v_0 = \frac{1 - \beta_2}{\beta_2} \, \overline{g^2}

    (the mean over the active r columns of each row of ``U`` and ``V``, over the r × r active block of ``S``), so
    after Adam's bias correction ``v̂₁ = g² + \overline{g^2}`` and the first step is ``λ g / √(g² + \overline{g^2})``:
    in proportion to the gradient where it is small, at most ``λ``. The pseudo-observation fades like an ordinary
    one (about ``\overline{g^2} / t`` in ``v̂_t``). Only ``torch.optim.Adam`` / ``AdamW`` without ``fused`` or
    ``capturable`` are seeded (their state layout is known); other optimizers start as they always do.
    """
    if type(optimizer) not in PRIOR_OPTIMIZERS:
        return
    for p, is_s in ((U, False), (S, True), (V, False)):
        if p.grad is None or type(p.grad) is not torch.Tensor or optimizer.state.get(p):
            continue
        group = optimizer.param_groups[group_index_of(optimizer, p)]
        if group.get("fused") or group.get("capturable") or group.get("differentiable"):
            continue
        beta2 = float(group["betas"][1])
        square = p.grad.detach().square()
        v0 = torch.zeros_like(p, memory_format=torch.preserve_format)
        if is_s:
            v0[:r, :r] = square[:r, :r].mean()
        else:
            v0[:, :r] = square[:, :r].mean(dim=1, keepdim=True)
        v0.mul_((1 - beta2) / beta2)
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state = {
            "step": torch.tensor(0.0, dtype=scalar),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": v0,
        }
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        optimizer.state[p] = state
