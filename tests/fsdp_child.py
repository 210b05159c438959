"""Two-process half of the FSDP2 tests (torchrun --nproc_per_node 2, gloo on CPU).

Usage: torchrun --nproc_per_node 2 -m tests.fsdp_child WORKDIR [STEP_RULE]. On a tiny BERT with GeoLoRA on every
encoder Linear (the package defaults, ``optimizer-cycle0``: with ``cycle_length=0``, or the coefficient rule), ``fully_shard`` on every encoder layer and the root:

* 40 optimizer steps with the allocator, gradient accumulation 2, different data per process; a sharded checkpoint
  (model and optimizer through torch.distributed.checkpoint, plus the allocator state) at step 20;
* a second run that loads that checkpoint and continues to step 40;
* the same 40 steps under DDP on the same data.

Process 0 writes WORKDIR/result.json (ranks, the gathered factors' agreement across processes, the differences
between the runs), the adapter saved from the gathered full state dict, and the sharded model's logits on a batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from peft_geolora import GeoLoraConfig, RankAllocator, sharding
from peft_geolora.callbacks import load_allocator_state, save_allocator_state

from .tiny_models import build, inputs


STEPS, SAVE_AT, ACCUMULATION = 40, 20, 2
STEP_RULE = sys.argv[2] if len(sys.argv) > 2 else "optimizer"
LABELS = torch.tensor([0, 1, 1, 0])


def _model(kind: str):
    base, targets = build("bert", seed=0)
    if STEP_RULE == "coefficient":  # the rule as measured for FSDP2 before the default step sharded
        config = GeoLoraConfig(
            task_type="SEQ_CLS", target_modules=targets, r=4, max_rank=6, tau=0.15, step_rule="coefficient"
        )
    else:  # the package defaults, on the encoder's layers (as the suite adapts MiniLM). Not the pooler: on a randomly
        # initialised tiny BERT its gradients are at rounding level (~1e-10), where Adam's first step is about
        # lr · sign(g), so FSDP2's and DDP's reduction orders (gradients 2.3e-10 apart) move it in different
        # directions (0.18 apart in U after one step); that is Adam's amplification of rounding, not the sharding's.
        encoder = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
        # "optimizer-cycle0": the per-step schedule, whose augmentation outgrows the storage (max_rank columns)
        options = {"cycle_length": 0} if STEP_RULE == "optimizer-cycle0" else {}
        config = GeoLoraConfig(task_type="SEQ_CLS", target_modules=encoder, **options)
    model = get_peft_model(base, config)
    for module in model.modules():  # dropout draws per process; the runs compare deterministic steps
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    return model, DistributedDataParallel(model)


def _train(kind: str, start: int, stop: int, checkpoint: Path | None = None, resume: Path | None = None):
    model, wrapped = _model(kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(wrapped, optimizer)
    if resume is not None:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(resume))
        set_model_state_dict(model, state["model"])
        # the coefficient rule keeps no optimizer state for the factors: strict=False lets torch accept that
        set_optimizer_state_dict(
            model, optimizer, state["optim"], options=StateDictOptions(strict=STEP_RULE != "coefficient")
        )
        assert load_allocator_state(allocator, str(resume))
    wrapped.train()
    rank = dist.get_rank()
    for step in range(start, stop):
        for micro in range(ACCUMULATION):
            batch = inputs(seed=1000 * rank + 10 * step + micro)
            (wrapped(**batch, labels=LABELS).loss / ACCUMULATION).backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        if checkpoint is not None and step + 1 == SAVE_AT:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
            dcp.save(state, checkpoint_id=str(checkpoint))
            if rank == 0:
                save_allocator_state(allocator, str(checkpoint))
            dist.barrier()
    return model, allocator


def _factors(model) -> dict[str, torch.Tensor]:
    """Every GeoLoRA factor, whole (gathered from the shards; every process calls this)."""
    return {name: sharding.gather(p).clone() for name, p in model.named_parameters() if ".geolora_" in name}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _deltas(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer the adapter's product U S Vᵀ (the factors themselves are unique only up to rotations)."""
    layers = {k.rsplit(".geolora_", 1)[0] for k in factors}
    return {
        layer: factors[f"{layer}.geolora_U.default"]
        @ factors[f"{layer}.geolora_S.default"]
        @ factors[f"{layer}.geolora_V.default"].T
        for layer in layers
    }


def main(workdir: Path) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == 2, f"expected 2 processes, got {world}"
    sharded, allocator = _train("fsdp", 0, STEPS, checkpoint=workdir / "checkpoint")
    factors = _factors(sharded)
    gathered = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in factors.items()})
    ranks = [None, None]
    dist.all_gather_object(ranks, allocator.ranks())

    full_state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sharded.eval()
    with torch.no_grad():
        logits = sharded(**inputs(seed=99)).logits

    resumed, resumed_allocator = _train("fsdp", SAVE_AT, STEPS, resume=workdir / "checkpoint")
    resumed_factors = _factors(resumed)

    ddp, ddp_allocator = _train("ddp", 0, STEPS)
    ddp_factors = {k: v.detach().clone() for k, v in ddp.named_parameters() if ".geolora_" in k}

    if rank == 0:
        sharded.save_pretrained(str(workdir / "adapter"), state_dict=full_state)
        torch.save({"inputs": inputs(seed=99), "logits": logits}, workdir / "logits.pt")
        result = {
            "world_size": world,
            "ranks": allocator.ranks(),
            "rank_changes": sum(len(v) for v in allocator.rank_history().values()),
            "factors_identical_across_processes": gathered[0] == gathered[1],
            "ranks_identical_across_processes": ranks[0] == ranks[1],
            "resume_max_diff": _max_diff(factors, resumed_factors),
            "resume_ranks_equal": resumed_allocator.ranks() == allocator.ranks(),
            "ddp_ranks_equal": ddp_allocator.ranks() == allocator.ranks(),
            "ddp_factors_max_diff": _max_diff(factors, ddp_factors),
            "ddp_delta_max_diff": _max_diff(_deltas(factors), _deltas(ddp_factors)),
            "delta_max_abs": max(d.abs().max().item() for d in _deltas(factors).values()),
        }
        (workdir / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
