"""Exact conversion between GeoLoRA and plain PEFT LoRA adapters.

A GeoLoRA layer computes ``s · U S Vᵀ x`` with rank r, which is a LoRA layer ``(α/r) · B A x`` of the same rank
with ``A = Vᵀ`` (r × n), ``B = s · U S`` (m × r) and ``α = r`` (LoRA scale 1). The exporter writes such a
``LoraConfig`` (``rank_pattern``/``alpha_pattern`` give every layer its own rank) and weights straight from the
factors, with no SVD of an m × n delta; layers at rank 0 are left out, ``modules_to_save`` and trained biases are
carried over. The result loads with plain ``peft``, without ``peft_geolora``.

The inverse, :func:`geolora_from_lora`, starts GeoLoRA from an existing LoRA adapter: the thin SVD of each
``(α/r) · B A`` (from QR factors of ``B`` and ``Aᵀ``, never the m × n product) becomes ``U``, ``S``, ``V``, so the
model computes the same function at step 0 and then adapts its ranks.

Command line::

    python -m peft_geolora.export ADAPTER_DIR OUT_DIR [--base BASE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .config import GeoLoraConfig
from .layer import GeoLoraLayer


_PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.geolora_(?P<factor>U|S|V|rank)$")
# LoRA options GeoLoRA cannot reproduce; an adapter using any of them is refused by geolora_from_lora.
_UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": False,
    "use_rslora": False,
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def lora_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A = s · U S Vᵀ``: ``A = Vᵀ`` (r × n), ``B = s · U S`` (m × r), in fp32."""
    return V.float().transpose(0, 1).contiguous(), (scale * U.float() @ S.float()).contiguous()


def _model_card(config: LoraConfig, ranks: dict[str, int], source: str) -> str:
    rows = "\n".join(f"| `{name}` | {rank} |" for name, rank in ranks.items())
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {config.base_model_name_or_path}",
            "tags:",
            "- peft",
            "- lora",
            "- geolora",
            "---",
            "",
            "# LoRA adapter exported from GeoLoRA",
            "",
            f"Exported exactly (no approximation) from the GeoLoRA adapter `{source}` with `peft_geolora.export`. It",
            "is a plain PEFT LoRA adapter with one rank per layer (`rank_pattern`) and loads without `peft_geolora`:",
            "",
            "```python",
            "from peft import PeftModel",
            'model = PeftModel.from_pretrained(base_model, "<this folder>")',
            "```",
            "",
            "| layer | rank |",
            "|---|---|",
            rows,
            "",
        ]
    )


