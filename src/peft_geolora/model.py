"""``GeoLoraModel``: the PEFT tuner (injection, trimmed save, padded and checked load)."""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from . import bnb
from .config import GeoLoraConfig
from .layer import SUPPORTED_LAYER_TYPES, Conv2d, GeoLoraLayer, Linear, unsupported_layer_message
from .registry import PREFIX


_FACTOR_KEY = re.compile(r"^(?P<module>.*)\.geolora_(?P<factor>[USV])(?P<suffix>(\.[^.]+)?)$")
_PEFT_PREFIX = "base_model.model."


class GeoLoraModel(BaseTuner):
    """Creates a GeoLoRA model from a pretrained model (Schotthöfer et al., arXiv 2410.18720).

    Usually reached through ``peft.get_peft_model(model, GeoLoraConfig(...))``. Ranks change only through
    :class:`~peft_geolora.RankAllocator`; ``update_and_allocate(global_step)`` steps the allocator attached to
    this model, for AdaLoRA-style training loops.
    """

    prefix: str = PREFIX
    tuner_layer_cls = GeoLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        peft_config: GeoLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        kwargs = {
            "r": peft_config.r,
            "storage": peft_config.storage_columns(),
            "scaling": peft_config.current_scaling(),
            "lora_dropout": peft_config.lora_dropout,
            "init_weights": peft_config.init_weights,
        }
        expected_rank = (peft_config.rank_pattern or {}).get(current_key)  # set when built from a saved config
        history = [tuple(event) for event in (peft_config.rank_history or {}).get(current_key, [])]
        if isinstance(target, GeoLoraLayer):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode, **kwargs)
            target.expected_rank[adapter_name] = expected_rank
            target.rank_history[adapter_name] = history
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        new_module = bnb.dispatch_bnb(target, adapter_name, **kwargs)
        if new_module is None:
            if _is_quantized(base):
                raise TypeError(
                    f"GeoLoRA does not support this quantized base layer: `{current_key}` is a "
                    f"`{type(base).__module__}.{type(base).__qualname__}`. Supported quantized layers: "
                    f"{bnb.SUPPORTED_BACKENDS} (load the model with `BitsAndBytesConfig(load_in_4bit=True)` or "
                    "`load_in_8bit=True`); otherwise load the base model unquantized (bf16/fp16/fp32)."
                )
            if not isinstance(base, SUPPORTED_LAYER_TYPES):
                raise TypeError(unsupported_layer_message(base) + f" (module `{current_key}`)")
            layer_class = Conv2d if isinstance(base, nn.Conv2d) else Linear
            new_module = layer_class(target, adapter_name, **kwargs)
        new_module.expected_rank[adapter_name] = expected_rank
        new_module.rank_history[adapter_name] = history  # a saved adapter's history continues in a new run
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        if adapter_name in self.prefix:
            raise ValueError(
                f"Adapter name `{adapter_name}` is contained in GeoLoRA's parameter prefix `{self.prefix}`, so its "
                "tensors could not be told apart from other adapters' on save and load. Choose another name."
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def update_and_allocate(self, global_step: Optional[int] = None) -> None:
        """Step the :class:`~peft_geolora.RankAllocator` attached to this model (AdaLoRA's name for it).

        ``global_step`` is accepted for AdaLoRA compatibility; the allocator counts its own steps.
        """
        allocator = self.__dict__.get("_geolora_allocator")
        if allocator is None:
            raise RuntimeError(
                "No GeoLoRA rank allocator is attached to this model. Create one after the optimizer:\n"
                "    allocator = peft_geolora.RankAllocator(model, optimizer)\n"
                "then call `allocator.step()` (or `model.base_model.update_and_allocate(step)`) after every "
                "`optimizer.step()`."
            )
        allocator.step()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: GeoLoRA adapters have per-layer ranks and their own factor layout."""
        raise TypeError(
            f"{type(self).__name__} does not support `add_weighted_adapter`. Convert the GeoLoRA adapters to plain "
            "LoRA first with `peft_geolora.export_to_lora(model, out_dir)` (exact), load them as LoRA adapters, and "
            "combine them with LoRA's own `add_weighted_adapter`."
        )

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: GeoLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Select the adapter's tensors trimmed to their active ranks; record the ranks in ``config``."""
        _warn_if_mid_cycle(model, adapter_name)
        selected = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        rank_pattern: dict[str, int] = {}
        for key in list(selected):
            match = _FACTOR_KEY.match(key)
            if match is None:
                continue
            rank_key = f"{match['module']}.geolora_rank{match['suffix']}"
            rank = int(selected[rank_key])
            tensor = selected[key]
            selected[key] = tensor[:rank, :rank] if match["factor"] == "S" else tensor[:, :rank]
            rank_pattern[match["module"].removeprefix(_PEFT_PREFIX)] = rank
        config.rank_pattern = dict(sorted(rank_pattern.items()))
        config.conv_kernels = {
            name.removeprefix(_PEFT_PREFIX): _conv_kernel(module.get_base_layer())
            for name, module in model.named_modules()
            if isinstance(module, Conv2d) and adapter_name in module.geolora_U
        }
        config.rank_history = {
            name.removeprefix(_PEFT_PREFIX): [list(event) for event in module.rank_history.get(adapter_name, [])]
            for name, module in model.named_modules()
            if isinstance(module, GeoLoraLayer) and module.rank_history.get(adapter_name)
        }
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: GeoLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model, check every tensor (finite; factors: floating point and as their ranks
        say), pad the trimmed factors to capacity."""
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        live_shapes = {k: v.shape for k, v in model.state_dict().items() if f".{PREFIX}" in k}
        _check_layers_match(remapped, live_shapes, adapter_name)
        for key, tensor in remapped.items():  # the factors are checked with their shapes below; here the rest
            if tensor.is_floating_point() and _FACTOR_KEY.match(key) is None:
                check_finite_float(key, tensor)
        for key in list(remapped):
            match = _FACTOR_KEY.match(key)
            if match is None or key not in live_shapes:
                continue
            module, factor = match["module"], match["factor"]
            rank_key = f"{module}.geolora_rank{match['suffix']}"
            if rank_key not in remapped:
                raise ValueError(
                    f"The GeoLoRA checkpoint has `{key}` but no active rank (`geolora_rank`) for that layer; it is "
                    "incomplete or was not written by peft_geolora. Save the adapter again with `save_pretrained`."
                )
            rank = int(remapped[rank_key])
            remapped[key] = _pad_factor(key, factor, remapped[key], rank, live_shapes[key])
            layer = model.get_submodule(module)
            recorded = layer.expected_rank.get(adapter_name) if isinstance(layer, GeoLoraLayer) else None
            if recorded is not None and recorded != rank:
                raise ValueError(
                    f"`adapter_config.json` records rank {recorded} for `{module.removeprefix(_PEFT_PREFIX)}` but the "
                    f"weights file holds rank {rank}: the config and the weights come from different saves. Save "
                    "the adapter again, or restore both files from the same save."
                )
        for module in model.modules():  # checked once, against the config the layers were built from
            if isinstance(module, GeoLoraLayer):
                module.expected_rank.pop(adapter_name, None)
        return remapped


def _check_layers_match(state_dict: dict[str, torch.Tensor], live_shapes: dict[str, torch.Size], adapter: str) -> None:
    """The checkpoint's GeoLoRA layers are the model's: a factor for a layer the model lacks, or a layer of the model
    without its factors, would load as a different model (PEFT loads non-strictly). A state dict without any factor
    (e.g. only a head, as ``geolora_from_lora`` loads) is a partial load and is not held to the model's layers."""
    in_file = {k for k in state_dict if _FACTOR_KEY.match(k)}
    expected = {k for k in live_shapes if _FACTOR_KEY.match(k) and k.endswith(f".{adapter}")}
    unexpected, missing = sorted(in_file - set(live_shapes)), sorted(expected - in_file) if in_file else []
    if unexpected:
        raise ValueError(
            f"The GeoLoRA checkpoint has `{unexpected[0]}`"
            f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}, but the model has no such "
            "GeoLoRA layer: the adapter was saved for another base model or `target_modules`. Load it onto the base "
            "model it was trained on."
        )
    if missing:
        raise ValueError(
            f"The GeoLoRA checkpoint lacks `{missing[0]}`"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, a layer of the model: the adapter was "
            "saved for another base model or `target_modules`, or the file is damaged."
        )


