"""Parameter counts that mean the adapter: PEFT's ``get_nb_trainable_parameters`` on models with GeoLoRA layers.

A GeoLoRA adapter is stored at a fixed capacity R (``U``: m × R, ``S``: R × R, ``V``: n × R) so that its rank can grow
without reallocation; only ``U[:, :r]``, ``S[:r, :r]``, ``V[:, :r]`` are the adapter, r (m + n + r) parameters, and
the rest is exactly zero. PEFT counts ``numel``, which would report the reserved storage as trainable parameters.
:func:`install` wraps ``PeftModel.get_nb_trainable_parameters`` in memory, once: for a model holding GeoLoRA layers
it subtracts the reserved storage, so ``print_trainable_parameters()`` and ``get_model_status()`` report the active
adapter (before and after ranks change); every other model gets PEFT's count unchanged.
"""

from __future__ import annotations

import functools

from torch import nn

from .layer import GeoLoraLayer


def reserved_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) entries that GeoLoRA layers store beyond their active ranks: Σ (mR + R² + nR) − r (m + n + r)."""
    trainable = total = 0
    for module in model.modules():
        if not isinstance(module, GeoLoraLayer):
            continue
        for name, U in module.geolora_U.items():
            stored = U.numel() + module.geolora_S[name].numel() + module.geolora_V[name].numel()
            if stored == 0:  # DeepSpeed ZeRO-3 placeholders: PEFT counts them by ds_numel, leave them alone
                continue
            unused = stored - module.num_active_parameters(name)
            total += unused
            if U.requires_grad:
                trainable += unused
    return trainable, total


def install() -> None:
    """Wrap ``peft.PeftModel.get_nb_trainable_parameters`` once (idempotent)."""
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_geolora_wrapped", False):
        return

    @functools.wraps(original)
    def get_nb_trainable_parameters(self: PeftModel) -> tuple[int, int]:
        trainable, total = original(self)
        reserved_trainable, reserved = reserved_parameters(self)
        return trainable - reserved_trainable, total - reserved

    get_nb_trainable_parameters._geolora_wrapped = True
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters
