"""GeoLoRA ↔ plain PEFT LoRA: exact export (loadable without peft_geolora) and GeoLoRA started from LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.conversion import save_as_lora
from transformers import AutoModelForSequenceClassification

from peft_geolora import GeoLoraConfig, RankAllocator
from peft_geolora.export import export_adapter_dir, export_to_lora, geolora_from_lora

from .processes import run_child
from .tiny_models import build, inputs


def _train_geolora(kind: str, base_dir: Path):
    model, targets = build(kind)
    model.save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    model = get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, max_rank=6, tau=0.3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    allocator = RankAllocator(model, optimizer)
    for step in range(8):
        model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    allocator.finish()
    model.eval()
    return model


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_exported_adapter_loads_with_plain_peft_and_matches(kind: str, tmp_path: Path) -> None:
    model = _train_geolora(kind, tmp_path / "base")
    export_to_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ranks = {
        n.removeprefix("base_model.model."): m.rank["default"]
        for n, m in model.named_modules()
        if hasattr(m, "geolora_U")
    }
    assert sorted(config["target_modules"]) == sorted(n for n, r in ranks.items() if r > 0)
    assert "exported" in (tmp_path / "lora" / "README.md").read_text()

    batch = inputs(seed=99)
    with torch.no_grad():
        torch.save(model(**batch).logits, tmp_path / "logits.pt")
    torch.save(batch, tmp_path / "inputs.pt")
    torch.save(_linear_weights(model.merge_and_unload()), tmp_path / "merged.pt")
    result = run_child("tests.export_child", str(tmp_path))
    assert not result["geolora_imported"]
    assert result["logits"] <= 1e-5 and result["merged"] <= 1e-5, result


def test_export_from_files_equals_export_from_the_model(tmp_path: Path) -> None:
    model = _train_geolora("bert", tmp_path / "base")
    model.save_pretrained(tmp_path / "geo")
    export_to_lora(model, tmp_path / "from_model")
    subprocess.run(
        [sys.executable, "-m", "peft_geolora.export", str(tmp_path / "geo"), str(tmp_path / "from_files")],
        check=True,
        capture_output=True,
    )
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "from_model" / "adapter_model.safetensors"),
        load_file(tmp_path / "from_files" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_peft_save_as_lora_accepts_geolora(tmp_path: Path) -> None:
    model = _train_geolora("bert", tmp_path / "base")
    save_as_lora(tmp_path / "converted", model, rank=6)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    converted = PeftModel.from_pretrained(base, tmp_path / "converted")
    converted.eval()
    batch = inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)


def _trained_lora(tmp_path: Path, **options):
    model, targets = build("bert")
    model.save_pretrained(tmp_path / "base")
    lora = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
        LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False, **options),
    )
    lora.eval()
    return lora


def test_geolora_started_from_lora_computes_the_same_function_then_adapts(tmp_path: Path) -> None:
    lora = _trained_lora(tmp_path)
    batch = inputs(seed=7)
    with torch.no_grad():
        expected = lora(**batch).logits
    geo = geolora_from_lora(lora, max_rank=6, tau=0.3, cycle_length=0)
    geo.eval()
    with torch.no_grad():
        torch.testing.assert_close(geo(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    geo.train()
    optimizer = torch.optim.AdamW([p for p in geo.parameters() if p.requires_grad], lr=5e-3)
    allocator = RankAllocator(geo, optimizer)
    for step in range(6):
        geo(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    assert any(allocator.rank_history().values())


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        export_adapter_dir(tmp_path, tmp_path / "out")
    lora = _trained_lora(tmp_path)
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="not a GeoLoRA one"):
        export_adapter_dir(tmp_path / "lora", tmp_path / "out")
    with pytest.raises(ValueError, match="exceed `max_rank` = 2"):
        geolora_from_lora(lora, max_rank=2, r=2)
    dora = _trained_lora(tmp_path / "d", use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        geolora_from_lora(dora)
