"""The integrator's pure math against dense linear algebra on small matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_geolora import integrator as I
from peft_geolora import truncation as T
from peft_geolora.gradients import GeoLoraFunction

from .helpers import orthonormality_error


def _orthonormal(rows: int, cols: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return I.sign_fixed_qr(torch.randn(rows, cols, generator=g, dtype=dtype))[0]


def _tangent_projection(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``P_T(G) = U Uᵀ G + G V Vᵀ − U Uᵀ G V Vᵀ``: projection onto the tangent space at ``U S Vᵀ``."""
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


@pytest.mark.parametrize("integrated, bases", [(True, True), (False, True), (True, False)])
def test_factor_gradients_match_dense(integrated: bool, bases: bool) -> None:
    """K-, L- and S-gradients (allocator), Euclidean ones (no allocator), or only S's (an S-only step: zeros)."""
    m, n, r, s = 7, 5, 3, 0.7
    torch.manual_seed(0)
    U, V = _orthonormal(m, r, seed=1), _orthonormal(n, r, seed=2)
    S = torch.randn(r, r, dtype=torch.float64)
    x = torch.randn(4, 6, n, dtype=torch.float64)
    weights = torch.randn(4, 6, m, dtype=torch.float64)

    # dense reference: y = s x Wᵀ with W = U S Vᵀ
    W = (U @ S @ V.T).requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    ((s * xd @ W.T) * weights).sum().backward()
    G = W.grad  # ∂loss/∂W, includes s

    Uf, Sf, Vf, xf = (t.clone().requires_grad_(True) for t in (U, S, V, x))
    y = GeoLoraFunction.apply(xf, Uf, Sf, Vf, s, integrated, bases)
    (y * weights).sum().backward()

    torch.testing.assert_close(y, s * x @ (U @ S @ V.T).T, atol=1e-12, rtol=0)
    torch.testing.assert_close(xf.grad, xd.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(Sf.grad, U.T @ G @ V, atol=1e-10, rtol=0)
    if not bases:  # nothing read on an S-only step: zeros, not computed
        assert torch.equal(Uf.grad, torch.zeros_like(U)) and torch.equal(Vf.grad, torch.zeros_like(V))
    elif integrated:  # the K- and L-gradients
        torch.testing.assert_close(Uf.grad, G @ V, atol=1e-10, rtol=0)
        torch.testing.assert_close(Vf.grad, G.T @ U, atol=1e-10, rtol=0)
    else:  # the Euclidean gradients of U S Vᵀ
        torch.testing.assert_close(Uf.grad, G @ V @ S.T, atol=1e-10, rtol=0)
        torch.testing.assert_close(Vf.grad, G.T @ U @ S, atol=1e-10, rtol=0)


@pytest.mark.parametrize("m, n, r", [(12, 9, 3), (20, 20, 5), (9, 30, 4)])
def test_augmented_adapter_is_projected_gradient_step(m: int, n: int, r: int) -> None:
    """Before truncation, ``Û Ŝ V̂ᵀ = W − λ P_T(W) G`` (Algorithm 1 with SGD), to 1e-10 in fp64."""
    torch.manual_seed(m + n + r)
    U, V = _orthonormal(m, r, seed=3), _orthonormal(n, r, seed=4)
    S = torch.diag(torch.rand(r, dtype=torch.float64) + 0.5)
    G = torch.randn(m, n, dtype=torch.float64)
    lam = 0.3
    dU, dV, S_new = -lam * G @ V, -lam * G.T @ U, S - lam * U.T @ G @ V  # what SGD proposes

    U_t, V_t = I.augment_basis(U, dU), I.augment_basis(V, dV)
    S_hat = I.assemble_coefficients(S_new, U_t, dU, V_t, dV)
    U_hat, V_hat = torch.cat([U, U_t], -1), torch.cat([V, V_t], -1)

    expected = U @ S @ V.T - lam * _tangent_projection(U, V, G)
    torch.testing.assert_close(U_hat @ S_hat @ V_hat.T, expected, atol=1e-10, rtol=0)
    assert orthonormality_error(U_hat) < 1e-12 and orthonormality_error(V_hat) < 1e-12
    assert torch.equal(U_hat[:, :r], U)  # the old columns are kept bit for bit


def test_augmentation_of_rank_deficient_block_keeps_orthonormal_columns() -> None:
    U = _orthonormal(10, 3)
    for dU in (torch.zeros(10, 3, dtype=torch.float64), U @ torch.randn(3, 3, dtype=torch.float64)):
        U_t = I.augment_basis(U, dU)
        assert U_t.shape == (10, 3)
        assert orthonormality_error(torch.cat([U, U_t], -1)) < 1e-12  # no zeroed column


def test_sign_fixed_qr_has_non_negative_diagonal() -> None:
    A = torch.randn(3, 8, 4, dtype=torch.float64)
    A[0, :, 2] = 0  # a zero column: sign(0) taken as +1
    Q, R = I.sign_fixed_qr(A)
    assert (torch.diagonal(R, dim1=-2, dim2=-1) >= 0).all()
    torch.testing.assert_close(Q @ R, A, atol=1e-12, rtol=0)
    assert orthonormality_error(Q[0]) < 1e-12


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.2, 0.5, 0.9])
def test_truncation_is_smallest_rank_within_tolerance(tau: float) -> None:
    torch.manual_seed(1)
    for _ in range(20):
        a, b = 8, 6
        W = torch.randn(a, b, dtype=torch.float64) @ torch.diag(torch.rand(b, dtype=torch.float64) ** 3)
        P, sigma, Q = I.small_svd(W)
        r1 = int(T.truncation_rank(sigma, tau, 1, b))
        W_trunc = P[:, :r1] @ torch.diag(sigma[:r1]) @ Q[:, :r1].T
        norm = torch.linalg.norm(W)
        assert torch.linalg.norm(W_trunc - W) <= tau * norm + 1e-12
        if r1 > 1:  # no smaller rank satisfies it
            W_smaller = P[:, : r1 - 1] @ torch.diag(sigma[: r1 - 1]) @ Q[:, : r1 - 1].T
            assert torch.linalg.norm(W_smaller - W) > tau * norm


