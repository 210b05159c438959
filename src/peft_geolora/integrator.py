r"""GeoLoRA's integrator: the pure tensor math of one step (no ``nn.Module``, no PEFT).

Notation, owned by this module and used throughout the package
---------------------------------------------------------------
An adapter on a frozen weight :math:`W_0` (``m = out_features``, ``n = in_features``) adds

.. math::  \Delta W = s\, U S V^\top,

* ``U`` (m × r) and ``V`` (n × r): orthonormal bases of the output and input side;
* ``S`` (r × r): the coefficient matrix, diagonal right after a truncation;
* ``r``: the active rank; ``s``: a fixed scale (``lora_alpha``; it follows neither the current nor the initial rank);
* ``K = U S`` (m × r) and ``L = V Sᵀ`` (n × r): the factors the projected gradient flow moves in parallel;
* ``G = ∂loss/∂(U S Vᵀ)`` (m × n): the gradient with respect to the product (never formed);
* ``tau``: the relative truncation tolerance of :func:`truncation_rank`.

One GeoLoRA step (Schotthöfer et al., arXiv 2410.18720, Algorithm 1) with learning rate λ:

1. gradients from one backward pass: ``G V`` (the K-gradient), ``Gᵀ U`` (the L-gradient), ``Uᵀ G V``
   (the S-gradient); :class:`GeoLoraFunction` returns them directly, with no ``S⁻¹``;
2. ``S⁺ = S − λ Uᵀ G V``, ``K⁺ = U S − λ G V``, ``L⁺ = V Sᵀ − λ Gᵀ U``;
3. basis augmentation :func:`augment_basis`: ``Û = [U | Ũ]`` with ``Ũ ⊥ U`` spanning the new directions of
   ``K⁺``, likewise ``V̂ = [V | Ṽ]``;
4. the augmented coefficients :func:`assemble_coefficients`
   ``Ŝ = [[S⁺, L⁺ᵀ Ṽ], [Ũᵀ K⁺, 0]]``, so that ``Û Ŝ V̂ᵀ = U S Vᵀ − λ P_T(G)`` (the step projected onto the
   tangent space of the rank-r manifold at ``U S Vᵀ``);
5. the small SVD ``Ŝ = P Σ Qᵀ`` and truncation to ``r₁`` values (:func:`truncation_rank`, or the pooled
   :func:`global_budget_ranks`): ``U ← Û P[:, :r₁]``, ``V ← V̂ Q[:, :r₁]``, ``S ← Σ[:r₁, :r₁]``.

Who moves U, S and V
--------------------
The layer exposes, through :class:`GeoLoraFunction`, the K-gradient ``G V`` as the gradient of ``U``, the
L-gradient ``Gᵀ U`` as that of ``V`` and the S-gradient ``Uᵀ G V`` as that of ``S``. With
``step_rule="coefficient"`` the allocator takes these three gradients before ``optimizer.step()``, augments the
bases with :func:`augment_basis`, assembles the gradient of the augmented coefficients with
:func:`assemble_coefficients` (``Ĝ = [[Uᵀ G V, (Gᵀ U)ᵀ Ṽ], [Ũᵀ G V, 0]]``, the tangent gradient in the augmented
basis) and steps ``Ŝ`` itself: :func:`sgd_coefficient_step` with plain SGD is exactly Algorithm 1;
:func:`adaptive_coefficient_step` is its Adam counterpart with one second moment per adapter, so the coefficients
and the new directions move at one balanced rate and the step commutes with the truncation's rotation. With
``step_rule="optimizer"`` (the default, 0.1.0's rule) the user's optimizer steps ``U``, ``S``, ``V`` and the
allocator reads the proposed changes ``ΔU``, ``ΔV`` in their place (``Ũᵀ ΔU = −λ Ũᵀ G V`` for SGD). With
``step_rule="split"`` (the authors' experiments) the optimizer steps ``S`` only and ``ΔU = −λ G V``,
``ΔV = −λ Gᵀ U`` are a plain gradient step with the optimizer's current learning rate.

All factorizations (QR, SVD) and every rank decision run in :func:`compute_dtype` (fp32, or fp64 for fp64
inputs) whatever the model dtype. Every function is batched over leading ``...`` dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factorizations run in: ``float64`` stays ``float64``, anything else becomes ``float32``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sign_fixed_qr(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Reduced QR with a deterministic sign: ``A = Q R`` with ``diag(R) ≥ 0``.

    Parameters
    ----------
    A : (..., m, k)

    Returns
    -------
    Q : (..., m, min(m, k)), orthonormal columns
    R : (..., min(m, k), k), upper triangular with a non-negative diagonal

    Notes
    -----
    The columns of ``Q`` (and rows of ``R``) are multiplied by :math:`\operatorname{sign}(R_{ii})` with
    ``sign(0)`` taken as ``+1``: a rank-deficient block keeps a valid orthonormal column instead of a zeroed one.
    """
    Q, R = torch.linalg.qr(A, mode="reduced")
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))  # (..., min(m, k))
    return Q * signs.unsqueeze(-2), R * signs.unsqueeze(-1)


