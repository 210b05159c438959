"""Fresh-process half of the FSDP2 test: load the adapter saved from the gathered state dict, unsharded.

Usage: python -m tests.fsdp_reload_child WORKDIR. Prints one JSON line: the max |logit difference| against the
sharded model's logits, and the ranks recorded in the saved config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

import peft_geolora  # noqa: F401  (registers "geolora" with PEFT)

from .tiny_models import build


def main(workdir: Path) -> None:
    saved = torch.load(workdir / "logits.pt")
    model = PeftModel.from_pretrained(build("bert", seed=0)[0], str(workdir / "adapter"))
    model.eval()
    with torch.no_grad():
        diff = (model(**saved["inputs"]).logits - saved["logits"]).abs().max().item()
    print(json.dumps({"max_logit_diff": diff, "ranks": model.peft_config["default"].rank_pattern}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
