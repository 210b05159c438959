"""The adapter's scale ``s`` (``ΔW = s · U S Vᵀ``) when ``lora_alpha="auto"``: one adapter step at any learning rate.

Why: Adam and AdamW normalise every gradient entry, so each coefficient of ``S`` moves by about ``lr`` per step
whatever the gradient's size, and ``ΔW`` moves by about ``s · lr``. The product ``s · lr`` alone sets how fast the
adapter learns, and every step rule trains over only about one decade of it (README, "Choosing the defaults").
With ``lora_alpha="auto"`` the allocator therefore sets

.. math::  s = \\frac{\\lambda_\\star}{\\mathrm{lr}_{\\max}}, \\qquad \\lambda_\\star = 5 \\cdot 10^{-3}

(``AUTO_ADAPTER_STEP``; lora_alpha 1 at lr 5e-3 trained best on the suite), where ``lr_max`` is the peak learning
rate of the optimizer's parameter group that holds ``S``, read when the allocator is created. The adapter then takes
the same steps at every learning rate (the bases' moves enter as coefficients of ``S``, so they scale with ``s`` too; only
Adam's ``eps`` and AdamW's decay, ``lr · weight_decay`` per step, still follow lr); the learning rate still sets the
steps of everything else the optimizer trains (a classifier head). Under SGD, and for the split rule's plain-gradient
new directions, the step grows with ``s²``, so there ``s`` stays 1. The scale is written into the
adapter's config (``scaling``), saved with it, and never changes afterwards.
"""

from __future__ import annotations

from typing import Any

from .config import AUTO_ADAPTER_STEP, UNRESOLVED_AUTO_SCALE


def peak_lr(group: dict[str, Any]) -> float:
    """The largest learning rate a parameter group's schedule reaches: ``max_lr`` (recorded by OneCycleLR; CyclicLR
    keeps its peak outside the groups), else ``initial_lr`` (what every torch scheduler records before applying its
    factor, e.g. a warm-up's 0), else ``lr``."""
    for key in ("max_lr", "initial_lr", "lr"):
        if key in group:
            return float(group[key])
    raise ValueError("The optimizer's parameter group has no learning rate (`lr`).")


def auto_scale(group: dict[str, Any], step_rule: str) -> float:
    """``s = AUTO_ADAPTER_STEP / peak_lr(group)`` for an Adam-family group (one with ``betas``) under the optimizer and
    coefficient rules, whose every move is adaptive; 1 under SGD and under the split rule, whose new directions take
    a plain gradient step (a step that grows with ``lr · s²``)."""
    if "betas" not in group or step_rule == "split":
        return UNRESOLVED_AUTO_SCALE
    lr = peak_lr(group)
    if not lr > 0:
        raise ValueError(
            f"lora_alpha='auto' sets the adapter's scale from the optimizer's learning rate, which is {lr}. Give the "
            "optimizer a learning rate > 0, or give `lora_alpha` a number."
        )
    return AUTO_ADAPTER_STEP / lr
