"""The DreamBooth script offline: tiny UNet, VAE and CLIP text encoder from configs, scikit-learn's photos."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

from .processes import ROOT, run_child


sys.path.insert(0, str(ROOT / "scripts" / "diffusion"))
import train_dreambooth


def test_dreambooth_trains_saves_and_reloads_as_geolora_and_as_diffusers_lora(tmp_path: Path) -> None:
    options = ["--tiny", "--output_dir", str(tmp_path), "--max_steps", "8", "--lr", "1e-2", "--train_convs"]
    results = train_dreambooth.main([*options, "--sample"])
    assert results["rank_changes"] > 0, "ranks never changed"
    assert (tmp_path / "sample_0.png").is_file()
    saved = json.loads((tmp_path / "unet_geolora" / "adapter_config.json").read_text())
    assert saved["conv_kernels"], "the ResNet convolutions were not adapted"

    unet = PeftModel.from_pretrained(
        train_dreambooth.tiny_pipeline(tmp_path / "probe").unet, str(tmp_path / "unet_geolora")
    )
    unet.eval()
    g = torch.Generator().manual_seed(3)
    probe = {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 60]),
        "text": torch.randn(2, 32, 32, generator=g),
    }
    with torch.no_grad():
        probe["expected"] = unet(probe["latents"], probe["t"], encoder_hidden_states=probe["text"]).sample
    torch.save(probe, tmp_path / "probe.pt")
    result = run_child("tests.dreambooth_child", str(tmp_path))
    assert result["geolora"] == 0.0, result
    assert result["diffusers_lora"] <= 1e-5, result
