"""DreamBooth-style fine-tuning of a diffusers UNet with GeoLoRA and the rank allocator.

    python scripts/diffusion/train_dreambooth.py --pretrained_model_name_or_path MODEL --instance_dir IMAGES \\
        --instance_prompt "a photo of sks dog" --output_dir out [--train_convs] [--max_steps 400 --lr 1e-4]
    python scripts/diffusion/train_dreambooth.py --tiny --output_dir out      # offline: tiny models, real photos

``MODEL`` is a Stable Diffusion folder or Hub id (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler``). ``--tiny`` builds a tiny UNet, VAE and CLIP text encoder from configs (random weights, a character
level tokenizer) and trains on scikit-learn's two sample photographs: it exercises the whole path offline in
seconds, it does not make pictures worth looking at. GeoLoRA goes on the UNet's attention projections (``to_q``,
``to_k``, ``to_v``, ``to_out.0``) and, with ``--train_convs``, on the ResNet convolutions (``conv1``, ``conv2``).

Writes ``OUTPUT_DIR/unet_geolora`` (the GeoLoRA adapter: ``import peft_geolora`` and
``PeftModel.from_pretrained(pipe.unet, ...)``), ``OUTPUT_DIR/unet_lora`` (the same adapter exported exactly to
plain LoRA, ``diffusers_lora.safetensors`` inside loads with ``pipe.load_lora_weights`` and no plugin) and
``results.json``; with ``--sample`` also a few generated images through the pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import peft_geolora
from peft_geolora import GeoLoraConfig, RankAllocator


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained_model_name_or_path")
    source.add_argument("--tiny", action="store_true", help="offline tiny models from configs (tests, smoke runs)")
    parser.add_argument("--instance_dir", help="folder of instance images (default: scikit-learn's sample photos)")
    parser.add_argument("--instance_prompt", default="a photo of sks flower")
    parser.add_argument("--output_dir", default="outputs/dreambooth")
    parser.add_argument("--resolution", type=int, help="default: 512, or 32 with --tiny")
    parser.add_argument("--train_convs", action="store_true", help="also adapt the ResNet convolutions")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--max_rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="generate images with the fine-tuned pipeline")
    return parser.parse_args(argv)


def _tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (byte-level alphabet, no merges), written to ``folder``."""
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to code points from 256 on
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def tiny_pipeline(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """Tiny random UNet, VAE and CLIP text encoder from configs (seeded), as a Stable Diffusion pipeline."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )  # fmt: skip
    tokenizer = _tiny_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def instance_images(folder: str | None, resolution: int) -> torch.Tensor:
    """(N, 3, res, res) in [-1, 1]: the images of ``folder``, or scikit-learn's two sample photographs."""
    from PIL import Image

    if folder is None:
        from sklearn.datasets import load_sample_images

        pictures = [Image.fromarray(a) for a in load_sample_images().images]
    else:
        pictures = [Image.open(p).convert("RGB") for p in sorted(Path(folder).iterdir()) if p.is_file()]
    arrays = [np.asarray(p.resize((resolution, resolution)), dtype=np.float32) / 127.5 - 1.0 for p in pictures]
    return torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2)


def diffusers_lora_state_dict(lora_dir: Path) -> dict[str, torch.Tensor]:
    """The exported PEFT LoRA weights keyed for ``pipe.load_lora_weights`` (``unet.<module>.lora_A.weight``)."""
    state = load_file(str(lora_dir / "adapter_model.safetensors"))
    return {"unet." + k.removeprefix("base_model.model."): v for k, v in state.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.tiny:
        pipe = tiny_pipeline(out / "tiny", args.seed)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    resolution = args.resolution or (32 if args.tiny else 512)
    for module in (pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    targets = ATTENTION + (["conv1", "conv2"] if args.train_convs else [])
    config = GeoLoraConfig(target_modules=targets, r=args.r, max_rank=args.max_rank)
    unet = get_peft_model(pipe.unet, config)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.lr)
    allocator = RankAllocator(unet, optimizer)

    pixels = instance_images(args.instance_dir, resolution)
    ids = pipe.tokenizer(
        [args.instance_prompt] * len(pixels), padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        latents0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    unet.train()
    for _ in range(args.max_steps):
        noise = torch.randn(latents0.shape, generator=g)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents0),), generator=g)
        noisy = pipe.scheduler.add_noise(latents0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, noise)
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    allocator.finish()
    unet.eval()
    unet.save_pretrained(str(out / "unet_geolora"))
    peft_geolora.export_to_lora(unet, str(out / "unet_lora"))
    save_file(diffusers_lora_state_dict(out / "unet_lora"), str(out / "unet_lora" / "diffusers_lora.safetensors"))
    results = {
        "steps": args.max_steps,
        "losses": losses,
        "ranks": allocator.ranks(),
        "rank_changes": sum(len(v) for v in allocator.rank_history().values()),
        "adapter_params": allocator.num_adapter_parameters(),
    }
    if args.sample:
        pipe.unet = unet
        images = pipe(args.instance_prompt, num_inference_steps=4, height=resolution, width=resolution,
                      output_type="pil", generator=torch.Generator().manual_seed(args.seed)).images  # fmt: skip
        for i, image in enumerate(images):
            image.save(out / f"sample_{i}.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{results['adapter_params']:,} adapter parameters after {args.max_steps} steps; saved to {out}")
    return results


if __name__ == "__main__":
    main()
