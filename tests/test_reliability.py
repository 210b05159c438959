"""Bad settings fail at once with a clear message; low precision never poisons the factors."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_geolora import GeoLoraConfig, RankAllocator

from .helpers import orthonormality_error
from .tiny_models import build, inputs


class FakeGptqLinear(nn.Linear):
    """Stands in for a GPTQ layer (a Linear subclass from a quantization package GeoLoRA does not support)."""


FakeGptqLinear.__module__ = "auto_gptq.nn_modules.qlinear"


class Quantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = FakeGptqLinear(4, 4)

    def forward(self, x):
        return self.lin(x)


def test_unsupported_quantized_base_layers_are_refused_naming_the_supported_ones() -> None:
    with pytest.raises(TypeError, match="does not support this quantized base layer.*auto_gptq.*Linear4bit"):
        get_peft_model(Quantized(), GeoLoraConfig(target_modules=["lin"]))


def test_sharded_factors_are_refused() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), GeoLoraConfig(target_modules=["0"], r=2))
    U = model.base_model.model[0].geolora_U["default"]
    U.ds_id, U.ds_persist = 7, True  # what DeepSpeed ZeRO-3 attaches to a parameter it keeps whole everywhere
    with pytest.raises(RuntimeError, match="ZeRO-3 needs its factors partitioned.*stage3_param_persistence_threshold"):
        RankAllocator(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_the_coefficient_rule_is_refused_under_deepspeed_zero() -> None:
    model = get_peft_model(
        nn.Sequential(nn.Linear(4, 4)), GeoLoraConfig(target_modules=["0"], r=2, step_rule="coefficient")
    )
    model.base_model.model[0].geolora_U["default"]._hp_mapping = object()  # what ZeRO-1/2 link to their parameters
    with pytest.raises(RuntimeError, match='step_rule="coefficient" does not run under DeepSpeed ZeRO.*default'):
        RankAllocator(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("name", ["geo", "lora", "geolora"])
def test_adapter_name_inside_the_prefix_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"Adapter name `{name}` is contained"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), GeoLoraConfig(target_modules=["0"]), adapter_name=name)


def test_lora_only_options_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="use_dora"):
        GeoLoraConfig(target_modules=["lin"], use_dora=True)


def _train_tiny_bert(dtype: torch.dtype, autocast: bool = False, steps: int = 6):
    """Only the adapters train (PEFT keeps them in fp32); the frozen base runs in ``dtype``."""
    model, targets = build("bert")
    model = model.to(dtype)
    model = get_peft_model(model, GeoLoraConfig(target_modules=targets, r=4, max_rank=6, tau=0.3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    allocator = RankAllocator(model, optimizer)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**inputs(seed=step)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1, 0]))
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(**inputs(seed=50)).logits.float()
    return model, allocator, losses, logits


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)])
def test_low_precision_training_stays_finite_and_close_to_fp32(dtype: torch.dtype, autocast: bool) -> None:
    _, _, _, reference = _train_tiny_bert(torch.float32)
    model, _allocator, losses, logits = _train_tiny_bert(dtype, autocast)
    assert all(torch.isfinite(torch.tensor(losses)))
    for module in model.modules():
        if hasattr(module, "geolora_U"):
            U, S, V = (t.detach() for t in module.active_factors("default"))
            assert U.dtype == torch.float32  # PEFT keeps adapter weights in fp32 by default
            assert torch.isfinite(S).all() and orthonormality_error(U) < 1e-5 and orthonormality_error(V) < 1e-5
    assert (logits - reference).abs().max() < 0.1


def test_bf16_factors_keep_fp32_factorizations() -> None:
    """With autocast_adapter_dtype=False the factors themselves are bf16; QR and SVD still run in fp32."""
    model, targets = build("bert")
    model = get_peft_model(
        model.to(torch.bfloat16),
        GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, max_rank=6),
        autocast_adapter_dtype=False,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    allocator = RankAllocator(model, optimizer, cycle_length=0)
    for step in range(4):
        model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    layer = next(m for m in model.modules() if hasattr(m, "geolora_U"))
    U = layer.active_factors("default")[0].detach()
    assert U.dtype == torch.bfloat16 and torch.isfinite(U).all()
    assert orthonormality_error(U.float()) < 2e-2  # bf16 storage rounding only


def test_zero_gradients_at_initialisation_do_not_break_the_step() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), GeoLoraConfig(target_modules=["0"], r=2, max_rank=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    allocator = RankAllocator(model, optimizer, cycle_length=0)
    for _ in range(3):
        (model(torch.zeros(3, 6)) * 0).sum().backward()  # all-zero gradients
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    layer = model.base_model.model[0]
    U, S, _V = (t.detach() for t in layer.active_factors("default"))
    assert layer.rank["default"] == 1  # min_rank: nothing to keep
    assert torch.isfinite(U).all() and orthonormality_error(U) < 1e-6 and torch.all(S == 0)


class UnknownZeroOptimizer:
    """Stands in for a DeepSpeed ZeRO optimizer whose layout GeoLoRA does not know: a torch optimizer over flat
    partitions, wrapped, without the model's parameter groups (``bit16_groups`` / ``fp16_groups``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


