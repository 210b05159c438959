"""Tiny transformers built from configs (no download), one per architecture family the package targets."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    GPT2Config,
    LlamaConfig,
)


VOCAB = 96

CONFIGS = {
    "bert": (
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
        ["query", "key", "value", "dense"],
    ),
    "deberta-v2": (
        DebertaV2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            max_relative_positions=16,
        ),
        ["query_proj", "key_proj", "value_proj", "dense"],
    ),
    "gpt2": (
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0),
        ["c_attn", "c_proj", "c_fc"],
    ),
    "llama": (
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            pad_token_id=0,
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def build(kind: str, seed: int = 0):
    """A seeded tiny sequence classifier (2 labels) and the GeoLoRA target module names for it."""
    config, targets = CONFIGS[kind]
    config.num_labels = 2
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config), list(targets)


def inputs(batch: int = 4, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def classification_dataset(n: int = 64, length: int = 10) -> Dataset:
    """``n`` seeded token sequences labelled by whether their first token is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * length] * n,
            "labels": (ids[:, 0] > VOCAB // 2).long().tolist(),
        }
    )
