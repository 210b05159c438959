"""The cost of GeoLoRA's allocation under FSDP2 and DeepSpeed ZeRO-2/3 against DDP: DeBERTaV3-base shapes, two
processes (gloo on CPU).

    torchrun --nproc_per_node 2 benchmarks/fsdp_gather.py [--steps 12] [--out benchmarks/results/fsdp_gather_cpu.json]

The model is the adapted part of DeBERTaV3-base: 12 blocks of query/key/value/output (768 × 768), intermediate
(768 → 3072) and output (3072 → 768) Linears, 72 adapters, r = 8, max_rank = 16 (capacity 32), cycle schedule; the
package's default step (also under DeepSpeed ZeRO-2 and ZeRO-3, where the allocator reads the factors from their fp32
masters and their moments through DeepSpeed's accessors), and the coefficient rule (tau 0.15) beside it. Each process trains on its own batch of
8 × 128 tokens. Measured side by side in one launch, per optimizer step: ``optimizer.step()`` (under FSDP2 its
pre-step hook gathers the factors whole (default step) or their gradients (coefficient rule)) and
``allocator.step()`` (under FSDP2 it gathers the factors, steps them, broadcasts process 0's result and writes each
process's shard back; the default step also gathers the optimizer's moments of the factors at augmentations and
truncations). Reported: median times (and the mean, which counts the cycles' augmentations and truncations), the
bytes each process gathers, CPU time / wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from peft_geolora import GeoLoraConfig, GeoLoraLayer, RankAllocator


HIDDEN, INTERMEDIATE, BLOCKS = 768, 3072, 12


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.attn_out = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.intermediate, self.output = nn.Linear(HIDDEN, INTERMEDIATE), nn.Linear(INTERMEDIATE, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn_out(self.query(x) + self.key(x) + self.value(x))
        return h + self.output(torch.relu(self.intermediate(h)))


class Stack(nn.Module):
    def __init__(self, blocks: int = BLOCKS) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def run(kind: str, steps: int, step_rule: str, blocks: int = BLOCKS) -> dict[str, float]:
    torch.manual_seed(0)
    targets = ["query", "key", "value", "attn_out", "intermediate", "output"]
    rule = {"step_rule": "coefficient", "tau": 0.15} if step_rule == "coefficient" else {}
    config = GeoLoraConfig(target_modules=targets, r=8, max_rank=16, **rule)
    model = get_peft_model(Stack(blocks), config)
    if kind == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.base_model.model.blocks:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if kind.startswith("zero"):  # DeepSpeed ZeRO stage 2 or 3 (every parameter partitioned at stage 3)
        import deepspeed

        zero = {"stage": int(kind[-1]), "stage3_param_persistence_threshold": 0}
        config = {
            "train_micro_batch_size_per_gpu": 8,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
        }
        wrapped, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    elif kind == "ddp":
        wrapped = DistributedDataParallel(model)
    allocator = RankAllocator(wrapped, optimizer)
    g = torch.Generator().manual_seed(dist.get_rank())
    optimizer_times, allocator_times = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        x = torch.randn(8, 128, HIDDEN, generator=g)
        loss = wrapped(x).pow(2).mean()
        wrapped.backward(loss) if kind.startswith("zero") else loss.backward()
        dist.barrier()
        t0 = time.perf_counter()
        wrapped.step() if kind.startswith("zero") else optimizer.step()  # DeepSpeed's step: ZeRO's optimizer step
        t1 = time.perf_counter()
        allocator.step()
        t2 = time.perf_counter()
        optimizer.zero_grad()
        optimizer_times.append(t1 - t0)
        allocator_times.append(t2 - t1)
    layers = [m for m in model.modules() if isinstance(m, GeoLoraLayer)]
    factor_bytes = sum(
        sum(
            t.numel() * t.element_size()
            for t in (m.geolora_U["default"], m.geolora_S["default"], m.geolora_V["default"])
        )
        for m in layers
    )
    active_bytes = sum(
        (m.out_features + m.in_features + m.capacity["default"]) * m.rank["default"] * 4 for m in layers
    )
    return {
        "bytes_per_gather_at_final_ranks": active_bytes,
        # the default step's gathers of the optimizer's moments (exp_avg, exp_avg_sq of U, S, V at full capacity)
        "moment_bytes_per_augmentation_or_truncation": 2 * factor_bytes if step_rule == "optimizer" else 0,
        "final_total_rank": sum(m.rank["default"] for m in layers),
        "optimizer_step_ms": round(1000 * statistics.median(optimizer_times), 1),
        "allocator_step_ms": round(1000 * statistics.median(allocator_times), 1),
        "allocator_step_mean_ms": round(1000 * statistics.mean(allocator_times), 1),
        "adapters": len(layers),
        "factor_bytes_whole": factor_bytes,
        "cpu_over_wall": round((time.process_time() - cpu0) / (time.perf_counter() - wall0), 2),
    }


# (out, in) of every adapted Linear: DeBERTaV3-base's encoder (12 layers) and a 1 B Llama-style decoder (Llama 3.2 1B:
# 16 layers, hidden 2048, 8 key-value heads of 64, intermediate 8192), every linear layer adapted
SHAPES = {
    "DeBERTaV3-base (72 adapters)": [(768, 768)] * 48 + [(3072, 768), (768, 3072)] * 12,
    "Llama-style 1 B (112 adapters)": [
        shape
        for _ in range(16)
        for shape in ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))
    ],
}


def computed_bytes(shapes: list[tuple[int, int]], rank: int = 8, max_rank: int = 16, itemsize: int = 4) -> dict:
    """What one process materialises per gather under FSDP2 (whole tensors, of which it receives the other
    processes' rows): the factors' active columns ``Σ (m + n + C) r`` (twice per optimizer step: before and after
    it), and at each augmentation and truncation the optimizer's two moments of the factors at full capacity
    ``2 Σ (m + n + C) C`` (C = min(m, n, max_rank), the storage since 0.3.0); fp32."""
    capacity = [min(m, n, max_rank) for m, n in shapes]
    active = sum((m + n + c) * rank for (m, n), c in zip(shapes, capacity)) * itemsize
    moments = sum(2 * (m + n + c) * c for (m, n), c in zip(shapes, capacity)) * itemsize
    whole = sum((m + n + c) * c for (m, n), c in zip(shapes, capacity)) * itemsize
    return {
        "rank": rank,
        "factor_columns_per_gather_MiB": round(active / 2**20, 2),
        # DeepSpeed ZeRO: each read of the factors assembles them whole (every stored column) from the fp32 masters
        "zero_factors_whole_per_read_MiB": round(whole / 2**20, 2),
        "gathers_of_factor_columns_per_step": 2,
        "optimizer_moments_per_augmentation_or_truncation_MiB": round(moments / 2**20, 2),
        "augmentations_and_truncations_per_cycle_of_4_steps": 2,
        "mean_per_step_MiB": round((2 * active + moments / 2) / 2**20, 2),
    }


DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
DOC_BEGIN, DOC_END = "<!-- fsdp_gather: begin (benchmarks/fsdp_gather.py) -->", "<!-- fsdp_gather: end -->"


def markdown(result: dict) -> str:
    """The tables of docs/distributed.md, from the JSON alone."""
    lines = [
        "Computed, per process, fp32, all ranks 8 (`max_rank` 16, so capacity 32), the default step:",
        "",
        (
            "| shape | FSDP2: factor columns per gather (2 per step) | optimizer moments per augmentation or "
            "truncation (2 per cycle of 4 steps) | FSDP2: mean per step | ZeRO: factors whole per read (2 per step) |"
        ),
        "|---|---|---|---|---|",
    ]
    for name, c in result["computed"].items():
        lines.append(
            f"| {name} | {c['factor_columns_per_gather_MiB']} MiB | "
            f"{c['optimizer_moments_per_augmentation_or_truncation_MiB']} MiB | {c['mean_per_step_MiB']} MiB | "
            f"{c.get('zero_factors_whole_per_read_MiB', '')} MiB |"
        )
    lines += [
        "",
        (
            f"Measured (`{result['command']}`; {result['machine']}), DeBERTaV3-base shapes, median and mean "
            "milliseconds per optimizer step:"
        ),
        "",
        (
            "| rule / engine | optimizer.step() | allocator.step() median | allocator.step() mean | final total rank "
            "| CPU / wall |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["runs"].items():
        lines.append(
            f"| {name} | {row['optimizer_step_ms']} | {row['allocator_step_ms']} | {row['allocator_step_mean_ms']} "
            f"| {row['final_total_rank']} | {row['cpu_over_wall']} |"
        )
    return "\n".join(lines)


def update_doc(result: dict) -> None:
    text = DOC.read_text()
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    DOC.write_text(f"{head}{DOC_BEGIN}\n{markdown(result)}\n{DOC_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=BLOCKS, help="fewer blocks: the smoke test")
    parser.add_argument("--out", default="benchmarks/results/fsdp_gather_cpu.json")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, "launch with torchrun --nproc_per_node 2"
    torch.set_num_threads(1)
    rows = {
        f"{rule}/{kind}": run(kind, args.steps, rule, args.blocks)
        for rule in ("optimizer", "coefficient")
        for kind in ("ddp", "fsdp2", *(("zero2", "zero3") if rule == "optimizer" else ()))
    }
    if dist.get_rank() == 0:
        result = {
            "command": f"torchrun --nproc_per_node 2 benchmarks/fsdp_gather.py --steps {args.steps} --blocks {args.blocks}",
            "machine": f"{platform.machine()}, CPU only, one thread per process",
            "torch": torch.__version__,
            "shape": "DeBERTaV3-base adapted Linears: 12 × (4 × 768², 768→3072, 3072→768), r=8, max_rank=16",
            "what_travels": (
                "FSDP2, per optimizer step and process: one all-gather of the factors' active columns in the "
                "pre-step hook (default step: the snapshot before the step; coefficient rule: the gradients'), one "
                "of the factors' active columns (allocator step), and (as under DDP) process 0's ranks and active "
                "blocks broadcast; each of the two gathers materialises Σ (m + n + R) r × 4 bytes. The default step "
                "also gathers the optimizer's two moments of the factors, whole, at each augmentation and truncation "
                "(twice per cycle of 4 steps). DeepSpeed ZeRO: the factors whole (every stored column) from their "
                "fp32 masters before and after the optimizer's step, and the moments at augmentations and truncations, "
                "through DeepSpeed's accessors (one collective per tensor)"
            ),
            "runs": rows,
            "computed": {name: computed_bytes(shapes) for name, shapes in SHAPES.items()},
            **{
                f"allocator_step_fsdp2_over_ddp[{rule}]": round(
                    rows[f"{rule}/fsdp2"]["allocator_step_mean_ms"] / rows[f"{rule}/ddp"]["allocator_step_mean_ms"], 2
                )
                for rule in ("optimizer", "coefficient")
            },
            **{
                f"allocator_step_{kind}_over_ddp[optimizer]": round(
                    rows[f"optimizer/{kind}"]["allocator_step_mean_ms"]
                    / rows["optimizer/ddp"]["allocator_step_mean_ms"],
                    2,
                )
                for kind in ("zero2", "zero3")
            },
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        if args.blocks == BLOCKS:
            update_doc(result)
        print(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
