"""The adapter's scale ``s`` (``ΔW = s · U S Vᵀ``) when ``lora_alpha="auto"``: one adapter step at any learning rate.

Why: Adam and AdamW normalise every gradient entry, so each coefficient of ``S`` moves by about ``lr`` per step
whatever the gradient's size, and ``ΔW`` moves by about ``s · lr``. The product ``s · lr`` alone sets how fast the
adapter learns, and every step rule trains over only about one decade of it (docs/research.md, "Choosing the
defaults").
With ``lora_alpha="auto"`` the allocator therefore sets

.. math::  s = \\frac{\\lambda_\\star}{\\mathrm{lr}_{\\max}}, \\qquad \\lambda_\\star = 5 \\cdot 10^{-3}

(``AUTO_ADAPTER_STEP``; lora_alpha 1 at lr 5e-3 trained best on the suite), where ``lr_max`` is the peak learning
rate of the optimizer's parameter group that holds ``S``, read when the allocator is created. The adapter then takes
the same steps at every learning rate (the bases' moves enter as coefficients of ``S``, so they scale with ``s`` too; only
Adam's ``eps`` and AdamW's decay, ``lr · weight_decay`` per step, still follow lr); the learning rate still sets the
steps of everything else the optimizer trains (a classifier head). Under SGD the step grows with ``s²``, so there
``s`` stays 1. The scale is written into the
adapter's config (``scaling``), saved with it, and never changes afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import AdapterSet
from .config import AUTO_ADAPTER_STEP, UNRESOLVED_AUTO_SCALE, GeoLoraConfig
from .optimizer_state import group_index_of


def peak_lr(group: dict[str, Any]) -> float:
    """The largest learning rate a parameter group's schedule reaches: ``max_lr`` (recorded by OneCycleLR; CyclicLR
    keeps its peak outside the groups), else ``initial_lr`` (what every torch scheduler records before applying its
    factor, e.g. a warm-up's 0), else ``lr``."""
    for key in ("max_lr", "initial_lr", "lr"):
        if key in group:
            return float(group[key])
    raise ValueError("The optimizer's parameter group has no learning rate (`lr`).")


def auto_scale(group: dict[str, Any]) -> float:
    """``s = AUTO_ADAPTER_STEP / peak_lr(group)`` for an Adam-family group (one with ``betas``), whose every move is
    adaptive; 1 under SGD, whose step grows with ``lr · s²``."""
    if "betas" not in group:
        return UNRESOLVED_AUTO_SCALE
    lr = peak_lr(group)
    if not lr > 0:
        raise ValueError(
            f"lora_alpha='auto' sets the adapter's scale from the optimizer's learning rate, which is {lr}. Give the "
            "optimizer a learning rate > 0, or give `lora_alpha` a number."
        )
    return AUTO_ADAPTER_STEP / lr


def resolve_auto_scale(
    optimizer: torch.optim.Optimizer, adapters: AdapterSet, configs: tuple[GeoLoraConfig, ...]
) -> None:
    """``lora_alpha="auto"``: write :func:`auto_scale` of the group holding the adapters' ``S`` into every layer and
    into
    ``configs`` (the model's config is saved with the adapter: resolving it completes the adapter's creation, and a
    resumed run resolves it to the same value from the same optimizer)."""
    value = auto_scale(optimizer.param_groups[group_index_of(optimizer, adapters[0].S)])
    for a in adapters:
        a.layer.scaling[a.adapter] = value
    for config in configs:
        config.scaling = value
