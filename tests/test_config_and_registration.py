"""Registration with PEFT, the config's validation, and errors on unsupported layers."""

from __future__ import annotations

import copy
import importlib
import json
import pickle
import warnings

import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch import nn

import peft_geolora
from peft_geolora import GeoLoraConfig, GeoLoraModel
from peft_geolora import config as config_module


def test_registration_is_idempotent_and_survives_reload() -> None:
    importlib.reload(peft_geolora.registry)
    reloaded = importlib.reload(peft_geolora)
    assert PeftType("GEOLORA") is PeftType.GEOLORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING["GEOLORA"] is reloaded.GeoLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["GEOLORA"] is reloaded.GeoLoraModel
    assert list(PeftType).count(PeftType.GEOLORA) == 1


def test_config_round_trips_through_json_pickle_and_deepcopy(tmp_path) -> None:
    config = GeoLoraConfig(target_modules=["a", "b"], r=4, max_rank=8, budget=20, cycle_length=0)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "GEOLORA"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GeoLoraConfig) and loaded.budget == 20 and loaded.peft_type is PeftType.GEOLORA
    assert pickle.loads(pickle.dumps(config)).peft_type is PeftType.GEOLORA
    assert copy.deepcopy(config).peft_type is PeftType.GEOLORA


def test_max_rank_follows_a_lora_rank_above_the_default_and_refuses_a_smaller_one_with_the_fix() -> None:
    """A LoRA recipe's r=8 or r=16 stores (and may keep) r columns as LoRA does; a smaller r can grow to the default
    storage; max_rank alone sets a smaller storage and starts there; an explicit max_rank below an explicit r is
    refused with the setting that lets it train."""
    default = config_module.DEFAULT_RANK
    assert GeoLoraConfig(target_modules=["lin"]).r == GeoLoraConfig(target_modules=["lin"]).max_rank == default
    assert GeoLoraConfig(target_modules=["lin"], r=16).max_rank == 16
    assert GeoLoraConfig(target_modules=["lin"], r=1).max_rank == default
    smaller = GeoLoraConfig(target_modules=["lin"], max_rank=6)
    assert (smaller.r, smaller.max_rank, smaller.storage_columns()) == (6, 6, 6)
    assert GeoLoraConfig(target_modules=["lin"], max_rank=32).r == default
    with pytest.raises(ValueError, match=r"give max_rank=16 as well"):
        GeoLoraConfig(target_modules=["lin"], r=16, max_rank=8)


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        ({"tau": 1.0}, "tau", "[0, 1)"),
        ({"tau": -0.1}, "tau", "[0, 1)"),
        ({"r": 0}, "r", ">= 1"),
        ({"r": -3}, "r", ">= 1"),
        ({"min_rank": 0}, "min_rank", ">= 1"),
        ({"min_rank": 9, "max_rank": 8, "r": 8}, "min_rank", "<= `max_rank` (8)"),
        ({"r": 32, "max_rank": 16}, "r", "[`min_rank`, `max_rank`] = [1, 16]"),
        ({"lora_dropout": 1.0}, "lora_dropout", "[0, 1)"),
        ({"lora_alpha": 0}, "lora_alpha", "> 0"),
        ({"lora_alpha": "automatic"}, "lora_alpha", "'auto'"),
        ({"budget": 0}, "budget", ">= 1"),
        ({"budget_unit": "layers"}, "budget_unit", "'rank', 'params'"),
        ({"cycle_length": -1}, "cycle_length", ">= 0"),
        ({"step_rule": "adam"}, "step_rule", "'optimizer', 'coefficient'"),
        ({"warmup_steps": -1}, "warmup_steps", ">= 0"),
        ({"warmup_steps": 10, "freeze_step": 5}, "freeze_step", "> `warmup_steps` (10)"),
        ({"bias": "lora_only"}, "bias", "'none', 'all', 'geolora_only'"),
        ({"abs_tol": -1.0}, "abs_tol", ">= 0"),
    ],
)
def test_invalid_settings_name_field_value_and_range(kwargs, field, fragment) -> None:
    with pytest.raises(ValueError) as info:
        GeoLoraConfig(target_modules=["lin"], **kwargs)
    message = str(info.value)
    assert f"`{field}`" in message and fragment in message and repr(kwargs[field]) in message


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(self.emb(x))


