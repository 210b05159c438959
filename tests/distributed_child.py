"""One process of the two-process test (launched by ``accelerate launch --multi_gpu --num_processes 2``).

Trains a tiny BERT with GeoLoRA for 40 optimizer steps with gradient accumulation 2 and different data on each
process, then writes (on the main process) the hash of every process's adapter state and ranks.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import get_peft_model, get_peft_model_state_dict

from peft_geolora import GeoLoraConfig, RankAllocator
from tests.tiny_models import build, inputs


def main(out: str, step_rule: str) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, targets = build("bert", seed=0)
    model = get_peft_model(
        model,
        GeoLoraConfig(
            task_type="SEQ_CLS", target_modules=targets, r=4, max_rank=6, tau=0.3, schedule="step", step_rule=step_rule
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    allocator = RankAllocator(model, optimizer)
    initial = allocator.ranks()
    micro = 0
    while allocator.num_steps < 40:
        batch = inputs(seed=1000 * accelerator.process_index + micro)  # different data on each process
        micro += 1
        with accelerator.accumulate(model):
            loss = model(**batch, labels=torch.tensor([0, 1, 1, 0])).loss
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                allocator.step()
            optimizer.zero_grad()
    state = get_peft_model_state_dict(accelerator.unwrap_model(model))
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    hashes = gather_object([digest.hexdigest()])
    ranks = gather_object([allocator.ranks()])
    if accelerator.is_main_process:
        result = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "state_hashes": hashes,
            "ranks": ranks,
            "ranks_changed": ranks[0] != initial,
            "optimizer_steps": allocator.num_steps,
            "micro_batches": micro,
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    # tear gloo down before the interpreter exits: without it one CI run aborted at exit ("terminate called without
    # an active exception", SIGABRT) after the work was done
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
