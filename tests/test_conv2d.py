"""GeoLoRA on torch.nn.Conv2d: the integrator's gradients against dense autograd, training, save/load, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_geolora
from peft_geolora import GeoLoraConfig, RankAllocator
from peft_geolora.gradients import GeoLoraConvFunction

from .conv_models import images, tiny_cnn
from .processes import run_child


CONVS = [  # (in, out, kernel, stride, padding, dilation)
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (4, 6, (3, 2), (2, 1), (0, 1), (1, 2)),
    (4, 3, (1, 1), (1, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("integrated, bases", [(True, True), (False, True), (True, False)])
def test_conv_gradients_match_dense_autograd_in_fp64(conv, integrated: bool, bases: bool) -> None:
    c, m, kernel, stride, padding, dilation = conv
    n, r, s = c * kernel[0] * kernel[1], 3, 0.7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    U = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))[0].requires_grad_()
    V = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))[0].requires_grad_()
    S = torch.randn(r, r, dtype=torch.float64, generator=g).requires_grad_()
    options = {"stride": stride, "padding": padding, "dilation": dilation}

    y = GeoLoraConvFunction.apply(x, U, S, V, s, integrated, bases, (c, *kernel), stride, padding, dilation)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    gx, gU, gS, gV = torch.autograd.grad(y, (x, U, S, V), dy)

    W = (s * U @ S @ V.T).detach().requires_grad_()  # the dense update, (m, n)
    x2 = x.detach().requires_grad_()
    y_dense = torch.nn.functional.conv2d(x2, W.reshape(m, c, *kernel), **options)
    assert torch.allclose(y, y_dense, atol=1e-12)
    dense_gx, G = torch.autograd.grad(y_dense, (x2, W), dy)
    G = G * s  # G = s Σ δ patchᵀ, the integrator's G: ∂loss/∂W times the scale
    assert torch.allclose(gx, dense_gx, atol=1e-10)
    Ud, Sd, Vd = U.detach(), S.detach(), V.detach()
    if not bases:  # an S-only step: U and V get zeros
        expected = (torch.zeros_like(Ud), Ud.T @ G @ Vd, torch.zeros_like(Vd))
    elif integrated:
        expected = (G @ Vd, Ud.T @ G @ Vd, G.T @ Ud)
    else:
        expected = (G @ Vd @ Sd.T, Ud.T @ G @ Vd, G.T @ Ud @ Sd)
    for got, want in zip((gU, gS, gV), expected):
        assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def _model(**overrides):
    config = {"target_modules": ["conv1", "conv2", "conv3"], "modules_to_save": ["head"], "r": 3, "max_rank": 4}
    return get_peft_model(tiny_cnn(), GeoLoraConfig(**{**config, **overrides}))


def _train(model, steps: int = 12) -> RankAllocator:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    allocator = RankAllocator(model, optimizer, tau=0.3)
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    model.train()
    for step in range(steps):
        loss = (model(images(seed=step)) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    allocator.finish()
    return allocator


def test_conv_layers_train_with_the_allocator_and_reload_and_export_exactly(tmp_path: Path) -> None:
    model = _model()
    assert {type(m).__name__ for m in model.modules() if isinstance(m, peft_geolora.GeoLoraLayer)} == {"Conv2d"}
    allocator = _train(model)
    assert any(allocator.rank_history().values()), "ranks never changed"
    model.save_pretrained(str(tmp_path / "adapter"))
    peft_geolora.export_to_lora(model, str(tmp_path / "lora"))
    model.eval()
    with torch.no_grad():
        torch.save(model(images()), tmp_path / "outputs.pt")
    result = run_child("tests.conv_child", str(tmp_path))
    assert result["adapter"] == 0.0, result
    assert result["lora"] <= 1e-5, result
    from_files = peft_geolora.export_adapter_dir(tmp_path / "adapter", tmp_path / "lora_from_files")
    assert (tmp_path / "lora_from_files" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "lora" / "adapter_model.safetensors"
    ).read_bytes()
    assert from_files.rank_pattern


def test_a_dilated_conv_trains_but_its_lora_export_is_refused(tmp_path: Path) -> None:
    model = tiny_cnn()
    model.conv2 = torch.nn.Conv2d(8, 12, 3, padding=2, dilation=2)
    geo = get_peft_model(model, GeoLoraConfig(target_modules=["conv2"], r=2, max_rank=4, init_weights=False))
    geo(images()).sum().backward()
    with pytest.raises(ValueError, match="dilated convolutions"):
        peft_geolora.export_to_lora(geo, str(tmp_path / "lora"))


def test_conv_merge_and_unmerge_round_trip() -> None:
    model = _model(init_weights=False)
    model.eval()
    with torch.no_grad():
        before = model(images())
        model.merge_adapter()
        merged = model(images())
        model.unmerge_adapter()
        after = model(images())
    assert (merged - before).abs().max().item() <= 1e-5
    assert (after - before).abs().max().item() <= 1e-5


def test_unsupported_convolutions_are_refused_clearly() -> None:
    class Grouped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=2, padding="same")

    with pytest.raises(TypeError, match="groups=2.*padding='same'"):
        get_peft_model(Grouped(), GeoLoraConfig(target_modules=["conv"]))
