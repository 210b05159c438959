"""Fresh-process half of the Conv2d save → load test. Usage: python -m tests.conv_child WORKDIR.

Prints one JSON line: the max |output difference| of the reloaded GeoLoRA adapter and of its LoRA export.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

import peft_geolora  # noqa: F401  (registers "geolora" with PEFT)

from .conv_models import images, tiny_cnn


def main(workdir: Path) -> None:
    expected = torch.load(workdir / "outputs.pt")
    results = {}
    for name in ("adapter", "lora"):
        model = PeftModel.from_pretrained(tiny_cnn(), str(workdir / name))
        model.eval()
        with torch.no_grad():
            results[name] = (model(images()) - expected).abs().max().item()
    print(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
