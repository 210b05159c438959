"""Two-process half of the Trainer + DeepSpeed ZeRO test (accelerate launch, gloo on CPU).

Usage: ``python -m tests.trainer_zero_child WORKDIR STAGE`` under a two-process launcher. The transformers
``Trainer`` with ``deepspeed=`` a ZeRO config (accelerate's DeepSpeed plugin) and ``GeoLoraCallback``, the package
defaults on a tiny BERT's encoder, 16 optimizer steps of gradient accumulation 2. Process 0 writes
WORKDIR/result.json: the world size, the engine's ZeRO stage and whether the factors' fp32 masters are partitioned,
the ranks on each process, the allocator's step count, and the logged ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_geolora import GeoLoraCallback, GeoLoraConfig, zero

from .tiny_models import build, classification_dataset


def main(workdir: Path, stage: int) -> None:
    base, _ = build("bert", seed=0)
    model = get_peft_model(
        base, GeoLoraConfig(task_type="SEQ_CLS", target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)")
    )
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        # stage 3: GeoLoRA's factors partitioned like every parameter (configs/deepspeed/zero3.json)
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
    }
    args = TrainingArguments(
        output_dir=str(workdir / "out"),
        max_steps=16,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        deepspeed=config,
    )
    callback = GeoLoraCallback()
    trainer = Trainer(model=model, args=args, train_dataset=classification_dataset(128), callbacks=[callback])
    trainer.train()
    engine = trainer.model_wrapped
    params = [p for name, p in model.named_parameters() if ".geolora_" in name]
    ranks = [None, None]
    dist.all_gather_object(ranks, callback.allocator.ranks())
    factors = [None, None]
    with deepspeed.zero.GatheredParameters(params):  # stage 3: whole (a no-op at stages 1-2)
        dist.all_gather_object(factors, [p.detach().tolist() for p in params])
        finite = all(bool(torch.isfinite(p).all()) for p in params)
    if dist.get_rank() == 0:
        result = {
            "world_size": dist.get_world_size(),
            "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage(),
            "partitioned": all(zero.is_zero_param(p) for p in params),
            "allocator_steps": callback.allocator.num_steps,
            "rank_changes": sum(len(v) for v in callback.allocator.rank_history().values()),
            "ranks_identical_across_processes": ranks[0] == ranks[1],
            "factors_identical_across_processes": factors[0] == factors[1],
            "logged_total_rank": [
                h["geolora_total_rank"] for h in trainer.state.log_history if "geolora_total_rank" in h
            ],
            "total_rank": callback.allocator.total_rank(kept=True),
            "finite": finite,
        }
        (workdir / "result.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
