"""The adapter's scale ``s`` (``ΔW = s · U S Vᵀ``): one adapter step at any learning rate, read from ``lora_alpha``
as LoRA reads it.

Why: Adam and AdamW normalise every gradient entry, so each coefficient of ``S`` moves by about ``lr`` per step
whatever the gradient's size, and ``ΔW`` moves by about ``s · lr``. The product ``s · lr`` alone sets how fast the
adapter learns, and every step rule trains over only about one decade of it (docs/research.md, "Choosing the
defaults"). When the allocator is created and the config holds no scale yet, it therefore sets

.. math::  s = \\frac{\\alpha}{2r} \\cdot \\frac{\\lambda_\\star}{\\mathrm{lr}_{\\max}},
           \\qquad \\lambda_\\star = 5 \\cdot 10^{-3}

(``AUTO_ADAPTER_STEP``; the step that trained best on the suite), where ``α / r`` is ``lora_alpha / r`` as in LoRA,
relative to LoRA's usual ``α = 2r`` (``lora_alpha="auto"`` is ``α = 2r``), and ``lr_max`` is the peak learning rate
of the optimizer's parameter group that holds ``S``. The adapter then takes the same steps at every learning rate (the
bases' moves enter as coefficients of ``S``, so they scale with ``s`` too; only Adam's ``eps`` and AdamW's decay,
``lr · weight_decay`` per step, still follow lr); the learning rate still sets the steps of everything else the
optimizer trains (a classifier head). Measured with a LoRA user's recipe (``docs/research.md``, the habit table): read
as the scale itself, ``lora_alpha=16`` trains at lr 1e-4 and 5e-4 but sits at chance at 2e-3; read as LoRA's
``α / r`` with a fixed scale, it lags LoRA at 1e-4 and 5e-4; read this way it is the tuned step at every rate. Under
SGD the step grows with ``s²``, so there ``s = α / 2r``. The scale is written into the adapter's config
(``scaling``), saved with it, and never changes afterwards; a number in ``scaling`` fixes it instead.
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
    adaptive; 1 under SGD, whose step grows with ``lr · s²``. The scale of ``lora_alpha = 2r``."""
    if "betas" not in group:
        return UNRESOLVED_AUTO_SCALE
    lr = peak_lr(group)
    if not lr > 0:
        raise ValueError(
            f"GeoLoRA sets the adapter's scale from the optimizer's learning rate, which is {lr}. Give the "
            "optimizer a learning rate > 0, or give `scaling` a number."
        )
    return AUTO_ADAPTER_STEP / lr


def alpha_factor(config: GeoLoraConfig) -> float:
    """``lora_alpha / 2r``: 1 for ``"auto"`` (``α = 2r``), LoRA's ``α / r`` relative to its usual 2 otherwise."""
    return 1.0 if config.lora_alpha == "auto" else float(config.lora_alpha) / (2 * config.r)


def resolve_scale(optimizer: torch.optim.Optimizer, adapters: AdapterSet, configs: tuple[GeoLoraConfig, ...]) -> None:
    """Write ``alpha_factor · auto_scale`` of the group holding the adapters' ``S`` into every layer and into
    ``configs`` (the model's config is saved with the adapter: resolving it completes the adapter's creation, and a
    resumed run resolves it to the same value from the same optimizer: the Trainer's resume loads the checkpoint's
    ``S``, trained at that scale, into a model rebuilt from the code's config, before the allocator exists)."""
    value = alpha_factor(configs[0]) * auto_scale(optimizer.param_groups[group_index_of(optimizer, adapters[0].S)])
    for a in adapters:
        a.layer.scaling[a.adapter] = value
    for config in configs:
        config.scaling = value
