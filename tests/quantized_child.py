"""Fresh-process half of the quantized save → load test: load the adapter onto a freshly quantized base.

Usage: python -m tests.quantized_child WORKDIR MODE. Prints one JSON line with the max |logit difference| against
the saved logits, and the load of the same adapter onto the unquantized base (its factors against the saved ones).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

import peft_geolora  # noqa: F401  (registers "geolora" with PEFT)

from .quantized_models import load_base


def main(workdir: Path, mode: str) -> None:
    ids, expected = torch.load(workdir / "inputs.pt"), torch.load(workdir / "logits.pt")
    model = PeftModel.from_pretrained(load_base("llama", workdir / "base", mode), str(workdir / "adapter"))
    model.eval()
    with torch.no_grad():
        quantized = (model(input_ids=ids).logits - expected).abs().max().item()
    plain = PeftModel.from_pretrained(load_base("llama", workdir / "base", None), str(workdir / "adapter"))
    saved = torch.load(workdir / "factors.pt")
    live = {k: v for k, v in plain.state_dict().items() if ".geolora_" in k}
    factors = max((live[k] - v).abs().max().item() for k, v in saved.items())
    print(json.dumps({"quantized_base": quantized, "unquantized_base_factors": factors}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
