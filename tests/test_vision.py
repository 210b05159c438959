"""The vision script's offline configuration (digits proxy ViT) end to end, in its smoke form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification

from .processes import ROOT


sys.path.insert(0, str(ROOT / "scripts" / "vision"))
import run_image_classification as vision


@pytest.mark.parametrize(
    ("method", "loop"), [("geolora", []), ("lora", []), ("adalora", []), ("geolora", ["--trainer"])]
)
def test_vision_script_trains_the_offline_proxy_and_saves_an_adapter(tmp_path: Path, method: str, loop) -> None:
    options = ["--proxy_dir", str(tmp_path / "proxy"), "--proxy_steps", "20", "--max_steps", "12", "--lr", "5e-3"]
    results = vision.main([*options, *loop, "--method", method, "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "ranks.png").is_file() == (method == "geolora")
    assert results["steps"] == 12 and 0.0 <= results["accuracy"] <= 1.0 and results["adapter_params"] > 0
    assert (results["ranks"] is not None) == (method == "geolora")
    base = AutoModelForImageClassification.from_pretrained(str(tmp_path / "proxy"), num_labels=5)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
    test_x, _ = vision.digits_split(range(5, 10))["test"]
    loaded.eval()
    with torch.no_grad():
        assert loaded(pixel_values=test_x[:8]).logits.shape == (8, 5)


def test_digits_splits_are_disjoint_and_fixed() -> None:
    a, b = vision.digits_split(range(5, 10)), vision.digits_split(range(5, 10))
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])
    train, test = (
        {tuple(x.flatten().tolist()) for x in a["train"][0]},
        {tuple(x.flatten().tolist()) for x in a["test"][0]},
    )
    assert len(a["train"][0]) + len(a["test"][0]) == 1797 - len(vision.digits_split(range(5))["train"][0]) - len(
        vision.digits_split(range(5))["test"][0]
    )
    assert set(a["train"][1].tolist()) == set(range(5))
    assert len(train & test) <= 2  # a few 8×8 digits occur twice in scikit-learn's set itself