def augment_basis(U: torch.Tensor, dU: torch.Tensor, max_new: Optional[int] = None) -> torch.Tensor:
    r"""New orthonormal directions ``Ũ ⊥ U`` such that ``span([U | Ũ]) ⊇ span(dU)``.

    .. math::  [U \mid dU] = Q R, \qquad \tilde U = Q[:, r:]

    The old columns are not recomputed: the augmented basis is ``Û = [U | Ũ]`` with ``U`` bit for bit.

    Parameters
    ----------
    U : (..., m, r), orthonormal columns
    dU : (..., m, k), the proposed change of ``U`` (``−λ G V`` for SGD)
    max_new : keep at most this many new columns (the storage capacity left)

    Returns
    -------
    Ũ : (..., m, p) with ``p = min(k, m − r, max_new)``, orthonormal and orthogonal to ``U``
    """
    r = U.shape[-1]
    Q, _ = sign_fixed_qr(torch.cat([U, dU], dim=-1))  # (..., m, min(m, r + k))
    U_tilde = Q[..., r:]
    if max_new is not None:
        U_tilde = U_tilde[..., :max_new]
    return U_tilde


def assemble_coefficients(
    S_new: torch.Tensor,
    U_tilde: torch.Tensor,
    dU: torch.Tensor,
    V_tilde: torch.Tensor,
    dV: torch.Tensor,
) -> torch.Tensor:
    r"""The coefficient matrix of the augmented adapter, ``Û Ŝ V̂ᵀ``.

    .. math::
        \hat S = \begin{bmatrix} S^+ & \Delta V^\top \tilde V \\ \tilde U^\top \Delta U & 0 \end{bmatrix}

    Because ``Ũ ⊥ U`` and ``Ṽ ⊥ V``, ``Ũᵀ ΔU = Ũᵀ K⁺`` and ``ΔVᵀ Ṽ = L⁺ᵀ Ṽ`` (Algorithm 1, step 5).

    Parameters
    ----------
    S_new : (..., r, r), the stepped coefficients ``S⁺``
    U_tilde : (..., m, p); dU : (..., m, r)
    V_tilde : (..., n, q); dV : (..., n, r)

    Returns
    -------
    Ŝ : (..., r + p, r + q)
    """
    top = torch.cat([S_new, dV.transpose(-2, -1) @ V_tilde], dim=-1)  # (..., r, r + q)
    bottom_left = U_tilde.transpose(-2, -1) @ dU  # (..., p, r)
    zeros = bottom_left.new_zeros(*bottom_left.shape[:-1], V_tilde.shape[-1])  # (..., p, q)
    return torch.cat([top, torch.cat([bottom_left, zeros], dim=-1)], dim=-2)


