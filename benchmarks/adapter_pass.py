"""One adapted layer's forward + backward, side by side: GeoLoRA's layer against PEFT's LoRA layer.

    python benchmarks/adapter_pass.py [--repeats 300] [--smoke]

For the three shapes of MiniLM-L6's adapted layers (384 → 384, 384 → 1536, 1536 → 384), a batch of 16 × 64 tokens,
rank 8 (GeoLoRA's factors stored at capacity 16, as ``max_rank=8`` reserves), each method computes the layer's
output (frozen base + adapter) and its gradients (input, adapter factors) from one upstream gradient. The two take turns call by call, so drift on
a shared machine hits them alike. Reports the median time per pass of each, their ratio, and process CPU time /
wall time (below 1.8 on 2 threads the machine was contended). Writes ``benchmarks/results/adapter_pass.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_geolora import GeoLoraConfig


sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine


ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out)


def adapted_linear(config, n: int, m: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A one-layer model whose only trainable parameters are the adapter's, with the adapter made non-zero."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(n, m)), config)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model, params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapter_pass.json"))
    args = parser.parse_args(argv)
    repeats = 5 if args.smoke else args.repeats
    rows = []
    for n, m in SHAPES:
        configs = {
            "lora_r8": LoraConfig(r=8, lora_alpha=16, target_modules=["0"]),
            "geolora_r8": GeoLoraConfig(r=8, max_rank=8, min_rank=8, lora_alpha=2.0, target_modules=["0"]),
        }
        models = {name: adapted_linear(config, n, m) for name, config in configs.items()}
        for name, (model, _) in models.items():
            if name.startswith("geolora"):  # the rank allocator's K/L-gradients, as in training
                for module in model.modules():
                    if hasattr(module, "integrated"):
                        module.integrated["default"] = True
        x = torch.randn(16, 64, n, requires_grad=True)
        dy = torch.randn(16, 64, m)
        wall = {name: [] for name in models}
        cpu = {name: [] for name in models}
        for i in range(repeats + 5):
            for name, (model, params) in models.items():
                w0, c0 = time.perf_counter(), time.process_time()
                model(x).backward(dy)
                w1, c1 = time.perf_counter(), time.process_time()
                for p in (*params, x):
                    p.grad = None
                if i >= 5:
                    wall[name].append(w1 - w0)
                    cpu[name].append(c1 - c0)
        median = {name: statistics.median(t) for name, t in wall.items()}
        rows.append(
            {
                "in": n,
                "out": m,
                "median_s": median,
                "cpu_over_wall": {name: sum(cpu[name]) / sum(wall[name]) for name in models},
                "geolora / lora": median["geolora_r8"] / median["lora_r8"],
            }
        )
        print(f"{n:>5} -> {m:<5} " + "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in median.items()), flush=True)
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine(),
        "tokens": 16 * 64,
        "repeats": repeats,
        "shapes": rows,
    }
    print(json.dumps(result, indent=2))
    if not args.smoke:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
