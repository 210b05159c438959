"""Watching for adapters that run away: a diverging run is reported once, with what to change.

A diverging adapter does not always show as a NaN: with a scale far above what the learning rate suits (a fixed
``scaling`` of 16 under Adam at lr 2e-2, say), ``‖ΔW‖_F`` can grow by orders of magnitude while the loss sits at
chance. At every truncation the allocator knows each adapter's size for free, ``‖ΔW‖_F = s ‖σ‖₂`` (the bases are
orthonormal), and compares it with its base weight:

.. math::  \\lVert \\Delta W \\rVert_F > R \\cdot \\max(\\lVert W_0 \\rVert_F, 1), \\qquad R = 100

Fine-tuning moves a weight by a fraction of its norm: the suite's adapters mostly stay below ``‖ΔW‖_F = 1`` on MiniLM
weights of norm 10 … 50, and the largest rank-recovery targets (zero base weights) have ``‖A‖_F = 7.4``; the bound
sits more than ten times above both. A base weight that is quantized or sharded counts as norm 0 (the bound is 100).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import sharding
from .adapters import AdapterSet
from .optimizer_state import group_index_of


RUNAWAY_RATIO = 100.0


def base_norm(weight: Optional[torch.Tensor]) -> float:
    """``‖W₀‖_F`` of a plain floating-point base weight; 0 where it cannot be read cheaply (quantized, sharded)."""
    if weight is None or not weight.is_floating_point():
        return 0.0
    if hasattr(weight, "quant_state") or sharding.is_sharded(weight):
        return 0.0
    return float(torch.linalg.vector_norm(weight.detach().float()))


class RunawayWatch:
    """Warns once per adapter whose ``‖ΔW‖_F`` exceeds :data:`RUNAWAY_RATIO` times ``max(‖W₀‖_F, 1)``."""

    def __init__(self, adapters: AdapterSet, optimizer: torch.optim.Optimizer, lora_alpha: object) -> None:
        """``lora_alpha``: the config's, named in the message beside the scale it gave."""
        self.adapters = adapters
        self.bounds = [
            RUNAWAY_RATIO * max(base_norm(getattr(a.layer.get_base_layer(), "weight", None)), 1.0) for a in adapters
        ]
        self.group = optimizer.param_groups[group_index_of(optimizer, adapters[0].S)]  # for the message: its lr
        self.lora_alpha = lora_alpha
        self.reported: set[int] = set()

    def check(self, members: list[int], sigma: torch.Tensor, ranks: list[int]) -> None:
        """``sigma`` (B, k): the singular values of the batch ``members`` after a truncation to ``ranks``."""
        lr, lora_alpha = self.group["lr"], self.lora_alpha
        positions = torch.arange(sigma.shape[-1], device=sigma.device)
        kept = positions[None, :] < torch.tensor(ranks, device=sigma.device)[:, None]
        norms = torch.linalg.vector_norm(sigma * kept, dim=-1).tolist()  # ‖σ[:r₁]‖ per adapter, one transfer
        for b, i in enumerate(members):
            if i in self.reported:
                continue
            a = self.adapters[i]
            norm = abs(a.scaling) * norms[b]
            if norm > self.bounds[i] or not math.isfinite(norm):
                self.reported.add(i)
                warnings.warn(
                    f"GeoLoRA: the adapter of `{a.name}` is running away: ||ΔW||_F = {norm:.3g}, above "
                    f"{RUNAWAY_RATIO:g} × max(||W0||_F, 1) = {self.bounds[i]:.3g}, with scale s = {a.scaling:.3g} "
                    f"(lora_alpha={lora_alpha!r}) at lr {lr:g}. Training is diverging: leave `scaling` unset so "
                    "that the allocator sets s = (lora_alpha / 2r) * 5e-3 / lr (the adapter step that trains under "
                    "Adam), or lower the scale, lora_alpha or the learning rate.",
                    stacklevel=4,
                )
