"""What the :class:`~peft_geolora.RankAllocator` refuses, with a message that says what to change instead."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import sharding, zero
from .adapters import AdapterSet
from .config import GeoLoraConfig


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers), or the view of a
    DeepSpeed ZeRO optimizer (:class:`~peft_geolora.zero.OptimizerView`)."""
    found = zero.find_zero_optimizer(optimizer)
    if found is not None:
        return zero.OptimizerView(found)
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    return optimizer


def check_parameters_are_whole(model: nn.Module, adapters: AdapterSet, step_rule: str) -> bool:
    """Whether the factors are sharded by FSDP2 or partitioned by DeepSpeed ZeRO (the allocator then gathers them
    around each rewrite); FSDP1, ZeRO-3 with persistent (unpartitioned) factors, and the coefficient rule under ZeRO
    are refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        raise RuntimeError(
            "GeoLoRA's RankAllocator cannot see whole factors under FSDP1 (FullyShardedDataParallel). Shard with "
            "FSDP2 (`torch.distributed.fsdp.fully_shard`, accelerate's `fsdp_version: 2`), or train with DDP or "
            "DeepSpeed ZeRO."
        )
    params = list(adapters.factor_params())
    if any(getattr(p, "ds_persist", False) for p in params):
        raise RuntimeError(
            "GeoLoRA under DeepSpeed ZeRO-3 needs its factors partitioned: set `zero_optimization."
            "stage3_param_persistence_threshold` to 0. Below that threshold DeepSpeed keeps a parameter whole on "
            "every process, and with GeoLoRA's small factors kept that way a resumed run stopped with DeepSpeed's "
            "parameter-trace error (measured with DeepSpeed 0.19.8)."
        )
    partitioned = any(zero.is_zero_param(p) for p in params)
    if partitioned and step_rule != "optimizer":
        raise RuntimeError(
            f'GeoLoRA\'s step_rule="{step_rule}" does not run under DeepSpeed ZeRO (it keeps the optimizer off the '
            'factors, which ZeRO steps in flat partitions). Use the default step_rule="optimizer".'
        )
    return partitioned or any(sharding.is_sharded(p) for p in params)


def check_budget_covers_floors(config: GeoLoraConfig, adapters: AdapterSet) -> None:
    """A global budget must at least pay for the ``min_rank`` every adapter keeps."""
    if config.budget is None:
        return
    floors = [(min(config.min_rank, config.max_rank, a.capacity), sum(a.dims)) for a in adapters]
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
