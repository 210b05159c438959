"""Fine-tune an image classifier (a Vision Transformer) with GeoLoRA, LoRA or AdaLoRA.

    python scripts/vision/run_image_classification.py --output_dir out [--method geolora] [--lr 1e-3] ...

Two configurations:

* ``--dataset cifar10`` with ``--model_name_or_path google/vit-base-patch16-224`` (the paper's setting: batch 256,
  5 epochs, lr 1e-3; any ``AutoModelForImageClassification`` checkpoint and its image processor) where the Hub is
  reachable.
* ``--dataset digits`` (the default; offline): scikit-learn's 8×8 handwritten digits, 1,797 real images. No
  pretrained ViT installs offline, so the model is a clearly labelled **proxy**: a 4-layer ViT (patch 2, width 64)
  pre-trained in full on the digits 0-4 (cached under ``--proxy_dir``; built on first use, about a minute on 2
  cores), then adapted with a fresh head to the digits 5-9, which it has never seen. It stands in for "a
  pretrained backbone adapted to new classes"; it is not ImageNet-pretrained ViT-B/16 and its scores are not CIFAR's.

The adapter goes on every attention projection and MLP Linear of the encoder; the classifier head is trained in
full. Writes ``results.json`` (accuracy on the held-out split, adapter parameters, ranks, steps per second, CPU
time / wall time), ``ranks.png`` (GeoLoRA) and ``adapter/`` (with its model card). ``--trainer`` trains through the
transformers Trainer and ``GeoLoraCallback`` instead of the plain loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from peft_geolora import GeoLoraCallback, GeoLoraConfig, GeoLoraLayer, RankAllocator


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "glue"))
from run_glue import _AdaLoraCallback, adapter_parameter_count, plot_ranks


TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2|query|key|value|attention\.output\.dense|intermediate\.dense)$"
PROXY_CONFIG = {
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--model_name_or_path", help="default: the digits proxy, or google/vit-base-patch16-224")
    parser.add_argument("--proxy_dir", default="outputs/vision_proxy", help="where the digits proxy is cached")
    parser.add_argument("--proxy_steps", type=int, default=600, help="pre-training steps of the digits proxy")
    parser.add_argument("--method", choices=["geolora", "lora", "adalora"], default="geolora")
    parser.add_argument("--output_dir", default="outputs/vision")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--r", type=int, default=8, help="GeoLoRA's initial rank, LoRA's rank, AdaLoRA's target")
    parser.add_argument("--max_rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_save", action="store_true")
    parser.add_argument("--trainer", action="store_true", help="train with the transformers Trainer")
    return parser.parse_args(argv)


def digits_split(classes: range, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits of ``classes`` (relabelled from 0), normalised to [-1, 1], split 70/30 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    keep = np.isin(digits.target, list(classes))
    images = torch.tensor(digits.images[keep], dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target[keep] - classes.start)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.3, random_state=seed, stratify=labels
    )
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def proxy_backbone(proxy_dir: Path, steps: int = 600) -> Path:
    """The digits proxy: a small ViT pre-trained in full on the digits 0-4, built once and cached."""
    if (proxy_dir / "config.json").is_file():
        return proxy_dir
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**PROXY_CONFIG, num_labels=5))
    data = digits_split(range(5))["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data[0]), (64,), generator=g)
        model(pixel_values=data[0][idx], labels=data[1][idx]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(proxy_dir))
    return proxy_dir


def load_data(args: argparse.Namespace) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, str]:
    """(splits of (pixel_values, labels), number of classes, model path)."""
    if args.dataset == "digits":
        path = args.model_name_or_path or str(proxy_backbone(Path(args.proxy_dir), args.proxy_steps))
        return digits_split(range(5, 10), seed=args.seed), 5, path
    from datasets import load_dataset
    from transformers import AutoImageProcessor

    path = args.model_name_or_path or "google/vit-base-patch16-224"
    processor = AutoImageProcessor.from_pretrained(path)
    raw = load_dataset("cifar10")
    splits = {}
    for split, name in (("train", "train"), ("test", "test")):
        pixels = processor(list(raw[name]["img"]), return_tensors="pt")["pixel_values"]
        splits[split] = (pixels, torch.tensor(raw[name]["label"]))
    return splits, 10, path


def adapter_config(args: argparse.Namespace):
    common = {"target_modules": TARGETS, "modules_to_save": ["classifier"]}
    if args.method == "geolora":
        return GeoLoraConfig(**common, r=args.r, max_rank=args.max_rank)
    if args.method == "lora":
        return LoraConfig(**common, r=args.r, lora_alpha=2 * args.r)
    return AdaLoraConfig(
        **common, init_r=int(1.5 * args.r), target_r=args.r, lora_alpha=2 * args.r, total_step=args.max_steps,
        tinit=args.max_steps // 10, tfinal=int(0.3 * args.max_steps), deltaT=10,
    )  # fmt: skip


def train_loop(model, train: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> RankAllocator | None:
    """A plain PyTorch loop: AdamW, the allocator after every step (AdaLoRA: ``update_and_allocate``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    allocator = RankAllocator(model, optimizer) if args.method == "geolora" else None
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.max_steps):
        idx = torch.randint(0, len(train[0]), (args.batch_size,), generator=g)
        model(pixel_values=train[0][idx], labels=train[1][idx]).loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        elif args.method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    if allocator is not None:
        allocator.finish()
    return allocator


def train_with_trainer(model, train: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace):
    """The transformers Trainer with GeoLoraCallback (AdaLoRA: its update_and_allocate in a callback)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict({"pixel_values": train[0].numpy(), "labels": train[1].numpy()}).with_format("torch")
    callback = GeoLoraCallback() if args.method == "geolora" else _AdaLoraCallback()
    training = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    callbacks = [callback] if args.method != "lora" else []
    Trainer(model=model, args=training, train_dataset=data, callbacks=callbacks).train()
    return callback.allocator if isinstance(callback, GeoLoraCallback) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    splits, num_labels, path = load_data(args)
    torch.manual_seed(args.seed)
    base = AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True)
    model = get_peft_model(base, adapter_config(args))
    initial_ranks = {n: m.rank["default"] for n, m in model.named_modules() if isinstance(m, GeoLoraLayer)}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if args.trainer:
        allocator = train_with_trainer(model, splits["train"], args)
    else:
        allocator = train_loop(model, splits["train"], args)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    model.eval()
    test_x, test_y = splits["test"]
    with torch.no_grad():
        predictions = torch.cat(
            [model(pixel_values=test_x[i : i + 256]).logits.argmax(-1) for i in range(0, len(test_x), 256)]
        )
    results = {
        "dataset": args.dataset,
        "model": path if args.dataset != "digits" or args.model_name_or_path else "digits proxy ViT (see docstring)",
        "method": args.method,
        "lr": args.lr,
        "r": args.r,
        "seed": args.seed,
        "steps": args.max_steps,
        "accuracy": (predictions == test_y).float().mean().item(),
        "adapter_params": adapter_parameter_count(model, args.method),
        "ranks": allocator.ranks() if allocator is not None else None,
        "steps_per_second": args.max_steps / wall,
        "cpu_over_wall": cpu / wall,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_save:
        model.save_pretrained(str(out / "adapter"))
    if allocator is not None:
        plot_ranks(allocator.rank_history(), initial_ranks, args.max_steps, out / "ranks.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{args.method}: accuracy {results['accuracy']:.4f}, {results['adapter_params']:,} adapter parameters")
    return results


if __name__ == "__main__":
    main()
