"""Let transformers' own ``PreTrainedModel.load_adapter`` load trimmed GeoLoRA checkpoints.

transformers 5 loads adapters through its weight-conversion machinery, which refuses tensors whose shapes differ
from the model's and sets parameters without ``load_state_dict`` hooks. GeoLoRA saves factors trimmed to their
active ranks, so for ``peft_type == GEOLORA`` (and only then) the PEFT weight mapping handed to transformers gains
one conversion per factor that zero-pads it back to the layer's capacity, after checking it, and one that
refreshes the layer's Python rank mirror from the loaded rank buffer. The mapping builder is wrapped in memory;
nothing on disk is touched, and every other PEFT type gets PEFT's mapping unchanged.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    """Wrap ``peft.utils.transformers_weight_conversion.build_peft_weight_mapping`` once (idempotent)."""
    try:
        from peft.utils import transformers_weight_conversion as twc
        from transformers.core_model_loading import ConversionOps, WeightConverter
    except ImportError:  # transformers without the conversion machinery: nothing to adapt
        return
    if getattr(twc.build_peft_weight_mapping, "_geolora_wrapped", False):
        return

    from .model import _pad_factor
    from .registry import GEOLORA

    class PadGeoLoraFactor(ConversionOps):
        """Zero-pad a trimmed U (m × r), V (n × r) or S (r × r) to the live capacity shape."""

        def __init__(self, factor: str) -> None:
            self.factor = factor

        def convert(self, input_dict: dict[str, Any], source_patterns, target_patterns, **kwargs) -> dict:
            name, model = kwargs["full_layer_name"], kwargs["model"]
            tensor = next(iter(input_dict.values()))
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            live = model.get_parameter(name)
            rank = tensor.shape[-1]
            return {name: _pad_factor(name, self.factor, tensor, rank, live.shape)}

    class LoadGeoLoraRank(ConversionOps):
        """Pass the rank buffer through and update the layer's Python-int mirror."""

        def convert(self, input_dict: dict[str, Any], source_patterns, target_patterns, **kwargs) -> dict:
            name, model = kwargs["full_layer_name"], kwargs["model"]
            tensor = next(iter(input_dict.values()))
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            module_name, _, adapter = name.rpartition(".geolora_rank.")
            layer = model.get_submodule(module_name)
            layer.rank[adapter] = int(tensor)
            return {name: tensor}

    original = twc.build_peft_weight_mapping

    def build_peft_weight_mapping(weight_conversions, adapter_name: str, peft_config=None):
        mapping = original(weight_conversions, adapter_name, peft_config=peft_config)
        if getattr(peft_config, "peft_type", None) != GEOLORA:
            return mapping
        extra = [
            WeightConverter(f"geolora_{f}.{adapter_name}", f"geolora_{f}.{adapter_name}", [PadGeoLoraFactor(f)])
            for f in "USV"
        ]
        extra.append(
            WeightConverter(f"geolora_rank.{adapter_name}", f"geolora_rank.{adapter_name}", [LoadGeoLoraRank()])
        )
        return mapping + extra

    build_peft_weight_mapping._geolora_wrapped = True
    twc.build_peft_weight_mapping = build_peft_weight_mapping