def test_unsupported_layer_type_lists_the_supported_ones() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*Conv1D"):
        get_peft_model(WithEmbedding(), GeoLoraConfig(target_modules=["emb"]))


def test_targets_matching_nothing_are_refused() -> None:
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(WithEmbedding(), GeoLoraConfig(target_modules=["nothing_here"]))


def test_rank_is_clamped_per_layer_and_scale_is_fixed() -> None:
    model = get_peft_model(WithEmbedding(), GeoLoraConfig(target_modules=["lin"], r=8, max_rank=8, scaling=4.0))
    layer = model.base_model.model.lin
    assert layer.rank["default"] == 2 and layer.capacity["default"] == 2  # min(in=4, out=2)
    assert layer.scaling["default"] == 4.0
    assert model.peft_config["default"].scaling == 4.0  # recorded in the config, hence in adapter_config.json
    layer.set_rank("default", 1)
    assert layer.scaling["default"] == 4.0  # never follows the current rank


@pytest.mark.parametrize("r", [1, 2, 8])
def test_scale_does_not_depend_on_the_initial_rank(r: int) -> None:
    """A fixed scale and "auto" (lora_alpha = 2r) do not depend on r; a number in lora_alpha does, as in LoRA."""
    model = get_peft_model(WithEmbedding(), GeoLoraConfig(target_modules=["lin"], r=r, max_rank=8, scaling=2.0))
    assert model.base_model.model.lin.scaling["default"] == 2.0
    # the default, "auto", computes with 1 until an allocator writes the scale from the learning rate
    model = get_peft_model(WithEmbedding(), GeoLoraConfig(target_modules=["lin"], r=r, max_rank=8))
    assert model.base_model.model.lin.scaling["default"] == 1.0 and model.peft_config["default"].scaling is None


def test_a_config_saved_by_0_1_0_keeps_its_scale(tmp_path) -> None:
    """0.1.0 wrote rank_pattern but no `scaling` and computed with lora_alpha / r: that is what it loads with."""
    config = GeoLoraConfig(target_modules=["lin"], r=8, max_rank=8, lora_alpha=4)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["scaling"] is None  # written by the allocator (a saved adapter always has it)
    for key in ("scaling", "step_rule", "growth_tol"):
        saved.pop(key)
    saved["rank_pattern"] = {"lin": 2}
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert GeoLoraConfig.from_pretrained(tmp_path).scaling == 4 / 8
    assert PeftConfig.from_pretrained(tmp_path).scaling == 4 / 8


def test_tuner_class_is_the_registered_one() -> None:
    model = get_peft_model(WithEmbedding(), GeoLoraConfig(target_modules=["lin"]))
    assert isinstance(model.base_model, GeoLoraModel)
    assert torch.equal(model.base_model.model.lin.geolora_rank["default"], torch.tensor(2))


def test_an_older_peft_is_refused_with_the_fix(monkeypatch) -> None:
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.1" if name == "peft" else real_version(name))
    with pytest.raises(ImportError, match=r"needs peft >= 0\.21\.0.*0\.20\.1 is installed.*pip install"):
        importlib.reload(peft_geolora)
    monkeypatch.undo()
    importlib.reload(peft_geolora)


def test_a_config_saved_with_retired_step_settings_loads_and_says_what_it_ignores(tmp_path) -> None:
    """0.1.x configs may hold the per-step schedule and the settings of removed step variants: the schedule becomes
    cycle_length=0, the rest is dropped, and a warning names each setting that trained differently from the default."""
    config = GeoLoraConfig(target_modules=["a"], r=4, max_rank=8)
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    default_step = {"schedule": "cycle", "moment_init": "mean", "balance_bases": False, "basis_steps": "every"}
    path.write_text(json.dumps({**saved, **default_step, "relative_step_above": 1.0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded.cycle_length == 3 and not hasattr(loaded, "moment_init")
    path.write_text(json.dumps({**saved, "schedule": "step", "moment_init": "zero", "step_rule": "split"}))
    with pytest.warns(UserWarning, match=r"moment_init='zero', step_rule='split'.*0\.2\.0 removed.*are ignored"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded.cycle_length == 0 and loaded.step_rule == "optimizer"
