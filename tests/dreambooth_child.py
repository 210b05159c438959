"""Fresh-process half of the DreamBooth test: rebuild the tiny pipeline, load the adapters two ways.

Usage: python -m tests.dreambooth_child WORKDIR. Prints one JSON line: max |UNet output difference| against the
trained UNet's, for the GeoLoRA adapter (PeftModel) and for the exported LoRA through diffusers' load_lora_weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

import peft_geolora  # noqa: F401  (registers "geolora" with PEFT)

from .processes import ROOT


sys.path.insert(0, str(ROOT / "scripts" / "diffusion"))
import train_dreambooth


def main(workdir: Path) -> None:
    probe = torch.load(workdir / "probe.pt")

    def out(unet) -> torch.Tensor:
        with torch.no_grad():
            return unet(probe["latents"], probe["t"], encoder_hidden_states=probe["text"]).sample

    geo = PeftModel.from_pretrained(
        train_dreambooth.tiny_pipeline(workdir / "child").unet, str(workdir / "unet_geolora")
    )
    geo.eval()
    pipe = train_dreambooth.tiny_pipeline(workdir / "child")
    pipe.load_lora_weights(str(workdir / "unet_lora"), weight_name="diffusers_lora.safetensors")
    pipe.unet.eval()
    print(
        json.dumps(
            {
                "geolora": (out(geo) - probe["expected"]).abs().max().item(),
                "diffusers_lora": (out(pipe.unet) - probe["expected"]).abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