def _conv_kernel(conv: nn.Conv2d) -> list[int]:
    """[in_channels, kh, kw, dilation_h, dilation_w]: what a Conv2d adapter's V spans, and its dilation."""
    return [conv.in_channels, *conv.kernel_size, *conv.dilation]


def _warn_if_mid_cycle(model: nn.Module, adapter_name: str) -> None:
    """Saving between an augmentation and its truncation writes the transient augmented adapter: say how to avoid it."""
    for module in model.modules():
        allocator = module.__dict__.get("_geolora_allocator")
        if allocator is not None and allocator.adapter_name == adapter_name and allocator.is_augmented():
            warnings.warn(
                f"Saving GeoLoRA adapter `{adapter_name}` in the middle of a rank cycle: it holds its augmented bases "
                f"(total rank {allocator.total_rank()}, of which training has kept {allocator.total_rank(kept=True)} "
                "so far). Call `allocator.finish()` before `save_pretrained` to save the kept adapter (training can "
                "continue after it); the transformers Trainer with GeoLoraCallback does this before every checkpoint.",
                stacklevel=4,
            )
            return


_QUANTIZATION_PACKAGES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "optimum", "eetq")


def _is_quantized(layer: nn.Module) -> bool:
    """A base layer from a quantization package, or with integer / packed weights."""
    if type(layer).__module__.split(".")[0] in _QUANTIZATION_PACKAGES:
        return True
    weight = getattr(layer, "weight", None)
    return weight is not None and (not weight.is_floating_point() or hasattr(weight, "quant_state"))


