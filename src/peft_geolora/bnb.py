"""GeoLoRA on bitsandbytes base layers (QLoRA-style): ``Linear4bit`` (nf4 / fp4) and ``Linear8bitLt``.

The base layer stays quantized and computes its own forward; the adapter ``s · U S Vᵀ`` lives in the adapter dtype
(fp32 by default) and runs through the same :class:`~peft_geolora.gradients.GeoLoraFunction` as on a float base,
so the integrator, the allocator (QR and SVD in fp32) and the saved adapter are unchanged. Only merging differs:
the quantized weight is dequantized, the adapter added (or subtracted), and the sum quantized again with the
weight's own settings - inexact by the quantization's rounding, as for LoRA on the same layers.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from .layer import Linear


SUPPORTED_BACKENDS = "bitsandbytes `Linear4bit` (nf4, fp4) and `Linear8bitLt`"


def is_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


class _QuantizedLinear(Linear):
    """A GeoLoRA :class:`~peft_geolora.layer.Linear` whose base weight is quantized: merge by requantization."""

    bits: int

    def _dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _add_to_weight(self, name: str, sign: float, safe_merge: bool) -> None:
        warnings.warn(
            f"Merging a GeoLoRA adapter into a {self.bits}-bit base layer requantizes the weight: outputs differ from "
            "the unmerged model by the quantization's rounding.",
            stacklevel=3,
        )
        weight = self._dequantized_weight()
        delta = self.get_delta_weight(name).to(device=weight.device, dtype=torch.float32)
        merged = weight.float() + sign * delta
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self._set_weight(merged.to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Dequantize, add ``s · U S Vᵀ`` of each active adapter, quantize again."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.geolora_U:
                self._add_to_weight(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Dequantize, subtract the merged adapters (last merged first), quantize again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.geolora_U:
                self._add_to_weight(name, -1.0, safe_merge=False)


class Linear4bit(_QuantizedLinear):
    """GeoLoRA on ``bitsandbytes.nn.Linear4bit``."""

    bits = 4

    def _dequantized_weight(self) -> torch.Tensor:
        """The weight as the layer computes it, read back through its forward: ``W = (base(I) − base(0))ᵀ``.

        bitsandbytes repacks 4-bit weights in place for its CPU inference kernel (absmax in bf16, transposed) and its
        inverse of that packing does not restore the original state, so dequantizing the stored codes is not safe.
        """
        base = self.get_base_layer()
        eye = torch.eye(self.in_features, device=base.weight.device, dtype=base.compute_dtype or torch.float32)
        with torch.no_grad():
            return (base(eye) - base(torch.zeros_like(eye[:1]))).transpose(0, 1).float()

    def _set_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes

        old = self.get_base_layer().weight
        settings = {
            "requires_grad": False,
            "quant_type": old.quant_type,
            "blocksize": old.blocksize,
            "compress_statistics": old.compress_statistics,
            "quant_storage": old.quant_storage,
        }
        self.get_base_layer().weight = bitsandbytes.nn.Params4bit(weight.to("cpu"), **settings).to(old.device)


class Linear8bitLt(_QuantizedLinear):
    """GeoLoRA on ``bitsandbytes.nn.Linear8bitLt``."""

    bits = 8

    def _dequantized_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        if base.state.SCB is None:
            base.state.SCB = base.weight.SCB
        return dequantize_bnb_weight(base.weight, state=base.state)

    def _set_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes

        base = self.get_base_layer()
        old = base.weight
        base.weight = bitsandbytes.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()


def dispatch_bnb(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[Linear]:
    """The GeoLoRA layer for a bitsandbytes base layer, or None if ``target`` is not one."""
    if not is_available():
        return None
    import bitsandbytes

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, bitsandbytes.nn.Linear4bit):
        return Linear4bit(target, adapter_name, **kwargs)
    if isinstance(base, bitsandbytes.nn.Linear8bitLt):
        return Linear8bitLt(target, adapter_name, **kwargs)
    return None