def _export(
    geo_config: GeoLoraConfig,
    factors: dict[str, dict[str, torch.Tensor]],
    extra: dict[str, torch.Tensor],
    out_dir: Union[str, os.PathLike],
    source: str,
    base_model_name_or_path: Optional[str] = None,
) -> LoraConfig:
    """Write the LoRA adapter for ``factors`` (module name → {"U", "S", "V"} trimmed to the active rank)."""
    scale = geo_config.current_scaling()
    ranks = {name: f["S"].shape[0] for name, f in factors.items() if f["S"].shape[0] > 0}
    if not ranks:
        raise ValueError("Every GeoLoRA layer has rank 0: there is nothing to export.")
    state = dict(extra)
    kernels = geo_config.conv_kernels or {}
    dilated = [name for name in ranks if name in kernels and tuple(kernels[name][3:]) != (1, 1)]
    if dilated:
        raise ValueError(
            f"Cannot export {dilated} to LoRA exactly: they are dilated convolutions, and PEFT's LoRA Conv2d builds "
            "its first convolution without the base layer's dilation. Exclude them from the GeoLoRA targets if you "
            "need a LoRA export, or keep the GeoLoRA adapter."
        )
    for name in ranks:
        A, B = lora_factors(factors[name]["U"], factors[name]["S"], factors[name]["V"], scale)
        if name in kernels:  # LoRA's Conv2d: A is a k×k convolution with r outputs, B a 1×1 one
            A, B = A.reshape(A.shape[0], *kernels[name][:3]), B[:, :, None, None]
        state[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        state[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    patterns = {re.escape(name): rank for name, rank in ranks.items()}
    lora_config = LoraConfig(
        task_type=geo_config.task_type,
        base_model_name_or_path=base_model_name_or_path or geo_config.base_model_name_or_path,
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),  # alpha = r in every layer: the scale is baked into B
        target_modules=sorted(ranks),
        modules_to_save=geo_config.modules_to_save,
        bias="lora_only" if geo_config.bias == "geolora_only" else geo_config.bias,
        lora_dropout=geo_config.lora_dropout,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    lora_config.save_pretrained(out)
    (out / "README.md").write_text(_model_card(lora_config, ranks, source))
    return lora_config


def export_to_lora(
    model: nn.Module, out_dir: Union[str, os.PathLike], adapter_name: Optional[str] = None
) -> LoraConfig:
    """Save the GeoLoRA adapter of a live ``PeftModel`` as an exactly equivalent plain LoRA adapter.

    ``adapter_name``: default, the model's active adapter.
    """
    if adapter_name is None:
        active = getattr(model, "active_adapter", "default")
        adapter_name = active if isinstance(active, str) else active[0]
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"The model has no adapter named `{adapter_name}`; its adapters are {sorted(model.peft_config)}. Pass "
            "one of them as `adapter_name`."
        )
    config = model.peft_config[adapter_name]
    if not isinstance(config, GeoLoraConfig):
        raise TypeError(f"Adapter `{adapter_name}` is not a GeoLoRA adapter (its config is {type(config).__name__}).")
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, GeoLoraLayer) and adapter_name in module.geolora_U:
            U, S, V = (t.detach() for t in module.active_factors(adapter_name))
            factors[name.removeprefix(_PEFT_PREFIX)] = {"U": U, "S": S, "V": V}
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)  # also records conv_kernels in config
    extra = {k: v for k, v in state.items() if ".geolora_" not in k}
    return _export(config, factors, extra, out_dir, source=f"{type(model).__name__}[{adapter_name}]")


