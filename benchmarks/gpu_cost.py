"""Training memory and step time on an accelerator: LoRA r=8, AdaLoRA and GeoLoRA's defaults on a real-size shape.

    python benchmarks/gpu_cost.py                       # CUDA: a 1 B Llama-style model, bf16 → results/gpu_cost.json
    python benchmarks/gpu_cost.py --shape tiny --smoke  # CPU: the same code on a tiny model, nothing written

The model is built from its config (no download): a Llama 3.2 1 B shape (16 layers, hidden 2048, 32 heads and 8
key-value heads of 64, intermediate 8192, vocabulary 128,256), weights in bf16, every linear layer of the decoder
adapted (``target_modules="all-linear"``). Each method trains the same random batches (causal LM loss on
``--batch`` × ``--length`` tokens) with AdamW at lr 2e-4 for ``--steps`` steps, one method after the other on a fresh
model with the same seed. Per method: ``torch.cuda.max_memory_allocated`` over the training steps (reset after the
model is built, so it counts what training adds on top of the weights: gradients, optimizer state, activations and
GeoLoRA's allocator buffers) and the weights' own bytes; the median step time (forward, backward, optimizer step and
the method's rank allocation, synchronised); process CPU time / wall time; and the ratios to LoRA r=8 of both,
measured side by side in the one run. On CPU the memory figure is the process's peak resident memory growth instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_geolora  # noqa: F401
from peft_geolora import GeoLoraConfig, RankAllocator


ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama_1b": dict(
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
}
METHODS = ("lora_r8", "adalora", "geolora")


def adapter_config(method: str, steps: int) -> Any:
    if method == "lora_r8":
        return LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=8, lora_alpha=16)
    if method == "adalora":  # the suite's AdaLoRA settings, its schedule fitted into the run
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            target_modules="all-linear",
            init_r=12,
            target_r=8,
            lora_alpha=16,
            tinit=max(1, steps // 10),
            tfinal=max(1, steps * 3 // 10),
            deltaT=max(1, steps // 10),
            total_step=steps,
        )
    return GeoLoraConfig(task_type="CAUSAL_LM", target_modules="all-linear")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(method: str, shape: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), torch_dtype=dtype).to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = get_peft_model(model, adapter_config(method, args.steps))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    allocator = RankAllocator(model, optimizer) if method == "geolora" else None
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.length), generator=g).to(device)
        for _ in range(args.steps)
    ]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = peak_rss_mb()
    times, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    model.train()
    for step, ids in enumerate(batches):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        elif method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    row = {
        "method": method,
        "weight_bytes": weight_bytes,
        "trainable_params_end": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "median_step_s": statistics.median(times[1:] or times),  # the first step builds the optimizer state
        "cpu_over_wall": (time.process_time() - cpu0) / wall,
    }
    if allocator is not None:
        allocator.finish()
        row["adapter_params_kept"] = allocator.num_adapter_parameters(kept=True)
    if cuda:
        row["training_memory_bytes"] = torch.cuda.max_memory_allocated() - before
        row["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    else:
        row["peak_rss_growth_mb"] = peak_rss_mb() - rss_before
    del model, optimizer, allocator, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama_1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="write nothing")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_cost.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = {method: run(method, args.shape, device, dtype, args) for method in METHODS}
    key = "training_memory_bytes" if device.type == "cuda" else "peak_rss_growth_mb"
    result = {
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else f"gpu_cost.main({argv})",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "dtype": str(dtype),
        "batch_tokens": [args.batch, args.length],
        "runs": rows,
        "step_over_lora": {m: rows[m]["median_step_s"] / rows["lora_r8"]["median_step_s"] for m in METHODS},
        "memory_over_lora": {
            m: rows[m][key] / rows["lora_r8"][key] if rows["lora_r8"][key] else None for m in METHODS
        },
    }
    if not args.smoke:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
