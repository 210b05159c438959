"""Truncation: the small SVD of every adapter's augmented coefficients, and the rank rule that cuts it.

At the last step of a cycle (:mod:`peft_geolora.schedule`) the allocator hands the augmented adapters here in
batches. Every :data:`REORTHONORMALIZE_EVERY`-th truncation first re-orthonormalises the bases; then each adapter's
coefficients are diagonalised, ``Ŝ = P Σ Qᵀ`` (σ: its singular values, in
decreasing order). Each adapter then keeps the leading ``r₁`` directions, where ``r₁`` comes from one of two rules:

* the **tau rule** (``budget=None``, per adapter): the smallest rank whose tail is within ``tau · ‖σ‖``
  (:func:`truncation_rank`); with ``growth_tol`` set, a direction whose singular value grew
  by at least ``growth_tol · ‖ΔŜ‖_F`` during the cycle is kept too (``ΔŜ = Ŝ − Ŝ₀``, the cycle's step;
  :func:`protected_truncation_rank`);
* the **global budget** (``budget``): the largest singular values over all adapters, pooled, until the budget in
  ranks or parameters is spent (:func:`global_budget_ranks`).

Either way a rank stays within ``[min(min_rank, cap), cap]`` with ``cap = min(max_rank, capacity)``; during the warm-up
and after the freeze the ranks stay as they were and only the bases rotate. :func:`truncate` returns the rotated
bases ``Û P``, ``V̂ Q``, the spectra and the kept ranks; it neither reads nor writes parameters (the allocator does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from . import integrator
from .adapters import Batch
from .config import GeoLoraConfig


# At the first truncation and then every this many, the augmented bases are re-orthonormalised (QR, folded into S):
# this removes the rounding of factors that were created in a low-precision base model's dtype before PEFT upcast
# them, and the drift that repeated rotations accumulate (about 1e-8 per rotation in fp32).
REORTHONORMALIZE_EVERY = 25


def truncation_rank(
    sigma: torch.Tensor,
    tau: float,
    min_rank: int | torch.Tensor,
    max_rank: int | torch.Tensor,
    abs_tol: float = 0.0,
) -> torch.Tensor:
    r"""The smallest rank whose discarded tail is within the relative tolerance.

    .. math::  r_1 = \min\{ k : \lVert \sigma_{k+1:} \rVert_2 \le \tau \lVert \sigma \rVert_2 \}

    computed with a reversed cumulative sum (no loop over singular values); singular values at or below
    ``abs_tol`` are discarded as well; the result is clamped to ``[min_rank, max_rank]`` and to ``k``.

    Parameters
    ----------
    sigma : (..., k), non-negative, descending
    tau : relative tolerance in [0, 1); 0 keeps every non-zero value
    min_rank, max_rank : int or (...) integer tensors

    Returns
    -------
    r₁ : (...) int64
    """
    squares = sigma.square()
    tail = squares.flip(-1).cumsum(-1).flip(-1)  # (..., k): tail[j] = Σ_{i ≥ j} σ_i²
    threshold = (tau * tau) * tail[..., :1]  # (..., 1): τ² ‖σ‖²
    rank = (tail > threshold).sum(-1)  # tail is non-increasing: count = first index that passes
    rank = torch.minimum(rank, (sigma > abs_tol).sum(-1))
    k = sigma.shape[-1]
    lo = torch.as_tensor(min_rank, device=sigma.device).clamp(max=k)
    hi = torch.as_tensor(max_rank, device=sigma.device).clamp(max=k)
    return torch.maximum(torch.minimum(rank, hi), lo).to(torch.int64)


def global_budget_ranks(
    sigmas: Sequence[torch.Tensor],
    budget: int,
    floors: Sequence[int],
    caps: Sequence[int],
    costs: Optional[Sequence[int]] = None,
) -> list[int]:
    r"""Ranks of several adapters under one budget on their pooled singular values.

    Each adapter ℓ first keeps its floor ``f_ℓ = min(floors[ℓ], caps[ℓ], len(sigmas[ℓ]))`` values; the rest of
    the budget goes to the largest pooled values (ties broken by adapter index, then position, so the
    result is deterministic), no adapter exceeding ``caps[ℓ]``.

    * ``costs is None``: the budget counts singular values, ``Σ_ℓ r_ℓ ≤ budget``; the kept set is exactly
      the ``budget − Σ f_ℓ`` largest values after the floors.
    * ``costs[ℓ] = m_ℓ + n_ℓ``: the budget counts trainable parameters ``Σ_ℓ r_ℓ (m_ℓ + n_ℓ + r_ℓ)``; the
      j-th value (0-based) of adapter ℓ costs ``m_ℓ + n_ℓ + 2 j + 1``, and the longest prefix of the
      descending order that fits is kept.

    The floors are kept even when they alone exceed the budget.

    Parameters
    ----------
    sigmas : L tensors of shape (k_ℓ,), each descending
    budget : singular values, or parameters when ``costs`` is given
    floors, caps : L ints
    costs : L ints, or None

    Returns
    -------
    L ranks (Python ints)
    """
    lengths = torch.tensor([s.shape[-1] for s in sigmas], dtype=torch.int64)
    values = torch.cat([s.detach().to("cpu", torch.float64) for s in sigmas])  # (Σ k_ℓ,)
    layer = torch.repeat_interleave(torch.arange(len(sigmas)), lengths)  # (Σ k_ℓ,)
    pos = torch.arange(values.numel()) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    caps_t = torch.minimum(torch.tensor(list(caps), dtype=torch.int64), lengths)
    floors_t = torch.minimum(torch.tensor(list(floors), dtype=torch.int64), caps_t)

    eligible = (pos >= floors_t[layer]) & (pos < caps_t[layer])
    candidates = torch.nonzero(eligible).squeeze(-1)  # already ordered by (layer, pos)
    order = candidates[torch.argsort(-values[candidates], stable=True)]  # descending, ties by (layer, pos)

    if costs is None:
        n_keep = max(int(budget) - int(floors_t.sum()), 0)
    else:
        cost_t = torch.tensor(list(costs), dtype=torch.int64)
        spent = int((floors_t * (cost_t + floors_t)).sum())
        unit_cost = cost_t[layer[order]] + 2 * pos[order] + 1  # marginal cost of each candidate
        n_keep = int((unit_cost.cumsum(0) <= int(budget) - spent).sum())
    extra = torch.bincount(layer[order[:n_keep]], minlength=len(sigmas))
    return (floors_t + extra).tolist()


def growth_along(P: torch.Tensor, dS: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    r"""How much the cycle's step ``ΔS`` grew each singular direction: ``g_j = p_jᵀ ΔS q_j``.

    Shapes: P (..., a, k), dS (..., a, b), Q (..., b, k) → (..., k).
    """
    return ((P.transpose(-2, -1) @ dS) * Q.transpose(-2, -1)).sum(-1)


def protected_truncation_rank(
    sigma: torch.Tensor,
    growth: torch.Tensor,
    step_norm: torch.Tensor,
    tau: float,
    growth_tol: Optional[float],
    min_rank: int | torch.Tensor,
    max_rank: int | torch.Tensor,
    abs_tol: float = 0.0,
) -> torch.Tensor:
    r"""The tau rule, except that directions which grew fast in this cycle are kept.

    .. math::  r_1 = \max\bigl(r_\tau,\; 1 + \max\{ j : g_j \ge \theta \lVert \Delta S \rVert_F \}\bigr)

    where ``r_τ`` is :func:`truncation_rank`, ``g = growth_along(P, ΔS, Q)`` and ``θ = growth_tol``. Why: a
    direction that has just entered has had one cycle to grow, at the optimizer's speed (about λ per step under
    Adam), while the established values had all of training; judged by ``τ ‖σ‖`` alone it is cut however
    consistently the gradient points to it, and the rank freezes. Its growth is judged against the cycle's own
    step instead, a comparison of like with like that does not depend on λ or on the gradient's scale; at most
    ``1/θ²`` directions can pass it, so noise cannot inflate the rank. A kept direction keeps every larger value
    too (the kept set stays a prefix of the spectrum). Clamped to ``[min_rank, max_rank]``.

    Parameters
    ----------
    sigma, growth : (..., k); step_norm : (...), ``‖ΔS‖_F``
    growth_tol : θ in (0, 1], or None for the tau rule alone

    Returns
    -------
    r₁ : (...) int64
    """
    rank = truncation_rank(sigma, tau, min_rank, max_rank, abs_tol)
    if growth_tol is None:
        return rank
    k = sigma.shape[-1]
    grew = (growth >= growth_tol * step_norm[..., None]) & (step_norm[..., None] > 0) & (sigma > abs_tol)
    positions = torch.arange(1, k + 1, device=sigma.device)
    protected = torch.where(grew, positions, torch.zeros_like(positions)).amax(-1)  # (...) 1 + last grown index
    hi = torch.as_tensor(max_rank, device=sigma.device).clamp(max=k)
    return torch.maximum(rank, torch.minimum(protected, hi)).to(torch.int64)


@dataclass
class Spectrum:
    """The truncation's view of B equally shaped adapters (one batch of the allocator).

    ``members``: the adapters' indices; ``S`` (B, k, k): their coefficients; ``P`` (B, k, k), ``sigma`` (B, k),
    ``Q`` (B, k, k): its SVD; ``S0`` (B, k, k): the coefficients at the cycle's start (the growth test's reference),
    or None where the rule keeps none.
    """

    members: list[int]
    S: torch.Tensor
    P: torch.Tensor
    sigma: torch.Tensor
    Q: torch.Tensor
    S0: Optional[torch.Tensor] = None


def kept_ranks(
    config: GeoLoraConfig, spectra: list[Spectrum], caps: dict[int, int], costs: Optional[dict[int, int]] = None
) -> dict[int, int]:
    """The rank ``r₁`` every adapter keeps: the tau rule (with the growth test where ``S0`` is known) or the budget.

    Parameters
    ----------
    config : ``tau``, ``abs_tol``, ``growth_tol``, ``min_rank``, ``budget`` are read from it
    spectra : the adapters, batched by shape
    caps : adapter index → the largest rank it may keep, ``min(max_rank, capacity)``
    costs : adapter index → ``m + n`` (the parameters a rank costs); read when ``budget_unit="params"``
    """
    if config.budget is None:
        return _tau_ranks(config, spectra, caps)
    return _budget_ranks(config, spectra, caps, costs)


def _tau_ranks(config: GeoLoraConfig, spectra: list[Spectrum], caps: dict[int, int]) -> dict[int, int]:
    ranks: dict[int, int] = {}
    for item in spectra:
        cap = torch.tensor([caps[i] for i in item.members])
        floors = torch.minimum(torch.full_like(cap, config.min_rank), cap)
        if item.S0 is not None:
            dS = item.S - item.S0  # this cycle's step of the coefficients
            growth = growth_along(item.P, dS, item.Q)
            step_norm = torch.linalg.matrix_norm(dS)
            chosen = protected_truncation_rank(
                item.sigma, growth, step_norm, config.tau, config.growth_tol, floors, cap, config.abs_tol
            )
        else:
            chosen = truncation_rank(item.sigma, config.tau, floors, cap, config.abs_tol)
        ranks.update(zip(item.members, chosen.tolist()))
    return ranks


def _budget_ranks(
    config: GeoLoraConfig, spectra: list[Spectrum], caps: dict[int, int], costs: Optional[dict[int, int]]
) -> dict[int, int]:
    order, sigmas = [], []
    for item in spectra:
        for b, i in enumerate(item.members):
            order.append(i)
            s = item.sigma[b]
            sigmas.append(s[s > config.abs_tol] if config.abs_tol > 0 else s)
    cap = [caps[i] for i in order]
    floors = [min(config.min_rank, c) for c in cap]
    unit_costs = [costs[i] for i in order] if config.budget_unit == "params" else None
    return dict(zip(order, global_budget_ranks(sigmas, config.budget, floors, cap, unit_costs)))


@dataclass
class Truncated:
    """One batch after its truncation: ``U`` (B, m, k) = ``Û P`` and ``V`` (B, n, k) = ``V̂ Q`` (to be cut to
    ``ranks``),
    the SVD ``Ŝ = P Σ Qᵀ`` (P, Q (B, k, k), sigma (B, k)), and the rank each member keeps."""

    batch: Batch
    U: torch.Tensor
    V: torch.Tensor
    P: torch.Tensor
    sigma: torch.Tensor
    Q: torch.Tensor
    ranks: list[int]


def reorthonormalize(batch: Batch) -> None:
    """Re-orthonormalise a batch's bases in place (:func:`peft_geolora.integrator.reorthonormalize`), carrying its
    first moment and its cycle's start into the same coordinates as ``S``."""
    U, S, V = batch.U, batch.S, batch.V
    batch.U, batch.S, batch.V = integrator.reorthonormalize(U, S, V)
    if batch.M is not None:
        _, batch.M, _ = integrator.reorthonormalize(U, batch.M, V)
    if batch.S0 is not None:
        _, batch.S0, _ = integrator.reorthonormalize(U, batch.S0, V)


def truncate(
    config: GeoLoraConfig,
    batches: list[Batch],
    caps: dict[int, int],
    costs: Optional[dict[int, int]],
    fixed_ranks: Optional[dict[int, int]],
    reorthonormalize_first: bool,
) -> list[Truncated]:
    """SVD every batch's coefficients and decide the kept ranks: ``fixed_ranks`` where ranks may not change (warm-up,
    freeze), else :func:`kept_ranks` (``caps``, ``costs`` as there)."""
    if reorthonormalize_first:
        for batch in batches:
            reorthonormalize(batch)
    spectra = [integrator.small_svd(batch.S) for batch in batches]  # (P, sigma, Q) per batch
    if fixed_ranks is None:
        views = [Spectrum(b.members, b.S, P, sigma, Q, b.S0) for b, (P, sigma, Q) in zip(batches, spectra)]
        ranks = kept_ranks(config, views, caps, costs)
    else:
        ranks = fixed_ranks
    out = []
    for batch, (P, sigma, Q) in zip(batches, spectra):
        U, V = integrator.rotate_factors(batch.U, batch.V, P, Q)
        out.append(Truncated(batch, U, V, P, sigma, Q, [ranks[i] for i in batch.members]))
    return out
