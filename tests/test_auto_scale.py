"""The allocator sets the adapter's scale from the optimizer's peak learning rate and ``lora_alpha`` (read as LoRA's
``α / r``, relative to ``α = 2r``, which ``"auto"`` is), so that under Adam the adapter takes the same steps at any
learning rate; the scale is saved and never changes again; a number in ``scaling`` fixes it instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_geolora import GeoLoraConfig, GeoLoraLayer, RankAllocator, geolora_from_lora
from peft_geolora.config import AUTO_ADAPTER_STEP

from .helpers import Dense, adapter_matrix
from .test_rank_recovery_adam import PROBLEMS, low_rank_target, run_geolora
from .tiny_models import build, inputs


def _scales(model) -> set[float]:
    return {m.scaling["default"] for m in model.modules() if isinstance(m, GeoLoraLayer)}


def _bert(**config):
    base, targets = build("bert")
    return get_peft_model(base, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, **config))


@pytest.mark.parametrize("rule", ["optimizer", "coefficient"])
def test_under_adam_the_adapter_takes_the_same_steps_at_any_learning_rate(rule: str) -> None:
    """60 Adam steps on the rank-5 problem at lr 1e-3, 1e-2, 1e-1: the same adapter and rank history with "auto"
    (up to Adam's eps), three very different ones with a fixed scale."""
    A = low_rank_target(*PROBLEMS["64x48_rank5"])
    for options, same in (({"lora_alpha": "auto"}, True), ({"scaling": 1.0}, False)):
        runs = [run_geolora(A, 4, "adam", lr, steps=60, step_rule=rule, **options) for lr in (1e-3, 1e-2, 1e-1)]
        W0 = adapter_matrix(runs[0][0])
        gaps = [(torch.linalg.norm(adapter_matrix(layer) - W0) / torch.linalg.norm(W0)).item() for layer, _, _ in runs]
        if same:
            assert max(gaps) < 1e-3, gaps
            assert runs[0][2] == runs[1][2] == runs[2][2]
            assert runs[2][0].scaling["default"] == pytest.approx(AUTO_ADAPTER_STEP / 1e-1)
        else:
            assert min(gaps[1:]) > 1.0, gaps


def test_the_scale_comes_from_the_peak_learning_rate_and_is_saved_for_good(tmp_path: Path) -> None:
    model = _bert(lora_alpha="auto", r=4, max_rank=6)
    assert model.peft_config["default"].scaling is None and _scales(model) == {1.0}  # until an allocator sets it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 10))  # warm-up: lr is 0 now
    allocator = RankAllocator(model, optimizer)
    expected = AUTO_ADAPTER_STEP / 2e-4
    assert _scales(model) == {expected} and model.peft_config["default"].scaling == expected
    model.train()
    for step in range(8):
        model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        scheduler.step()
        allocator.step()
        optimizer.zero_grad()
    allocator.finish()
    model.eval()
    with torch.no_grad():
        before = model(**inputs(seed=99)).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["scaling"] == expected

    base, _ = build("bert")
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert _scales(loaded) == {expected}
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs(seed=99)).logits, before, rtol=0, atol=1e-6)
    # a new run at another learning rate keeps the saved scale: the adapter never computes something else
    RankAllocator(loaded, torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2))
    assert _scales(loaded) == {expected}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_number_in_lora_alpha_is_read_as_loras_alpha_over_r(optimizer: str) -> None:
    """A LoRA recipe's lora_alpha = 2r gives exactly the "auto" scale, twice that alpha twice the step, whatever r;
    under SGD s = alpha / 2r. The config records the scale it got; the allocator re-reads nothing later."""
    make = (
        (lambda ps: torch.optim.AdamW(ps, lr=2e-3))
        if optimizer == "adamw"
        else (lambda ps: torch.optim.SGD(ps, lr=1e-2))
    )
    unit = AUTO_ADAPTER_STEP / 2e-3 if optimizer == "adamw" else 1.0
    for r, alpha, factor in ((8, 16.0, 1.0), (8, 32.0, 2.0), (4, 16.0, 2.0), (8, 4.0, 0.25)):
        model = _bert(r=r, lora_alpha=alpha, max_rank=16)
        assert model.peft_config["default"].scaling is None  # set by the allocator, as "auto" is
        RankAllocator(model, make(model.parameters()))
        assert _scales(model) == {model.peft_config["default"].scaling}
        assert model.peft_config["default"].scaling == pytest.approx(factor * unit)


def test_a_number_in_scaling_fixes_the_scale() -> None:
    model = _bert(scaling=16.0, lora_alpha=32.0)
    assert _scales(model) == {16.0}
    RankAllocator(model, torch.optim.AdamW(model.parameters(), lr=2e-3))
    assert _scales(model) == {16.0} and model.peft_config["default"].scaling == 16.0


def test_one_cycle_reads_its_maximum_and_sgd_keeps_scale_one() -> None:
    model = _bert()  # "auto" is the default
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2, total_steps=100)  # starts at 2e-2 / 25
    RankAllocator(model, optimizer)
    assert _scales(model) == {AUTO_ADAPTER_STEP / 2e-2}

    model = _bert()
    RankAllocator(model, torch.optim.SGD(model.parameters(), lr=1e-2))
    assert _scales(model) == {1.0} and model.peft_config["default"].scaling == 1.0


def test_a_zero_learning_rate_is_refused_clearly() -> None:
    model = _bert()
    with pytest.raises(ValueError, match=r"scale from the optimizer's learning rate, which is 0\.0"):
        RankAllocator(model, torch.optim.Adam(model.parameters(), lr=0.0))


def test_a_lora_adapter_brought_over_needs_a_numeric_scale() -> None:
    lora = get_peft_model(Dense(6, 5), LoraConfig(target_modules=["lin"], r=2))
    with pytest.raises(ValueError, match=r"trained already.*give `scaling` a number"):
        geolora_from_lora(lora, scaling=None)

