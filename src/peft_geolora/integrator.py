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
* ``tau``: the relative truncation tolerance of :func:`peft_geolora.truncation.truncation_rank`.

One GeoLoRA step (Schotthöfer et al., arXiv 2410.18720, Algorithm 1) with learning rate λ:

1. gradients from one backward pass: ``G V`` (the K-gradient), ``Gᵀ U`` (the L-gradient), ``Uᵀ G V``
   (the S-gradient); :class:`~peft_geolora.gradients.GeoLoraFunction` returns them directly, with no ``S⁻¹``;
2. ``S⁺ = S − λ Uᵀ G V``, ``K⁺ = U S − λ G V``, ``L⁺ = V Sᵀ − λ Gᵀ U``;
3. basis augmentation :func:`augment_basis`: ``Û = [U | Ũ]`` with ``Ũ ⊥ U`` spanning the new directions of
   ``K⁺``, likewise ``V̂ = [V | Ṽ]``;
4. the augmented coefficients :func:`assemble_coefficients`
   ``Ŝ = [[S⁺, L⁺ᵀ Ṽ], [Ũᵀ K⁺, 0]]``, so that ``Û Ŝ V̂ᵀ = U S Vᵀ − λ P_T(G)`` (the step projected onto the
   tangent space of the rank-r manifold at ``U S Vᵀ``);
5. the small SVD ``Ŝ = P Σ Qᵀ`` and truncation to ``r₁`` values (the rank rule, :mod:`peft_geolora.truncation`):
   ``U ← Û P[:, :r₁]``, ``V ← V̂ Q[:, :r₁]``, ``S ← Σ[:r₁, :r₁]``.

Who moves U, S and V
--------------------
The layer exposes, through :class:`~peft_geolora.gradients.GeoLoraFunction`, the K-gradient ``G V`` as the gradient
of ``U``, the
L-gradient ``Gᵀ U`` as that of ``V`` and the S-gradient ``Uᵀ G V`` as that of ``S``. Under the default step rule
(:mod:`peft_geolora.optimizer_rule`) the user's optimizer steps ``U``, ``S``, ``V`` and the allocator reads the
proposed changes ``ΔU``, ``ΔV`` in place of steps 2-3 (``Ũᵀ ΔU = −λ Ũᵀ G V`` for SGD). Under
``step_rule="coefficient"`` (:mod:`peft_geolora.coefficient_rule`) the allocator takes the three gradients before
``optimizer.step()``, augments the bases with :func:`augment_basis`, assembles the gradient of the augmented
coefficients with :func:`assemble_coefficients` (``Ĝ = [[Uᵀ G V, (Gᵀ U)ᵀ Ṽ], [Ũᵀ G V, 0]]``, the tangent
gradient in the augmented basis) and steps ``Ŝ`` itself: :func:`sgd_coefficient_step` with plain SGD is exactly
Algorithm 1; :func:`adaptive_coefficient_step` is its Adam counterpart with one second moment per adapter.

All factorizations (QR, SVD) and every rank decision run in :func:`compute_dtype` (fp32, or fp64 for fp64
inputs) whatever the model dtype. Every function is batched over leading ``...`` dimensions.
"""

from __future__ import annotations

import math
from typing import Optional, Union

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
    r"""New orthonormal directions ``Ũ ⊥ U`` such that ``span([U | Ũ]) ⊇ span(dU)``, or, with fewer columns than
    that allows, the ones that carry most of ``dU``'s part orthogonal to ``U``.

    .. math::  [U \mid dU] = Q R, \qquad \tilde U = Q[:, r:], \qquad (I - U U^\top)\, dU = \tilde U R_{22}

    With ``max_new = p < k``: ``R₂₂ = P Σ Wᵀ`` and ``Ũ ← Ũ P[:, :p]``, the p leading left singular vectors of the
    orthogonal part (the best rank-p approximation of it). The old columns are not recomputed: the augmented basis
    is ``Û = [U | Ũ]`` with ``U`` bit for bit.

    Parameters
    ----------
    U : (..., m, r), orthonormal columns
    dU : (..., m, k), the proposed change of ``U`` (``−λ G V`` for SGD)
    max_new : keep at most this many new columns (the storage's free columns)

    Returns
    -------
    Ũ : (..., m, p) with ``p = min(k, m − r, max_new)``, orthonormal and orthogonal to ``U``
    """
    r = U.shape[-1]
    Q, R = sign_fixed_qr(torch.cat([U, dU], dim=-1))  # (..., m, min(m, r + k)), (..., min(m, r + k), r + k)
    U_tilde = Q[..., r:]
    if max_new is not None and max_new < U_tilde.shape[-1]:
        if max_new <= 0:
            return U_tilde[..., :0]
        R22 = R[..., r:, r:]  # (..., p0, k): the orthogonal part of dU in the basis Ũ
        P, _, _ = torch.linalg.svd(R22.to(torch.float64), full_matrices=False)
        U_tilde = U_tilde @ P[..., :max_new].to(U_tilde.dtype)
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
    rho_max: float = math.inf,
) -> torch.Tensor:
    r"""An optimizer's step of ``S`` made relative between the adapter sizes ``ρ`` and ``ρ_max``.

    .. math::  g = \frac{\operatorname{clamp}(\lVert s S_0 \rVert_F,\ \rho,\ \rho_{\max})}{\rho},\qquad
               S \leftarrow d S_0 + g\, (S_1 - d S_0)

    ``S₀`` is ``S`` before the step and ``S₁`` after it; ``d = 1 − λ w`` is the part of ``S₀`` a decoupled weight
    decay keeps (AdamW; 1 otherwise), so only the adaptive move is scaled. Adam moves every entry by about λ whatever
    the adapter's size, so ``ΔW = s U S Vᵀ`` moves by an absolute ``s λ``; scaled by ``g`` it moves in proportion to
    ``‖ΔW‖_F = ‖s S‖_F`` once that exceeds ρ, as the bases' moves already do (``dU`` changes ``ΔW`` by
    ``s dU S Vᵀ``). Below ρ, ``S₁`` is returned unchanged. Above ``ρ_max`` the gain stays ``ρ_max / ρ``: a step in
    proportion to the adapter is scale-free, so under the noise of a plateau its norm would take a multiplicative
    random walk and grow geometrically, which no weight decay (itself in proportion) can hold; with the ceiling the
    step is absolute again there, and growth is additive at most.

    Shapes: S0, S1 (..., a, b) → (..., a, b); ``scale`` and ``kept_after_decay`` numbers or (..., 1, 1).
    """
    norm = torch.linalg.matrix_norm(S0, keepdim=True) * scale  # (..., 1, 1)
    gain = (torch.clamp(norm, min=rho, max=rho_max) / rho).to(S1.dtype)
    return torch.lerp(S0 * kept_after_decay, S1, gain)


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
