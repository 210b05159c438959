"""The adapter's forward and the backward that hands the optimizer GeoLoRA's gradients (notation:
:mod:`peft_geolora.integrator`).

One backward pass gives the K-gradient ``G V``, the L-gradient ``Gᵀ U`` and the S-gradient ``Uᵀ G V`` as the
gradients of ``U``, ``V`` and ``S``, at LoRA's cost and with no ``S⁻¹``; :class:`GeoLoraFunction` computes them for
Linear (and transformers' Conv1D) layers, :class:`GeoLoraConvFunction` for Conv2d layers.
"""

from __future__ import annotations

from typing import Any

import torch


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
