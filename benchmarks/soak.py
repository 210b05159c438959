"""A long run with the defaults on a task whose loss saturates: stays finite, orthonormal, bounded and flat in memory.

    python benchmarks/soak.py                  # 10,000 steps in fp32 and under bf16 autocast → results/soak.json
    python benchmarks/soak.py --steps 200 --smoke --methods geolora   # CI: the same checks on a short run

A tiny BERT (tests/tiny_models.py) with GeoLoRA on every Linear of its encoder, the package's defaults, AdamW at lr
2e-3, batches of 16 drawn from 64 labelled sequences it can memorise (the mean loss falls to a few hundredths by step
500 and stays there; dropout keeps it from zero); LoRA r=8 (α 16) on the same layers as the reference.
Every 100 steps it records the mean training loss over those steps, the largest ``‖ΔW‖_F`` over the adapters, the
largest orthonormality error of ``U`` and ``V`` (``‖QᵀQ − I‖_max`` over the active columns), the kept total rank,
and the process's resident memory. ``summary`` states: every value finite; the largest orthonormality error; how much
the largest ``‖ΔW‖_F`` grew from the step where the loss plateaued (its mean first below 5e-2) to the end, and over
the run's second half; and the resident memory's growth from 10 % of the run to the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import peft_geolora  # noqa: F401
from peft_geolora import GeoLoraConfig, RankAllocator


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny_models import build, classification_dataset  # noqa: E402


EVERY = 100
PLATEAU_LOSS = 5e-2  # the mean training loss over EVERY steps below which the loss has plateaued


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def orthonormality_error(Q: torch.Tensor) -> float:
    eye = torch.eye(Q.shape[1], dtype=Q.dtype)
    return float((Q.T @ Q - eye).abs().max()) if Q.shape[1] else 0.0


def soak(steps: int, precision: str, seed: int = 0, method: str = "geolora") -> dict[str, Any]:
    """One long run; its trajectory (every EVERY steps) and summary. ``method="lora"``: LoRA r=8 (α 16) on the same
    layers, task and optimizer, as the reference for how far ``‖ΔW‖_F`` drifts after the plateau without GeoLoRA."""
    model, targets = build("bert", seed=seed)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=8, lora_alpha=16))
    else:
        model = get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    allocator = RankAllocator(model, optimizer) if method == "geolora" else None
    layers_of = [m for m in model.modules() if isinstance(m, LoraLayer)] if method == "lora" else None
    data = classification_dataset(64)
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    g = torch.Generator().manual_seed(seed)
    trajectory, window = [], []
    started, cpu_started = time.perf_counter(), time.process_time()
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(ids), (16,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if step % EVERY == 0 or step == steps:
            with torch.no_grad():
                if allocator is None:
                    delta = [float(m.get_delta_weight("default").norm()) for m in layers_of]
                    orth, finite = 0.0, all(map(math.isfinite, delta))
                else:
                    layers = [a.layer.active_factors(a.adapter) for a in allocator.adapters]
                    delta = [float(a.layer.get_delta_weight(a.adapter).norm()) for a in allocator.adapters]
                    orth = max(max(orthonormality_error(U), orthonormality_error(V)) for U, _, V in layers)
                    finite = all(bool(torch.isfinite(t).all()) for f in layers for t in f)
            trajectory.append(
                {
                    "step": step,
                    "loss": sum(window) / len(window),
                    "max_delta_w": max(delta),
                    "max_orthonormality_error": orth,
                    "total_rank_kept": allocator.total_rank(kept=True) if allocator else None,
                    "rss_mb": rss_mb(),
                    "finite": finite and all(map(math.isfinite, window)),
                }
            )
            window = []
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    plateau = next((row for row in trajectory if row["loss"] < PLATEAU_LOSS), None)
    early = next(row for row in trajectory if row["step"] >= steps // 10)
    half = next(row for row in trajectory if row["step"] >= steps // 2)
    return {
        "method": method,
        "precision": precision,
        "steps": steps,
        "trajectory": trajectory,
        "summary": {
            "all_finite": all(row["finite"] for row in trajectory),
            "max_orthonormality_error": max(row["max_orthonormality_error"] for row in trajectory),
            "plateau_step": plateau["step"] if plateau else None,
            "delta_w_at_plateau": plateau["max_delta_w"] if plateau else None,
            "delta_w_growth_after_plateau": trajectory[-1]["max_delta_w"] / plateau["max_delta_w"]
            if plateau
            else None,
            "delta_w_growth_second_half": trajectory[-1]["max_delta_w"] / half["max_delta_w"],
            "rss_growth_mb_after_10_percent": trajectory[-1]["rss_mb"] - early["rss_mb"],
            "wall_s": wall,
            "cpu_over_wall": cpu / wall,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true", help="write nothing")
    parser.add_argument("--methods", nargs="+", default=["geolora", "lora"], choices=["geolora", "lora"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = parser.parse_args(argv)
    data = {
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else f"soak.main({argv})",
        "torch_threads": torch.get_num_threads(),
        "runs": [soak(args.steps, p, method=m) for m in args.methods for p in ("fp32", "bf16")],
    }
    if not args.smoke:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    for run in data["runs"]:
        print(run["method"], run["precision"], json.dumps(run["summary"]))
    return data


if __name__ == "__main__":
    main()