UnknownZeroOptimizer.__module__ = "deepspeed.runtime.zero.stage_1_and_2"


def test_an_unknown_deepspeed_zero_optimizer_is_refused_naming_what_is_missing() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), GeoLoraConfig(target_modules=["0"], r=2))
    flat = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(10))])
    with pytest.raises(RuntimeError, match="does not know this DeepSpeed optimizer.*bit16_groups"):
        RankAllocator(model, UnknownZeroOptimizer(flat))


def _llama_run(steps: int, lr: float, **config) -> tuple[list[str], float, RankAllocator]:
    """A LoRA user's recipe on a tiny Llama, every linear layer, AdamW: the runaway warnings and the largest
    ``‖ΔW‖_F`` at the end, and the allocator."""
    model, _ = build("llama", seed=0)
    model = get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules="all-linear", **config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        allocator = RankAllocator(model, optimizer)
        for step in range(steps):
            model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
            optimizer.step()
            allocator.step()
            optimizer.zero_grad()
        allocator.finish()
    largest = max(float(a.layer.get_delta_weight(a.adapter).norm()) for a in allocator.adapters)
    return [str(w.message) for w in caught if "running away" in str(w.message)], largest, allocator


def test_a_runaway_adapter_is_reported_once_with_the_setting_to_change() -> None:
    """A fixed scale of 16 (what lora_alpha=16 meant before it was read as LoRA's) at lr 2e-2: the adapters grow to
    hundreds of times their base weights' norm with the loss at chance (bounded since the relative step's ceiling:
    6.5e9 after 60 steps without it). The allocator says so, once per adapter, naming the layer, the scale, the
    learning rate and what to change."""
    messages, largest, allocator = _llama_run(40, 2e-2, scaling=16.0)
    assert 1e2 < largest < 1e3, largest  # the divergence the watch is for, held by the ceiling
    assert messages and len(messages) == len(set(messages))
    assert "s = 16" in messages[0] and "lr 0.02" in messages[0] and "leave `scaling` unset" in messages[0]
    assert "base_model.model.model.layers." in messages[0]
    assert len(allocator.runaway_layers()) == len(messages)


@pytest.mark.parametrize("config", [{}, {"lora_alpha": 16.0}, {"lora_alpha": 32.0}], ids=["defaults", "a16", "a32"])
def test_the_defaults_and_a_lora_users_alpha_at_the_same_rate_do_not_trip_the_watch(config: dict) -> None:
    """The defaults, and LoRA's lora_alpha 16 or 32 with r=8 (read as LoRA reads it: the tuned step, or twice it)."""
    messages, largest, allocator = _llama_run(40, 2e-2, **config)
    assert not messages and largest < 10, largest
    assert allocator.runaway_layers() == []