def test_truncation_rank_clamps_and_absolute_floor() -> None:
    sigma = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 1e-9, 0.0, 0.0, 0.0]])
    assert T.truncation_rank(sigma, 0.0, 1, 5).tolist() == [5, 2]
    assert T.truncation_rank(sigma, 0.0, 1, 3).tolist() == [3, 2]
    assert T.truncation_rank(sigma, 0.0, 1, 5, abs_tol=1e-6).tolist() == [5, 1]
    assert T.truncation_rank(sigma, 0.9, 2, 5).tolist() == [2, 2]
    assert T.truncation_rank(torch.zeros(4), 0.1, 1, 4).item() == 1  # all-zero spectrum: the floor


def _brute_force_count_budget(sigmas, budget, floors, caps):
    floors = [min(f, c, len(s)) for f, s, c in zip(floors, sigmas, caps)]
    pool = [
        (-float(v), layer, j)
        for layer, s in enumerate(sigmas)
        for j, v in enumerate(s.tolist())
        if floors[layer] <= j < min(caps[layer], len(s))
    ]
    pool.sort()
    kept = pool[: max(budget - sum(floors), 0)]
    return [floors[layer] + sum(1 for _, l2, _ in kept if l2 == layer) for layer in range(len(sigmas))]


def test_global_budget_keeps_the_largest_pooled_values() -> None:
    torch.manual_seed(2)
    for trial in range(30):
        sigmas = [torch.sort(torch.rand(k), descending=True).values for k in (6, 4, 8, 3)]
        if trial % 3 == 0:  # ties across layers
            sigmas = [torch.round(s * 4) / 4 for s in sigmas]
        floors, caps = [1, 2, 0, 1], [5, 4, 8, 2]
        for budget in (0, 3, 7, 12, 40):
            ranks = T.global_budget_ranks(sigmas, budget, floors, caps)
            assert ranks == _brute_force_count_budget(sigmas, budget, floors, caps)
            assert ranks == T.global_budget_ranks(sigmas, budget, floors, caps)  # deterministic
            assert sum(ranks) == min(max(budget, 4), sum(min(c, len(s)) for c, s in zip(caps, sigmas)))


