"""One process of the two-process test (launched by ``accelerate launch --multi_gpu --num_processes 2``).

Trains a tiny BERT with GeoLoRA for 40 optimizer steps with gradient accumulation 2 and different data on each
process, then writes (on the main process) the hash of every process's adapter state and ranks.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import get_peft_model, get_peft_model_state_dict

from peft_geolora import GeoLoraConfig, RankAllocator
from tests.tiny_models import build, inputs


def main(out: str, step_rule: str) -> None:
    # a hang anywhere (a collective, the teardown) ends in every thread's traceback on stderr, well before the test's
    # subprocess timeout, instead of a silent timeout
    faulthandler.dump_traceback_later(480, exit=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, targets = build("bert", seed=0)
    model = get_peft_model(
        model,
        GeoLoraConfig(
            task_type="SEQ_CLS", target_modules=targets, r=4, max_rank=6, tau=0.3, cycle_length=0, step_rule=step_rule
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
    # Leave without interpreter finalization: gloo's worker threads can abort it ("terminate called without an active
    # exception", SIGABRT, pytorch/pytorch PR 179291), and destroy_process_group() instead hung one CI run for 900 s
    # (pytorch/pytorch issue 75097). The result is on disk and every collective has completed at this point.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
