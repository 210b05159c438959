"""The rank rule: how many singular directions each adapter keeps when its cycle is truncated.

At a truncation every adapter's coefficients have been diagonalised, ``Ŝ = P Σ Qᵀ`` (σ: its singular values, in
decreasing order). Each adapter then keeps the leading ``r₁`` directions, where ``r₁`` comes from one of two rules:

* the **tau rule** (``budget=None``, per adapter): the smallest rank whose tail is within ``tau · ‖σ‖``
  (:func:`peft_geolora.integrator.truncation_rank`); with ``growth_tol`` set, a direction whose singular value grew
  by at least ``growth_tol · ‖ΔŜ‖_F`` during the cycle is kept too (``ΔŜ = Ŝ − Ŝ₀``, the cycle's step;
  :func:`peft_geolora.integrator.protected_truncation_rank`);
* the **global budget** (``budget``): the largest singular values over all adapters, pooled, until the budget in
  ranks or parameters is spent (:func:`peft_geolora.integrator.global_budget_ranks`).

Either way a rank stays within ``[min(min_rank, cap), cap]`` with ``cap = min(max_rank, capacity)``. The functions
here take the spectra and return ranks; they neither read nor write factors (the allocator does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import integrator
from .config import GeoLoraConfig


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
            growth = integrator.growth_along(item.P, dS, item.Q)
            step_norm = torch.linalg.matrix_norm(dS)
            chosen = integrator.protected_truncation_rank(
                item.sigma, growth, step_norm, config.tau, config.growth_tol, floors, cap, config.abs_tol
            )
        else:
            chosen = integrator.truncation_rank(item.sigma, config.tau, floors, cap, config.abs_tol)
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
    return dict(zip(order, integrator.global_budget_ranks(sigmas, config.budget, floors, cap, unit_costs)))
