"""The rank rule on its own (peft_geolora.truncation): spectra in, kept ranks out."""

from __future__ import annotations

import torch

from peft_geolora import GeoLoraConfig
from peft_geolora.truncation import Spectrum, kept_ranks


def _spectrum(members: list[int], sigmas: list[list[float]], S0: list[list[float]] | None = None) -> Spectrum:
    """Diagonal coefficients (P = Q = I), so σ and the growth along each direction are read off directly."""
    S = torch.stack([torch.diag(torch.tensor(s, dtype=torch.float64)) for s in sigmas])
    k = S.shape[-1]
    eye = torch.eye(k, dtype=torch.float64).expand(len(members), k, k)
    start = None if S0 is None else torch.stack([torch.diag(torch.tensor(s, dtype=torch.float64)) for s in S0])
    return Spectrum(members, S, eye, S.diagonal(dim1=-2, dim2=-1), eye, start)


def _config(**options) -> GeoLoraConfig:
    return GeoLoraConfig(target_modules=["lin"], **{"min_rank": 1, "max_rank": 8, "growth_tol": None, **options})


def test_tau_rule_keeps_the_smallest_rank_whose_tail_is_within_tau() -> None:
    # ‖σ‖ = 10.25. tau 0.3 allows a tail of 3.07: ‖(2, 1, 0.1)‖ = 2.24 fits, rank 1. tau 0.1 allows 1.025:
    # 2.24 does not fit, ‖(1, 0.1)‖ = 1.005 does, rank 2. tau 0 keeps everything.
    sigma = [10.0, 2.0, 1.0, 0.1]
    assert kept_ranks(_config(tau=0.3), [_spectrum([0], [sigma])], {0: 4}) == {0: 1}
    assert kept_ranks(_config(tau=0.1), [_spectrum([0], [sigma])], {0: 4}) == {0: 2}
    assert kept_ranks(_config(tau=0.0), [_spectrum([0], [sigma])], {0: 4}) == {0: 4}


def test_caps_and_floors_bound_the_rank() -> None:
    sigma = [[10.0, 9.0, 8.0, 7.0], [1.0, 0.0, 0.0, 0.0]]
    ranks = kept_ranks(_config(tau=0.0, min_rank=2), [_spectrum([3, 5], sigma)], {3: 3, 5: 4})
    assert ranks == {3: 3, 5: 2}  # capped at 3; floored at min_rank 2 although σ₂ = 0


def test_growth_test_keeps_a_direction_that_grew_in_the_cycle() -> None:
    sigma = [10.0, 1.0, 0.5]
    # the tau rule alone cuts to rank 1; the third direction grew by 0.5 of a cycle step of norm ‖(0, 0, 0.5)‖ = 0.5
    start = [10.0, 1.0, 0.0]
    assert kept_ranks(_config(tau=0.3), [_spectrum([0], [sigma], [start])], {0: 3}) == {0: 1}
    assert kept_ranks(_config(tau=0.3, growth_tol=0.2), [_spectrum([0], [sigma], [start])], {0: 3}) == {0: 3}
    # without a cycle start (no reference) the growth test does not apply
    assert kept_ranks(_config(tau=0.3, growth_tol=0.2), [_spectrum([0], [sigma])], {0: 3}) == {0: 1}


def test_budget_pools_the_largest_singular_values_over_adapters() -> None:
    spectra = [_spectrum([0, 1], [[5.0, 4.0, 0.5], [3.0, 0.2, 0.1]]), _spectrum([2], [[6.0, 2.0, 1.0]])]
    caps = {0: 3, 1: 3, 2: 3}
    assert kept_ranks(_config(budget=5), spectra, caps) == {0: 2, 1: 1, 2: 2}  # 6, 5, 4, 3, 2
    # in parameters: a rank costs m + n (+ r); adapter 2 is four times as expensive per rank
    costs = {0: 10, 1: 10, 2: 40}
    ranks = kept_ranks(_config(budget=80, budget_unit="params"), spectra, caps, costs)
    assert sum(r * (costs[i] + r) for i, r in ranks.items()) <= 80
    assert ranks[0] >= ranks[2]
