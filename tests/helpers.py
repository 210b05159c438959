"""Small builders shared by the tests."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from peft_geolora import GeoLoraConfig


class Dense(nn.Module):
    """One bias-free Linear whose base weight is zero: the adapter alone is the matrix ``W``."""

    def __init__(self, n: int, m: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = nn.Linear(n, m, bias=False, dtype=dtype)
        nn.init.zeros_(self.lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def geolora_dense(m: int, n: int, dtype: torch.dtype = torch.float32, **config):
    """A PeftModel over :class:`Dense` and its GeoLoRA layer; the scale is fixed at 1 unless ``lora_alpha`` or
    ``scaling`` is given."""
    if "lora_alpha" not in config:
        config.setdefault("scaling", 1.0)
    model = get_peft_model(Dense(n, m, dtype), GeoLoraConfig(target_modules=["lin"], **config))
    return model, model.base_model.model.lin


def adapter_matrix(layer, adapter: str = "default") -> torch.Tensor:
    """``s · U S Vᵀ`` of a GeoLoRA layer (m × n)."""
    with torch.no_grad():
        return layer.get_delta_weight(adapter).clone()


def orthonormality_error(Q: torch.Tensor) -> float:
    """``max |Qᵀ Q − I|``."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.transpose(-2, -1) @ Q - eye).abs().max().item()
