"""What the :class:`~peft_geolora.RankAllocator` refuses, with a message that says what to change instead."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import sharding
from .adapters import AdapterSet
from .config import GeoLoraConfig


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers); DeepSpeed ZeRO's
    partitioned optimizers are refused."""
    wrapper = optimizer
    while wrapper is not None:
        if type(wrapper).__module__.startswith("deepspeed.runtime.zero"):
            raise RuntimeError(
                "GeoLoRA's RankAllocator cannot run under DeepSpeed ZeRO stages 1-3: their optimizer steps flat "
                "partitions of the parameters, so neither the factors' gradients nor their optimizer steps are "
                "visible per factor. Use ZeRO stage 0 (checked on 2 CPU processes), torch DDP, or FSDP2 "
                "(`fully_shard`)."
            )
        wrapper = getattr(wrapper, "optimizer", None)
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    return optimizer


def check_parameters_are_whole(model: nn.Module, adapters: AdapterSet) -> bool:
    """Whether the factors are sharded by FSDP2 (the allocator then gathers them around each rewrite); FSDP1 and
    DeepSpeed ZeRO-3 are refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = isinstance(model, FullyShardedDataParallel) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )
    params = list(adapters.factor_params())
    if fsdp1 or any(hasattr(p, "ds_id") for p in params):
        raise RuntimeError(
            "GeoLoRA's RankAllocator cannot see whole factors under FSDP1 (FullyShardedDataParallel) or DeepSpeed "
            "ZeRO-3. Shard with FSDP2 (`torch.distributed.fsdp.fully_shard`, accelerate's `fsdp_version: 2`), or "
            "train with DDP or DeepSpeed ZeRO stage 0."
        )
    sharded = any(sharding.is_sharded(p) for p in params)
    return sharded


def check_budget_covers_floors(config: GeoLoraConfig, adapters: AdapterSet) -> None:
    """A global budget must at least pay for the ``min_rank`` every adapter keeps."""
    if config.budget is None:
        return
    floors = [(min(config.min_rank, config.max_rank, a.capacity), a.U.shape[0] + a.V.shape[0]) for a in adapters]
    if config.budget_unit == "rank":
        need = sum(f for f, _ in floors)
    else:
        need = sum(f * (mn + f) for f, mn in floors)
    if config.budget < need:
        raise ValueError(
            f"`budget` must be >= {need} {'singular values' if config.budget_unit == 'rank' else 'parameters'} "
            f"(what `min_rank` = {config.min_rank} keeps on the {len(adapters)} adapted layers), got "
            f"{config.budget}. Raise the budget or lower `min_rank`."
        )


def check_optimizer_covers_factors(optimizer: torch.optim.Optimizer, adapters: AdapterSet) -> None:
    """The optimizer must hold every factor (the allocator reads its steps and its state)."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [a.name for a in adapters if not all(id(p) in in_optimizer for p in a.parameters())]
    if missing:
        raise ValueError(
            f"The optimizer does not update the GeoLoRA factors of {missing[:3]}{'...' if len(missing) > 3 else ''}."
            " Build it over the trainable parameters, e.g. "
            "`torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])`, before the allocator."
        )
