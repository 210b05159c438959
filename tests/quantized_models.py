"""Tiny models for the quantized-base tests, saved from configs and loaded back through bitsandbytes.

bitsandbytes' CPU 4-bit kernel needs every quantized layer's output size to be a multiple of 32 and its input size
a multiple of the quantization block (64), so these are wider than :mod:`tests.tiny_models`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BitsAndBytesConfig,
    LlamaConfig,
)


VOCAB = 128
LLAMA = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    pad_token_id=0,
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT = BertConfig(
    vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_labels=2
)
BERT_TARGETS = ["query", "key", "value", "dense"]
MODES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


def save_base(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a seeded tiny ``llama`` (causal LM) or ``bert`` (sequence classifier) in fp32 into ``folder``."""
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    auto.from_config(LLAMA if kind == "llama" else BERT).save_pretrained(str(folder))
    return folder


def load_base(kind: str, folder: Path, mode: str | None):
    """Load the saved base, quantized by bitsandbytes in ``mode`` (see :data:`MODES`) or in fp32 if None."""
    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    if mode is None:
        return auto.from_pretrained(str(folder))
    options = dict(MODES[mode])
    if options.get("load_in_4bit"):
        options["bnb_4bit_compute_dtype"] = torch.float32
    if kind == "bert":  # the classification head is trained in full (modules_to_save), so it stays unquantized
        options["llm_int8_skip_modules"] = ["classifier"]
    return auto.from_pretrained(str(folder), quantization_config=BitsAndBytesConfig(**options), device_map="cpu")


def token_batch(batch: int = 8, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def save_llama_with_tokenizer(folder: Path, texts: list[str]) -> Path:
    """The tiny Llama plus a word-level tokenizer over ``texts`` (VOCAB entries), as a loadable model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "</s>"])
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    ).save_pretrained(str(folder))
    return save_base("llama", folder)
