"""Fresh-process half of the Hub tests: load an adapter by repository id from a pre-filled offline Hub cache.

Usage: python -m tests.hub_child WORKDIR REPO_ID REVISION SUBFOLDER (run with HF_HUB_CACHE and HF_HUB_OFFLINE=1).
Every load path, for the adapter at the repository's root and in SUBFOLDER, at REVISION. Prints one JSON line:
"path[place]" → max |logit difference| against WORKDIR/logits.pt, or the error it raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForSequenceClassification

import peft_geolora


def main(workdir: Path, repo_id: str, revision: str, subfolder: str) -> None:
    batch, expected = torch.load(workdir / "inputs.pt"), torch.load(workdir / "logits.pt")

    def base():
        return AutoModelForSequenceClassification.from_pretrained(str(workdir / "base"))

    def diff(model) -> float:
        model.eval()
        with torch.no_grad():
            return (model(**batch).logits - expected).abs().max().item()

    loaders = {}
    for place, where in (
        ("root", {"revision": revision}),
        ("subfolder", {"revision": revision, "subfolder": subfolder}),
    ):
        loaders[f"PeftModel.from_pretrained[{place}]"] = lambda w=where: PeftModel.from_pretrained(
            base(), repo_id, **w
        )
        loaders[f"AutoPeftModelForSequenceClassification[{place}]"] = lambda w=where: (
            AutoPeftModelForSequenceClassification.from_pretrained(repo_id, **w)
        )
        loaders[f"transformers load_adapter[{place}]"] = lambda w=where: _load_adapter(base(), repo_id, w)
        loaders[f"peft_geolora.from_pretrained[{place}]"] = lambda w=where: peft_geolora.from_pretrained(
            base(), repo_id, **w
        )
    results = {}
    for name, load in loaders.items():
        try:
            results[name] = diff(load())
        except Exception as exc:  # noqa: BLE001 - reported to the test, which asserts on each error
            results[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


def _load_adapter(model, repo_id: str, where: dict[str, str]):
    model.load_adapter(repo_id, adapter_kwargs=where)
    return model


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