def small_svd(S_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``Ŝ = P diag(σ) Qᵀ`` in float64 (the matrix is at most 2·max_rank square, so this is cheap).

    Parameters
    ----------
    S_hat : (..., a, b)

    Returns
    -------
    P : (..., a, k), sigma : (..., k) descending, Q : (..., b, k), with ``k = min(a, b)``, in ``S_hat.dtype``
    """
    P, sigma, Qh = torch.linalg.svd(S_hat.to(torch.float64), full_matrices=False)
    dtype = S_hat.dtype
    return P.to(dtype), sigma.to(dtype), Qh.transpose(-2, -1).to(dtype)


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


def adaptive_coefficient_step(
    S: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    num_entries: int,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One Adam step of the coefficient matrix with a single second moment per adapter (rotation-invariant).

    .. math::
        M &\leftarrow \beta_1 M + (1 - \beta_1)\,\hat G, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2)\,\lVert \hat G \rVert_F^2 / N, \\
        S &\leftarrow S - \lambda\, \frac{M / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

    ``v`` is the mean square of the ``N`` tangent entries of ``Ĝ``, one scalar per adapter: every entry of ``Ŝ``,
    old coefficients and new-direction blocks alike, moves at one rate (about λ per entry), and the step
    commutes with the rotations ``Ŝ → Pᵀ Ŝ Q`` of a truncation, so ``M`` is carried over exactly by the same map
    and ``v`` needs no transport. Weight decay: decoupled (AdamW) ``S ← (1 − λ w) S``, or added to the gradient
    (Adam's L2 form).

    Parameters
    ----------
    S, grad, exp_avg : (..., a, b), the coefficients, their gradient ``Ĝ`` and first moment ``M``
    exp_avg_sq : (...), the second moment ``v``
    num_entries : ``N``, the entries of ``Ĝ`` that can be non-zero (the augmentation's zero block excluded)
    step : ``t`` ≥ 1, the number of steps including this one (bias correction)

    Returns
    -------
    S⁺ (..., a, b), M (..., a, b), v (...)
    """
    beta1, beta2 = betas
    if weight_decay and not decoupled_weight_decay:
        grad = grad + weight_decay * S
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    mean_square = grad.square().sum(dim=(-2, -1)) / max(num_entries, 1)  # (...)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * mean_square
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps  # (...)
    if weight_decay and decoupled_weight_decay:
        S = S * (1 - lr * weight_decay)
    S = S - (lr / (1 - beta1**step)) * exp_avg / denom[..., None, None]
    return S, exp_avg, exp_avg_sq


def sgd_coefficient_step(
    S: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    first_step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One SGD step of the coefficient matrix, with ``torch.optim.SGD``'s momentum convention.

    .. math::  g = \hat G + w S,\quad B \leftarrow \mu B + (1 - d)\, g \;(B = g \text{ at the first step}),\quad
               S \leftarrow S - \lambda\, (g + \mu B \text{ if Nesterov else } B)

    With ``momentum = 0`` this is ``S − λ Ĝ``: Algorithm 1 of the paper in the augmented coordinates.

    Shapes: S, grad, momentum_buffer (..., a, b). Returns S⁺ and the buffer, same shapes.
    """
    if weight_decay:
        grad = grad + weight_decay * S
    if momentum:
        momentum_buffer = grad.clone() if first_step else momentum * momentum_buffer + (1 - dampening) * grad
        grad = grad + momentum * momentum_buffer if nesterov else momentum_buffer
    return S - lr * grad, momentum_buffer


def relative_step(
    S0: torch.Tensor,
    S1: torch.Tensor,
    scale: Union[float, torch.Tensor],
    rho: float,
    kept_after_decay: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    r"""An optimizer's step of ``S`` made relative above the adapter size ``ρ``.

    .. math::  g = \max\!\Big(1, \frac{\lVert s S_0 \rVert_F}{\rho}\Big),\qquad
               S \leftarrow d S_0 + g\, (S_1 - d S_0)

    ``S₀`` is ``S`` before the step and ``S₁`` after it; ``d = 1 − λ w`` is the part of ``S₀`` a decoupled weight
    decay keeps (AdamW; 1 otherwise), so only the adaptive move is scaled. Adam moves every entry by about λ whatever
    the adapter's size, so ``ΔW = s U S Vᵀ`` moves by an absolute ``s λ``; scaled by ``g`` it moves in proportion to
    ``‖ΔW‖_F = ‖s S‖_F`` once that exceeds ρ, as the bases' moves already do (``dU`` changes ``ΔW`` by
    ``s dU S Vᵀ``) and as LoRA's factor product does. Below ρ, ``S₁`` is returned unchanged.

    Shapes: S0, S1 (..., a, b) → (..., a, b); ``scale`` and ``kept_after_decay`` numbers or (..., 1, 1).
    """
    norm = torch.linalg.matrix_norm(S0, keepdim=True)  # (..., 1, 1)
    gain = torch.clamp(norm * (scale / rho), min=1.0).to(S1.dtype)
    return torch.lerp(S0 * kept_after_decay, S1, gain)


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


def reorthonormalize(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Remove rounding drift from the bases without changing the product ``U S Vᵀ``.

    .. math::  U = Q_U R_U,\quad V = Q_V R_V \;\Rightarrow\; U S V^\top = Q_U (R_U S R_V^\top) Q_V^\top

    Parameters
    ----------
    U : (..., m, a); S : (..., a, b); V : (..., n, b), with ``a ≤ m``, ``b ≤ n``

    Returns
    -------
    Q_U (..., m, a), ``R_U S R_Vᵀ`` (..., a, b), Q_V (..., n, b)
    """
    Q_U, R_U = sign_fixed_qr(U)
    Q_V, R_V = sign_fixed_qr(V)
    return Q_U, R_U @ S @ R_V.transpose(-2, -1), Q_V


def rotate_factors(
    U_hat: torch.Tensor, V_hat: torch.Tensor, P: torch.Tensor, Q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U ← Û P``, ``V ← V̂ Q``: the bases of the truncated adapter (before slicing to the new rank).

    Shapes: U_hat (..., m, a), P (..., a, k) → (..., m, k); V_hat (..., n, b), Q (..., b, k) → (..., n, k).
    """
    return U_hat @ P, V_hat @ Q


class GeoLoraFunction(torch.autograd.Function):
    r"""``y = s · x V Sᵀ Uᵀ`` whose backward hands the optimizer the integrator's gradients.

    Forward: x (..., n), U (m, r), S (r, r), V (n, r) → y (..., m).

    Backward, with δ = ∂loss/∂y and ``G = s Σ δ xᵀ``, when ``integrated`` is True (a rank allocator consumes
    the optimizer's moves):

    * grad of x: ``s · δ U S Vᵀ`` (the true gradient);
    * grad of U: ``G V = s Σ δ (Vᵀ x)ᵀ`` (the K-gradient, not autograd's ``G V Sᵀ``);
    * grad of V: ``Gᵀ U = s Σ x (Uᵀ δ)ᵀ`` (the L-gradient, not ``Gᵀ U S``);
    * grad of S: ``Uᵀ G V`` (the S-gradient).

    When ``integrated`` is False (no allocator: a fixed-rank adapter trained by plain gradient descent) the
    Euclidean gradients ``G V Sᵀ`` and ``Gᵀ U S`` are returned instead, one r × r product more.

    When ``bases`` is False (a step of the cycle schedule on which only S trains: the allocator reads no U- or
    V-gradient there) the grads of U and V are zeros and their two m × r and n × r products are skipped.

    The cost is LoRA's (products with ``x V`` and ``δ U`` only), and no ``S⁻¹`` appears anywhere. Autocast is
    disabled inside: the adapter runs in the dtype of its inputs (the layer casts ``x`` to the adapter dtype).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor,
        scale: float,
        integrated: bool,
        bases: bool,
    ):
        with torch.autocast(device_type=x.device.type, enabled=False):
            xv = x @ V  # (..., r)
            # the scale multiplies the r × r factor, not the (..., m) output (a full pass over the activations less)
            y = (xv @ (S * scale).transpose(0, 1)) @ U.transpose(0, 1)  # (..., m)
        ctx.save_for_backward(x, U, S, V, xv)
        ctx.scale = scale
        ctx.integrated = integrated
        ctx.bases = bases or not integrated
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, U, S, V, xv = ctx.saved_tensors
        s = ctx.scale
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dy = dy.to(U.dtype)
            du = dy @ U  # (..., r): Uᵀ δ per sample
            grad_x = (du @ (S * s)) @ V.transpose(0, 1) if ctx.needs_input_grad[0] else None  # (..., n)
            XV = xv.reshape(-1, xv.shape[-1])  # (B, r)
            DU = du.reshape(-1, du.shape[-1])  # (B, r)
            grad_S = (DU.transpose(0, 1) @ XV) * s  # (r, r) = Uᵀ G V
            if not ctx.bases:
                return grad_x, torch.zeros_like(U), grad_S, torch.zeros_like(V), None, None, None
            X = x.reshape(-1, x.shape[-1])  # (B, n)
            D = dy.reshape(-1, dy.shape[-1])  # (B, m)
            # (r × B) @ (B × m) then transposed: the same product as Dᵀ XV, two to three times faster on CPU BLAS
            # than a (m × B) @ (B × r) product with a wide transposed left operand
            grad_U = (XV.transpose(0, 1) @ D).transpose(0, 1) * s  # (m, r) = G V
            grad_V = (DU.transpose(0, 1) @ X).transpose(0, 1) * s  # (n, r) = Gᵀ U
            if not ctx.integrated:
                grad_U = grad_U @ S.transpose(0, 1)  # (m, r) = G V Sᵀ
                grad_V = grad_V @ S  # (n, r) = Gᵀ U S
        return grad_x, grad_U, grad_S, grad_V, None, None, None


class GeoLoraConvFunction(torch.autograd.Function):
    r"""The Conv2d form of :class:`GeoLoraFunction`: ``y = s · conv₁ₓ₁(conv(x, Vᵀ), U S)``.

    Shapes: x (B, c, H, W); ``V`` (n × r) with n = c · kh · kw, the flattened patch of the base convolution;
    ``U`` (m × r) over its m output channels; ``S`` (r × r). With ``z = conv(x, V̂)`` (B, r, H', W'), where ``V̂`` is
    ``Vᵀ`` reshaped to (r, c, kh, kw) and the base convolution's stride, padding and dilation apply, the output is
    ``y = s · (U S) z`` per position (B, m, H', W') - the adapter ``s · U S Vᵀ`` applied to every patch, computed as
    a k×k convolution with r outputs followed by a 1×1 one.

    Backward, with δ = ∂loss/∂y, ``G = s Σ δ patchᵀ`` (m × n, summed over batch and positions) and ``u = Uᵀ δ``:
    grad of x through the two convolutions; grad of ``U`` = ``G V = s Σ δ zᵀ`` (the K-gradient); grad of ``V`` =
    ``Gᵀ U = s Σ patch uᵀ`` (the L-gradient, by the convolution's weight gradient); grad of ``S`` =
    ``Uᵀ G V = s Σ u zᵀ``; with ``integrated`` False, the Euclidean ``G V Sᵀ`` and ``Gᵀ U S`` instead; with
    ``bases`` False (an S-only step), zeros for ``U`` and ``V`` without their products.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor,
        scale: float,
        integrated: bool,
        bases: bool,
        kernel: tuple[int, int, int],
        stride: tuple[int, int],
        padding: Any,
        dilation: tuple[int, int],
    ):
        r = V.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            V_hat = V.transpose(0, 1).reshape(r, *kernel)  # (r, c, kh, kw)
            z = torch.nn.functional.conv2d(x, V_hat, stride=stride, padding=padding, dilation=dilation)
            y = torch.einsum("mr,brhw->bmhw", U @ (S * scale), z)  # the scale on the small factor
        ctx.save_for_backward(x, U, S, V, z)
        ctx.scale, ctx.integrated, ctx.bases, ctx.kernel = scale, integrated, bases or not integrated, kernel
        ctx.conv = {"stride": stride, "padding": padding, "dilation": dilation}
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, U, S, V, z = ctx.saved_tensors
        s, r = ctx.scale, V.shape[1]
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dy = dy.to(U.dtype)
            u = torch.einsum("bmhw,mr->brhw", dy, U)  # Uᵀ δ per position
            grad_x = None
            if ctx.needs_input_grad[0]:
                V_hat = V.transpose(0, 1).reshape(r, *ctx.kernel)
                dz = torch.einsum("brhw,rq->bqhw", u, S * s)  # ∂loss/∂z = s Sᵀ Uᵀ δ
                grad_x = torch.nn.grad.conv2d_input(x.shape, V_hat, dz, **ctx.conv)
            grad_S = torch.einsum("brhw,bqhw->rq", u, z) * s  # Uᵀ G V
            if not ctx.bases:
                return grad_x, torch.zeros_like(U), grad_S, torch.zeros_like(V), *([None] * 7)
            grad_U = torch.einsum("bmhw,brhw->mr", dy, z) * s  # G V
            weight_grad = torch.nn.grad.conv2d_weight(x, (r, *ctx.kernel), u, **ctx.conv)  # Σ u ⊗ patch
            grad_V = weight_grad.reshape(r, -1).transpose(0, 1) * s  # Gᵀ U
            if not ctx.integrated:
                grad_U = grad_U @ S.transpose(0, 1)
                grad_V = grad_V @ S
        return grad_x, grad_U, grad_S, grad_V, *([None] * 7)