def check_finite_float(key: str, tensor: torch.Tensor) -> None:
    """A checkpoint's adapter tensor must be floating point and finite: a NaN or an infinity would load as a model
    that computes NaN, silently."""
    if not tensor.is_floating_point():
        raise ValueError(
            f"GeoLoRA checkpoint tensor `{key}` has dtype {tensor.dtype}, where a floating-point tensor belongs: the "
            "file is damaged or was not written by peft_geolora. Save the adapter again."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"GeoLoRA checkpoint tensor `{key}` holds non-finite values (NaN or inf): the adapter was saved from a "
            "run that diverged, or the file is damaged. Load a checkpoint from before the divergence, or save it "
            "again."
        )


def _pad_factor(key: str, factor: str, tensor: torch.Tensor, rank: int, live_shape: torch.Size) -> torch.Tensor:
    """Zero-pad a trimmed factor (U: m × r, V: n × r, S: r × r) to the live capacity shape, after checking it."""
    check_finite_float(key, tensor)
    if factor == "S":
        expected = (rank, rank)
    else:
        expected = (live_shape[0], rank)
    capacity = live_shape[1]
    if tuple(tensor.shape) != expected or rank > capacity or rank < 0:
        raise ValueError(
            f"GeoLoRA checkpoint tensor `{key}` has shape {tuple(tensor.shape)}, but its recorded rank {rank} and the "
            f"base model's layer (capacity {tuple(live_shape)}) require {expected}. The adapter was saved for a "
            "different base model or configuration, or the file is damaged."
        )
    padded = tensor.new_zeros(live_shape)
    if factor == "S":
        padded[:rank, :rank] = tensor
    else:
        padded[:, :rank] = tensor
    return padded