def export_adapter_dir(
    adapter_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], base: Optional[str] = None
) -> LoraConfig:
    """Convert a saved GeoLoRA adapter folder into a plain LoRA adapter folder, from the files alone."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"`{adapter_dir}` has no adapter_config.json: it is not a PEFT adapter folder.")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type != "GEOLORA":
        raise ValueError(f"`{adapter_dir}` holds a {peft_type} adapter, not a GeoLoRA one (peft_type GEOLORA).")
    config = GeoLoraConfig.from_pretrained(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    state = (
        load_file(weights) if weights.is_file() else torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    )
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, tensor in state.items():
        match = _FACTOR.match(key)
        if match is None:
            extra[key] = tensor
        elif match["factor"] != "rank":
            factors.setdefault(match["module"].removeprefix(_PEFT_PREFIX), {})[match["factor"]] = tensor
    return _export(config, factors, extra, out_dir, source=str(adapter_dir), base_model_name_or_path=base)


@torch.no_grad()
def geolora_from_lora(model: PeftModel, adapter_name: str = "default", **geolora_options) -> PeftModel:
    """Replace a loaded LoRA adapter by a GeoLoRA adapter computing the same function.

    ``model`` is a ``PeftModel`` holding the LoRA adapter ``adapter_name``; ``geolora_options`` configure the new
    GeoLoRA adapter (``max_rank``, ``tau``, ...; ``r`` defaults to the largest LoRA rank, the scale ``scaling`` to 1,
    and an unset scale is refused: the adapter is trained already). Each layer's
    ``(α/r) · B A = Q_B (R_B Cᵀ) Q_Aᵀ`` is factorised through the QR of ``B`` and ``Aᵀ`` and the SVD of the small
    middle matrix. A LoRA rank above ``max_rank`` is refused.
    """
    lora_config = model.peft_config[adapter_name]
    if not isinstance(lora_config, LoraConfig) or type(lora_config) is not LoraConfig:
        raise TypeError(f"Adapter `{adapter_name}` is not a plain LoRA adapter ({type(lora_config).__name__}).")
    used = [
        k
        for k, default in _UNSUPPORTED_LORA_OPTIONS.items()
        if getattr(lora_config, k, default) not in (default, {}, [])
    ]
    if used or (lora_config.init_lora_weights not in (True, False, "gaussian")):
        raise ValueError(f"GeoLoRA cannot reproduce LoRA adapters that use {used or ['init_lora_weights']}.")
    from peft.tuners.lora import LoraLayer

    layers = {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if any(not isinstance(m.lora_A[adapter_name], nn.Linear) for m in layers.values()):
        raise ValueError("Only LoRA adapters on Linear / Conv1D layers can start a GeoLoRA adapter.")
    if geolora_options.get("scaling", 1.0) is None:
        raise ValueError(
            "A LoRA adapter brought over is trained already, so its scale is needed now: give `scaling` a number "
            "(the adapter computes the same function at any scale; the scale sets how fast it moves under Adam when "
            "training continues), or leave it at 1."
        )
    ranks = {name: m.r[adapter_name] for name, m in layers.items()}
    # a trained adapter needs a scale now: 1 unless given (the function is the same at any; under Adam the scale sets
    # how fast the adapter moves when training continues)
    options = {"r": max(ranks.values()), "scaling": 1.0, **geolora_options}
    options.setdefault("max_rank", max(options["r"], max(ranks.values())))
    too_big = {n: r for n, r in ranks.items() if r > options["max_rank"]}
    if too_big:
        raise ValueError(
            f"LoRA ranks {too_big} exceed `max_rank` = {options['max_rank']}; pass a larger `max_rank` to start "
            "GeoLoRA from this adapter."
        )
    factors = {}
    for name, m in layers.items():
        B = m.lora_B[adapter_name].weight.float() * m.scaling[adapter_name]  # (m, r)
        A = m.lora_A[adapter_name].weight.float()  # (r, n)
        Q_B, R_B = torch.linalg.qr(B)
        Q_A, R_A = torch.linalg.qr(A.transpose(0, 1))
        P, sigma, Qh = torch.linalg.svd(R_B @ R_A.transpose(0, 1))
        factors[name] = (Q_B @ P, sigma, Q_A @ Qh.transpose(0, 1))  # U (m, r), σ (r,), V (n, r)

    extra = {  # modules_to_save and trained biases travel over unchanged
        k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items() if ".lora_" not in k
    }
    base = model.unload()
    geo_config = GeoLoraConfig(
        task_type=lora_config.task_type,
        target_modules=sorted(layers),
        bias="geolora_only" if lora_config.bias == "lora_only" else lora_config.bias,
        modules_to_save=lora_config.modules_to_save,
        base_model_name_or_path=lora_config.base_model_name_or_path,
        **options,
    )
    geo = get_peft_model(base, geo_config, adapter_name=adapter_name)
    if extra:
        set_peft_model_state_dict(geo, extra, adapter_name=adapter_name)
    scale = geo_config.scaling
    for name, (U, sigma, V) in factors.items():
        layer = geo.base_model.model.get_submodule(name)
        rank = U.shape[1]
        layer.set_rank(adapter_name, rank)
        layer.geolora_U[adapter_name][:, :rank] = U.to(layer.geolora_U[adapter_name].dtype)
        layer.geolora_S[adapter_name][:rank, :rank] = torch.diag(sigma / scale).to(layer.geolora_S[adapter_name].dtype)
        layer.geolora_V[adapter_name][:, :rank] = V.to(layer.geolora_V[adapter_name].dtype)
        layer.mark_allocated(adapter_name)
    return geo


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a GeoLoRA adapter as an exactly equivalent PEFT LoRA adapter."
    )
    parser.add_argument("adapter_dir", help="a folder written by save_pretrained of a GeoLoRA model")
    parser.add_argument("out_dir", help="where to write the LoRA adapter")
    parser.add_argument("--base", help="base model recorded in the exported config (default: the adapter's)")
    args = parser.parse_args(argv)
    config = export_adapter_dir(args.adapter_dir, args.out_dir, base=args.base)
    print(f"wrote a LoRA adapter with {len(config.target_modules)} layers to {args.out_dir}")


if __name__ == "__main__":
    main()
