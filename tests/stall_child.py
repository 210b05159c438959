"""One process of the stalled-peer test: process 1 stops itself (SIGSTOP) after an optimizer step.

Process 0 then waits in the allocator's broadcast; with a 10 s process-group timeout it must fail with
GeoLoRA's error instead of hanging. Process 0 writes the error it saw to the file given as argument.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from peft import get_peft_model

from peft_geolora import GeoLoraConfig, RankAllocator
from tests.tiny_models import build, inputs


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=10))])
    model, targets = build("bert", seed=0)
    model = get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, cycle_length=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    allocator = RankAllocator(model, optimizer)
    try:
        for step in range(10):
            loss = model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss
            accelerator.backward(loss)
            optimizer.step()
            if step == 3 and accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            allocator.step()
            optimizer.zero_grad()
    except RuntimeError as exc:
        if accelerator.process_index == 0:
            with open(out, "w", encoding="utf-8") as f:
                f.write(str(exc))
        raise


if __name__ == "__main__":
    main(sys.argv[1])
