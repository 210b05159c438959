"""Fresh-process half of the export test: load an exported LoRA adapter with plain peft (no peft_geolora).

Usage: python -m tests.export_child WORKDIR. Prints one JSON line with the logit and merged-weight differences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification


def main(workdir: Path) -> None:
    batch = torch.load(workdir / "inputs.pt")
    expected = torch.load(workdir / "logits.pt")
    merged_expected = torch.load(workdir / "merged.pt")
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(workdir / "base"), workdir / "lora"
    )
    model.eval()
    with torch.no_grad():
        logits_diff = (model(**batch).logits - expected).abs().max().item()
    merged = model.merge_and_unload().state_dict()
    merged_diff = max((merged[k] - v).abs().max().item() for k, v in merged_expected.items())
    print(
        json.dumps({"logits": logits_diff, "merged": merged_diff, "geolora_imported": "peft_geolora" in sys.modules})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