def test_global_budget_in_parameters() -> None:
    sigmas = [torch.tensor([9.0, 1.0, 0.5]), torch.tensor([8.0, 7.0, 6.0])]
    costs = [10 + 20, 5 + 5]  # m + n
    # floors: one value each, 1*(30+1) + 1*(10+1) = 42; next largest: 8→7 (cost 10+2*1+1=13), 6 (10+2*2+1=15)
    assert T.global_budget_ranks(sigmas, 42, [1, 1], [3, 3], costs) == [1, 1]
    assert T.global_budget_ranks(sigmas, 55, [1, 1], [3, 3], costs) == [1, 2]
    assert T.global_budget_ranks(sigmas, 70, [1, 1], [3, 3], costs) == [1, 3]
    ranks = T.global_budget_ranks(sigmas, 200, [1, 1], [3, 3], costs)
    params = sum(r * (c + r) for r, c in zip(ranks, costs))
    assert params <= 200 and ranks == [3, 3]


def test_batched_equals_looped() -> None:
    torch.manual_seed(3)
    B, m, n, r = 5, 16, 12, 3
    U = torch.stack([_orthonormal(m, r, torch.float32, seed=i) for i in range(B)])
    V = torch.stack([_orthonormal(n, r, torch.float32, seed=10 + i) for i in range(B)])
    dU, dV, S = torch.randn(B, m, r), torch.randn(B, n, r), torch.randn(B, r, r)
    U_t, V_t = I.augment_basis(U, dU), I.augment_basis(V, dV)
    S_hat = I.assemble_coefficients(S, U_t, dU, V_t, dV)
    P, sigma, Q = I.small_svd(S_hat)
    ranks = T.truncation_rank(sigma, 0.2, 1, 2 * r)
    for b in range(B):
        u_t, v_t = I.augment_basis(U[b], dU[b]), I.augment_basis(V[b], dV[b])
        s_hat = I.assemble_coefficients(S[b], u_t, dU[b], v_t, dV[b])
        p, s, q = I.small_svd(s_hat)
        torch.testing.assert_close(U_t[b], u_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(S_hat[b], s_hat, atol=1e-6, rtol=0)
        torch.testing.assert_close(sigma[b], s, atol=1e-6, rtol=0)
        torch.testing.assert_close(P[b] @ torch.diag(sigma[b]) @ Q[b].T, p @ torch.diag(s) @ q.T, atol=1e-5, rtol=0)
        assert int(ranks[b]) == int(T.truncation_rank(s, 0.2, 1, 2 * r))


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    r=st.integers(1, 6),
    tau=st.floats(0.0, 0.95),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_one_step_properties(m, n, r, tau, dtype, scale, seed) -> None:
    """Whatever the shapes, tolerance, dtype and gradient scale: no NaN, orthonormal bases, rank in bounds."""
    r = min(r, m, n)
    capacity = min(m, n, 2 * r)
    g = torch.Generator().manual_seed(seed)
    U = I.sign_fixed_qr(torch.randn(m, r, generator=g, dtype=dtype))[0]
    V = I.sign_fixed_qr(torch.randn(n, r, generator=g, dtype=dtype))[0]
    S = torch.diag(torch.rand(r, generator=g, dtype=dtype))
    dU = scale * torch.randn(m, r, generator=g, dtype=dtype)
    dV = scale * torch.randn(n, r, generator=g, dtype=dtype)
    U_t = I.augment_basis(U, dU, max_new=capacity - r)
    V_t = I.augment_basis(V, dV, max_new=capacity - r)
    k = min(U_t.shape[-1], V_t.shape[-1])
    U_t, V_t = U_t[..., :k], V_t[..., :k]
    S_hat = I.assemble_coefficients(S, U_t, dU, V_t, dV)
    P, sigma, Q = I.small_svd(S_hat)
    r1 = int(T.truncation_rank(sigma, tau, 1, r))
    U_new, V_new = I.rotate_factors(torch.cat([U, U_t], -1), torch.cat([V, V_t], -1), P, Q)
    U_new, V_new = U_new[:, :r1], V_new[:, :r1]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.isfinite(U_new).all() and torch.isfinite(V_new).all() and torch.isfinite(sigma).all()
    assert orthonormality_error(U_new) < tol and orthonormality_error(V_new) < tol
    assert 1 <= r1 <= r
    assert (sigma[:-1] >= sigma[1:]).all()


def test_reorthonormalize_keeps_the_product() -> None:
    torch.manual_seed(4)
    U = _orthonormal(10, 4) + 1e-6 * torch.randn(10, 4, dtype=torch.float64)  # drifted bases
    V = _orthonormal(7, 4, seed=5) + 1e-6 * torch.randn(7, 4, dtype=torch.float64)
    S = torch.randn(4, 4, dtype=torch.float64)
    Q_U, S_new, Q_V = I.reorthonormalize(U, S, V)
    torch.testing.assert_close(Q_U @ S_new @ Q_V.T, U @ S @ V.T, atol=1e-12, rtol=0)
    assert orthonormality_error(Q_U) < 1e-14 and orthonormality_error(Q_V) < 1e-14


@pytest.mark.parametrize("m, n, r", [(12, 9, 3), (9, 30, 4)])
def test_coefficient_gradient_step_is_projected_gradient_step(m: int, n: int, r: int) -> None:
    """The coefficient rule with SGD: ``Û (Ŝ − λ Ĝ) V̂ᵀ = W − λ P_T(W) G`` with ``Ĝ`` from the gradients alone."""
    U, V = _orthonormal(m, r, seed=5), _orthonormal(n, r, seed=6)
    S = torch.diag(torch.rand(r, dtype=torch.float64) + 0.5)
    G = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    lam = 0.3
    GV, GtU = G @ V, G.T @ U  # the K- and L-gradients
    U_t, V_t = I.augment_basis(U, GV), I.augment_basis(V, GtU)
    G_hat = I.assemble_coefficients(U.T @ G @ V, U_t, GV, V_t, GtU)
    k = U_t.shape[-1]
    S_pad = torch.nn.functional.pad(S, (0, k, 0, k))
    S_hat, _ = I.sgd_coefficient_step(S_pad, G_hat, torch.zeros_like(S_pad), lam)
    U_hat, V_hat = torch.cat([U, U_t], -1), torch.cat([V, V_t], -1)
    expected = U @ S @ V.T - lam * _tangent_projection(U, V, G)
    torch.testing.assert_close(U_hat @ S_hat @ V_hat.T, expected, atol=1e-10, rtol=0)


def test_sgd_coefficient_step_matches_torch_sgd() -> None:
    S = torch.randn(4, 4, dtype=torch.float64)
    grads = [torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    p = torch.nn.Parameter(S.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01)
    mine, buffer = S.clone(), torch.zeros_like(S)
    for t, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        mine, buffer = I.sgd_coefficient_step(mine, g, buffer, 0.1, 0.9, 0.1, False, 0.01, first_step=(t == 0))
    torch.testing.assert_close(mine, p.detach(), atol=1e-14, rtol=0)


def test_adaptive_step_is_adam_with_one_second_moment() -> None:
    """With a 1 × 1 coefficient matrix the step is exactly torch's Adam/AdamW (one entry = one mean square)."""
    for decoupled, cls in ((False, torch.optim.Adam), (True, torch.optim.AdamW)):
        p = torch.nn.Parameter(torch.tensor([[0.3]], dtype=torch.float64))
        opt = cls([p], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        S, M, v = p.detach().clone(), torch.zeros(1, 1, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for t in range(1, 6):
            g = torch.tensor([[0.5 * (-1) ** t + 0.1 * t]], dtype=torch.float64)
            p.grad = g.clone()
            opt.step()
            S, M, v = I.adaptive_coefficient_step(S, g, M, v, 1, t, 0.05, (0.9, 0.99), 1e-8, 0.1, decoupled)
        torch.testing.assert_close(S, p.detach(), atol=1e-14, rtol=0)


def test_adaptive_step_commutes_with_rotations_and_batches() -> None:
    """Rotating S, Ĝ and M by orthogonal P, Q rotates the step (so M is transported exactly); batched = looped."""
    g = torch.Generator().manual_seed(3)
    S, G, M = (torch.randn(2, 5, 5, dtype=torch.float64, generator=g) for _ in range(3))
    v = torch.rand(2, dtype=torch.float64, generator=g)
    P, Q = _orthonormal(5, 5, seed=8), _orthonormal(5, 5, seed=9)
    args = (25, 4, 0.01, (0.9, 0.999), 1e-8, 0.05, True)
    S1, M1, v1 = I.adaptive_coefficient_step(S, G, M, v, *args)
    S2, M2, v2 = I.adaptive_coefficient_step(P.T @ S @ Q, P.T @ G @ Q, P.T @ M @ Q, v, *args)
    torch.testing.assert_close(S2, P.T @ S1 @ Q, atol=1e-12, rtol=0)
    torch.testing.assert_close(M2, P.T @ M1 @ Q, atol=1e-12, rtol=0)
    torch.testing.assert_close(v2, v1, atol=1e-12, rtol=0)
    looped = [I.adaptive_coefficient_step(S[b], G[b], M[b], v[b], *args)[0] for b in range(2)]
    torch.testing.assert_close(S1, torch.stack(looped), atol=0, rtol=0)


def test_growth_along_is_the_diagonal_of_the_rotated_step() -> None:
    g = torch.Generator().manual_seed(4)
    dS = torch.randn(3, 6, 6, dtype=torch.float64, generator=g)
    P, Q = _orthonormal(6, 4, seed=10), _orthonormal(6, 4, seed=11)
    torch.testing.assert_close(T.growth_along(P, dS, Q), torch.diagonal(P.T @ dS @ Q, dim1=-2, dim2=-1))


def test_protected_truncation_keeps_fast_growing_directions() -> None:
    sigma = torch.tensor([[10.0, 5.0, 0.3, 0.2, 0.01]])  # tau 0.1 keeps 2
    step_norm = torch.tensor([0.5])
    grown = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.01]])  # the third value grew by 60 % of the cycle's step
    assert T.protected_truncation_rank(sigma, grown, step_norm, 0.1, None, 1, 5).tolist() == [2]
    assert T.protected_truncation_rank(sigma, grown, step_norm, 0.1, 0.2, 1, 5).tolist() == [3]
    assert T.protected_truncation_rank(sigma, grown, step_norm, 0.1, 0.7, 1, 5).tolist() == [2]
    assert T.protected_truncation_rank(sigma, grown, step_norm, 0.1, 0.2, 1, 2).tolist() == [2]  # the cap holds
    none = torch.zeros_like(sigma)
    assert T.protected_truncation_rank(sigma, none, torch.tensor([0.0]), 0.1, 0.2, 1, 5).tolist() == [2]


@settings(deadline=None, max_examples=30)
@given(
    size=st.floats(0.01, 200.0),
    rho=st.floats(0.1, 5.0),
    ceiling=st.sampled_from([10.0, 50.0, float("inf")]),
    scale=st.floats(0.05, 4.0),
    decay=st.sampled_from([0.0, 1e-4, 3e-3]),
)
def test_relative_step_scales_the_adaptive_move_between_rho_and_its_ceiling(
    size: float, rho: float, ceiling: float, scale: float, decay: float
) -> None:
    """Below ρ the optimizer's step is untouched; above it the move beyond the decoupled decay is scaled by
    ‖s S₀‖_F / ρ, so ΔW's step is that fraction of ‖ΔW‖_F, up to ρ_max / ρ; batched entries are independent."""
    g = torch.Generator().manual_seed(0)
    S0 = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    S0 = S0 / torch.linalg.matrix_norm(S0, keepdim=True) * torch.tensor([size, size / 1000])[:, None, None] / scale
    adaptive = 1e-3 * torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    kept = 1.0 - decay
    S1 = kept * S0 + adaptive  # what AdamW writes: decay, then the adaptive move

    out = I.relative_step(S0, S1, scale, rho, kept, ceiling)

    for b in range(2):
        gain = min(max(1.0, float(torch.linalg.matrix_norm(scale * S0[b])) / rho), ceiling / rho)
        torch.testing.assert_close(out[b], kept * S0[b] + gain * adaptive[b], rtol=1e-12, atol=1e-15)
    if size / 1000 <= rho:
        assert torch.equal(out[1], S1[1])
