"""GeoLoRA on tiny transformers (BERT, DeBERTa-v2, GPT-2, Llama) built from configs.

Save → fresh process → load gives identical logits through every load path users take, after ranks have
changed; merged and unmerged outputs agree; gradient checkpointing trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

from peft_geolora import GeoLoraConfig, RankAllocator

from .processes import run_child
from .tiny_models import CONFIGS, build, inputs


def _geolora(kind: str, base_dir: Path | None = None, **config):
    model, targets = build(kind)
    if base_dir is not None:  # load the base from disk, so the adapter records where it is
        model.save_pretrained(base_dir)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    config.setdefault("r", 4)
    config.setdefault("max_rank", 6)
    return get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, **config))


def _train(model, steps: int = 8, lr: float = 5e-3) -> RankAllocator:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = RankAllocator(model, optimizer, tau=0.3)
    model.train()
    for step in range(steps):
        batch = inputs(seed=step)
        loss = model(**batch, labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    return allocator


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_fresh_process_load_is_exact(kind: str, tmp_path: Path) -> None:
    model = _geolora(kind, base_dir=tmp_path / "base")
    allocator = _train(model)
    # also truncate one layer by hand, as the allocator would
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "geolora_U"))
    layer.set_rank("default", max(1, layer.rank["default"] - 1))
    ranks = allocator.ranks()
    assert any(r != 4 for r in ranks.values()), "ranks should have changed during training"

    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GEOLORA"
    assert saved["rank_pattern"][name.removeprefix("base_model.model.")] == layer.rank["default"]
    assert saved["rank_history"] == {
        k.removeprefix("base_model.model."): [list(e) for e in v] for k, v in allocator.rank_history().items() if v
    }

    batch = inputs(seed=123)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save(batch, tmp_path / "inputs.pt")
    torch.save(logits, tmp_path / "logits.pt")

    diffs = run_child("tests.roundtrip_child", str(tmp_path))
    assert len(diffs) == 4
    assert all(d == 0.0 for d in diffs.values()), diffs


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_merged_and_unmerged_outputs_agree(kind: str) -> None:
    model = _geolora(kind, init_weights=False)
    _train(model, steps=3)
    model.eval()
    batch = inputs()
    with torch.no_grad():
        unmerged = model(**batch).logits
        model.merge_adapter()
        merged = model(**batch).logits
        model.unmerge_adapter()
        again = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, unmerged, atol=1e-4)
    merged_model = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged_model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_trains(kind: str) -> None:
    model = _geolora(kind)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train(model, steps=4)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("geolora_S" in n for n in changed) and any("geolora_U" in n for n in changed)


def test_all_linear_targets_every_linear_but_the_head() -> None:
    model, _ = build("bert")
    model = get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=2))
    adapted = {n for n, m in model.named_modules() if hasattr(m, "geolora_U")}
    assert any(n.endswith("attention.self.query") for n in adapted)
    assert not any("classifier" in n for n in adapted)


@pytest.mark.parametrize("loader", ["transformers load_adapter", "AutoPeftModel"])
def test_a_poisoned_factor_is_refused_by_transformers_and_auto_loading(loader: str, tmp_path: Path) -> None:
    """transformers' own ``load_adapter`` and ``AutoPeftModel*`` refuse a factor holding a NaN, naming it, before
    any tensor reaches the model (the file checks run inside both loaders)."""
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file, save_file

    model = _geolora("bert", base_dir=tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("geolora_V"))
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"geolora_V.* holds non-finite values"):
        if loader == "AutoPeftModel":
            AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
        else:
            AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").load_adapter(str(tmp_path / "adapter"))
