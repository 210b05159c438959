"""Allocation overhead at paper scale: the allocator's step as a fraction of a training step.

    python benchmarks/alloc_overhead.py [--device cpu|cuda] [--smoke]

A DeBERTaV3-base-shaped model built from its config (random weights: only shapes matter for time), GeoLoRA on the
72 adapted layers of the authors' GLUE runs (query/key/value, attention output, intermediate and output dense) with
their MNLI settings (r 10, max_rank 32), batch 8 × 128 random tokens. The training step (forward, backward,
``optimizer.step()``) and ``allocator.step()`` are timed separately, for the every-step schedule (augment and
truncate every step: the worst case) and the cycle schedule (averaged over whole cycles). Writes
``benchmarks/results/alloc_overhead_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, DebertaV2Config

from peft_geolora import GeoLoraConfig, RankAllocator


ROOT = Path(__file__).resolve().parents[1]
TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def deberta_v3_base(smoke: bool) -> DebertaV2Config:
    if smoke:
        return DebertaV2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               vocab_size=1000, relative_attention=True, pos_att_type=["p2c", "c2p"], num_labels=3)  # fmt: skip
    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1, layer_norm_eps=1e-7,
        num_labels=3,
    )  # fmt: skip


def measure(schedule: str, device: str, steps: int, smoke: bool) -> dict:
    torch.manual_seed(0)
    config = deberta_v3_base(smoke)
    model = AutoModelForSequenceClassification.from_config(config)
    model = get_peft_model(
        model,
        GeoLoraConfig(
            task_type="SEQ_CLS",
            target_modules=TARGETS,
            r=10,
            max_rank=32,
            tau=0.1,
            cycle_length=0 if schedule == "step" else 3,
        ),
    ).to(device)
    adapters = sum(1 for m in model.modules() if hasattr(m, "geolora_U"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    allocator = RankAllocator(model, optimizer)
    ids = torch.randint(0, config.vocab_size, (8, 32 if smoke else 128), device=device)
    labels = torch.randint(0, 3, (8,), device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    train, alloc = [], []
    for step in range(steps + 2):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        sync()
        t1 = time.perf_counter()
        allocator.step()
        sync()
        t2 = time.perf_counter()
        optimizer.zero_grad()
        if step >= 2:  # warm-up
            train.append(t1 - t0)
            alloc.append(t2 - t1)
    return {
        "schedule": schedule,
        "adapters": adapters,
        "median_train_step_s": statistics.median(train),
        "mean_alloc_s": statistics.mean(alloc),
        "max_alloc_s": max(alloc),
        "alloc_fraction_of_step": statistics.mean(alloc) / (statistics.mean(train) + statistics.mean(alloc)),
        "total_rank_end": allocator.total_rank(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    steps = 4 if args.smoke else args.steps  # the cycle schedule: 2 whole cycles of 4
    wall0, cpu0 = time.perf_counter(), time.process_time()
    runs = [measure(schedule, args.device, steps, args.smoke) for schedule in ("step", "cycle")]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "runs": runs,
        "cpu_over_wall": (time.process_time() - cpu0) / (time.perf_counter() - wall0),
    }
    print(json.dumps(result, indent=2))
    if not args.smoke:
        out = ROOT / "benchmarks" / "results" / f"alloc_overhead_{args.device}.json"
        out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
