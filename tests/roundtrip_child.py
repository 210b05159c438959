"""Fresh-process half of the save → load tests: load a saved GeoLoRA adapter every supported way.

Usage: python -m tests.roundtrip_child WORKDIR. Prints one JSON line: load path → max |logit difference|.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

import peft_geolora  # noqa: F401  (registers "geolora" with PEFT)
from peft_geolora import GeoLoraConfig


def main(workdir: Path) -> None:
    batch = torch.load(workdir / "inputs.pt")
    expected = torch.load(workdir / "logits.pt")
    base_dir, adapter_dir = str(workdir / "base"), str(workdir / "adapter")

    def diff(model) -> float:
        model.eval()
        with torch.no_grad():
            return (model(**batch).logits - expected).abs().max().item()

    results = {}
    results["PeftModel.from_pretrained"] = diff(
        PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir)
    )
    results["AutoPeftModelForSequenceClassification"] = diff(
        AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    )
    plain = AutoModelForSequenceClassification.from_pretrained(base_dir)
    plain.load_adapter(adapter_dir)
    results["transformers load_adapter"] = diff(plain)
    # the Trainer's resume path: a fresh model at its initial ranks, then load_adapter(..., is_trainable=True)
    config = GeoLoraConfig.from_pretrained(adapter_dir)
    fresh = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), config)
    fresh.load_adapter(adapter_dir, "default", is_trainable=True)
    results["resume load_adapter(is_trainable=True)"] = diff(fresh)
    print(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
