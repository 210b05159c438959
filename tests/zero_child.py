"""Two-process half of the DeepSpeed ZeRO tests (accelerate launch --multi_gpu --num_processes 2, gloo on CPU).

Usage: ``python -m tests.zero_child WORKDIR STAGE [cycle0]`` under a two-process launcher. On a tiny BERT with GeoLoRA's
defaults on every encoder Linear, a DeepSpeed engine at ZeRO stage STAGE (the user's torch AdamW, wrapped):

* 40 optimizer steps with the allocator, gradient accumulation 2 (DeepSpeed's), different data per process; a
  DeepSpeed checkpoint (``engine.save_checkpoint``: model, partitioned optimizer) and the allocator state at step 20;
* a second engine that loads that checkpoint and continues to step 40;
* the same 40 steps under DDP on the same data;
* a short run whose fourth step has NaN gradients (the factors must stay finite, with the allocator's warning).

Process 0 writes WORKDIR/result.json (ranks, whether each process holds the same factors, the fp32 masters'
agreement with the model's copies, the differences between the runs), the adapter, and the logits on a batch.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

from peft_geolora import GeoLoraConfig, RankAllocator, zero
from peft_geolora.callbacks import load_allocator_state, save_allocator_state

from .fsdp_child import _deltas, _max_diff
from .tiny_models import build, inputs


STEPS, SAVE_AT, ACCUMULATION = 40, 20, 2
LABELS = torch.tensor([0, 1, 1, 0])
# stage 3: every parameter partitioned, the tiny ones too (GeoLoRA refuses factors DeepSpeed keeps whole)
STAGE3 = {"stage3_param_persistence_threshold": 0}
SCHEDULE = sys.argv[3] if len(sys.argv) > 3 else "cycle"  # "cycle0": cycle_length=0


def _model():
    base, _ = build("bert", seed=0)
    # the package defaults on the encoder's layers (not the pooler: see tests/fsdp_child.py), or the per-step schedule
    options = {"cycle_length": 0} if SCHEDULE == "cycle0" else {}
    encoder = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
    model = get_peft_model(base, GeoLoraConfig(task_type="SEQ_CLS", target_modules=encoder, **options))
    for module in model.modules():  # dropout draws per process; the runs compare deterministic steps
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _engine(stage: int):
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": ACCUMULATION,
        "zero_optimization": {"stage": stage, **(STAGE3 if stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; DDP, the comparison, does not clip
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return model, engine, optimizer


def _train_zero(stage: int, start: int, stop: int, checkpoint: Path | None = None, resume: Path | None = None):
    model, engine, optimizer = _engine(stage)
    allocator = RankAllocator(engine, optimizer)
    if resume is not None:
        engine.load_checkpoint(str(resume), tag="step20")
        assert load_allocator_state(allocator, str(resume))
    engine.train()
    rank = dist.get_rank()
    for step in range(start, stop):
        for micro in range(ACCUMULATION):
            batch = inputs(seed=1000 * rank + 10 * step + micro)
            engine.backward(engine(**batch, labels=LABELS).loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        allocator.step()
        if checkpoint is not None and step + 1 == SAVE_AT:
            engine.save_checkpoint(str(checkpoint), tag="step20")
            if rank == 0:
                save_allocator_state(allocator, str(checkpoint))
            dist.barrier()
    return model, allocator


def _nonfinite_step(stage: int) -> dict:
    """Three steps, then one whose loss (so every gradient) is NaN: the factors must stay finite, with a warning."""
    model, engine, _ = _engine(stage)
    allocator = RankAllocator(engine, engine.optimizer)
    for step in range(4):
        for micro in range(ACCUMULATION):
            loss = engine(**inputs(seed=10 * step + micro), labels=LABELS).loss
            engine.backward(loss * float("nan") if step == 3 else loss)
            engine.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            allocator.step()
    factors = _factors(model)
    return {
        "nonfinite_warned": any("non-finite adapter gradients" in str(w.message) for w in caught),
        "nonfinite_factors_finite": all(bool(torch.isfinite(f).all()) for f in factors.values()),
    }


def _train_ddp():
    model = _model()
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(wrapped, optimizer)
    rank = dist.get_rank()
    for step in range(STEPS):
        for micro in range(ACCUMULATION):
            batch = inputs(seed=1000 * rank + 10 * step + micro)
            (wrapped(**batch, labels=LABELS).loss / ACCUMULATION).backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    return model, allocator


def _factors(model) -> dict[str, torch.Tensor]:
    """Every GeoLoRA factor as the model holds it (stages 1-2: whole on every process; stage 3: gathered from the
    partitions, every process calls this)."""
    named = [(name, p) for name, p in model.named_parameters() if ".geolora_" in name]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):  # a no-op for parameters ZeRO does not partition
        return {name: p.detach().clone() for name, p in named}


def main(workdir: Path, stage: int) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == 2, f"expected 2 processes, got {world}"
    model, allocator = _train_zero(stage, 0, STEPS, checkpoint=workdir / "checkpoint")
    factors = _factors(model)
    params = [p for name, p in model.named_parameters() if ".geolora_" in name]
    masters = dict(zip(factors, zero.gather(params)))
    # the fp32 master is partitioned: each process holds a slice of the optimizer's flat copy
    partitioned = all(zero.is_zero_param(p) for p in params)
    gathered = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in factors.items()})
    ranks = [None, None]
    dist.all_gather_object(ranks, allocator.ranks())
    model.eval()
    with torch.no_grad():
        logits = model(**inputs(seed=99)).logits

    resumed, resumed_allocator = _train_zero(stage, SAVE_AT, STEPS, resume=workdir / "checkpoint")
    resumed_factors = _factors(resumed)
    ddp, ddp_allocator = _train_ddp()
    ddp_factors = _factors(ddp)
    nonfinite = _nonfinite_step(stage)

    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # stage 3: whole for the save
        if rank == 0:
            model.save_pretrained(str(workdir / "adapter"))
    if rank == 0:
        torch.save({"inputs": inputs(seed=99), "logits": logits}, workdir / "logits.pt")
        result = {
            "world_size": world,
            "partitioned": partitioned,
            "ranks": allocator.ranks(),
            "rank_changes": sum(len(v) for v in allocator.rank_history().values()),
            "factors_identical_across_processes": gathered[0] == gathered[1],
            "ranks_identical_across_processes": ranks[0] == ranks[1],
            "masters_max_diff": _max_diff(factors, masters),
            "resume_max_diff": _max_diff(factors, resumed_factors),
            "resume_ranks_equal": resumed_allocator.ranks() == allocator.ranks(),
            "ddp_ranks_equal": ddp_allocator.ranks() == allocator.ranks(),
            "ddp_delta_max_diff": _max_diff(_deltas(factors), _deltas(ddp_factors)),
            "delta_max_abs": max(d.abs().max().item() for d in _deltas(factors).values()),
            **nonfinite,
        }
        (workdir / "result.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
