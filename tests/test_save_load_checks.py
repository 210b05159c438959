"""Nothing loads as a silently different model: mismatched saves and inconsistent tensors are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_geolora
from peft_geolora import GeoLoraConfig, RankAllocator

from .helpers import Dense


def _trained(seed: int, steps: int = 6):
    torch.manual_seed(seed)
    model = get_peft_model(
        Dense(12, 16), GeoLoraConfig(target_modules=["lin"], r=4, max_rank=6, tau=0.3, cycle_length=0)
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    allocator = RankAllocator(model, optimizer)
    target = torch.randn(16, 12)
    for _ in range(steps):
        (model(torch.eye(12)) - target.T).square().sum().backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    return model


def _base():
    torch.manual_seed(123)
    return Dense(12, 16)


def test_config_and_weights_from_different_saves_are_refused(tmp_path: Path) -> None:
    a, b = _trained(0), _trained(1)
    a.base_model.model.lin.set_rank("default", 2)
    b.base_model.model.lin.set_rank("default", 3)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")  # half-finished save
    with pytest.raises(ValueError, match="records rank 3 .* weights file holds rank 2"):
        PeftModel.from_pretrained(_base(), tmp_path / "a")


def test_tensor_disagreeing_with_its_rank_is_refused(tmp_path: Path) -> None:
    model = _trained(0)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("geolora_U"))
    tensors[key] = torch.cat([tensors[key], torch.zeros(16, 1)], dim=1)  # one column more than its rank says
    save_file(tensors, path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank buffer says 5"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_missing_rank_buffer_is_refused(tmp_path: Path) -> None:
    model = _trained(0)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if "geolora_rank" not in k}
    save_file(tensors, path)
    with pytest.raises(ValueError, match="lacks .*geolora_rank"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_saving_then_loading_another_checkpoint_into_the_live_model_works(tmp_path: Path) -> None:
    """A save records ranks in the live config; loading a different checkpoint later must not trip on them."""
    model = _trained(0)
    model.base_model.model.lin.set_rank("default", 2)
    model.save_pretrained(tmp_path / "now")
    other = _trained(1)
    other.save_pretrained(tmp_path / "other")
    model.load_adapter(tmp_path / "other", "default", is_trainable=True)
    assert model.base_model.model.lin.rank["default"] == other.base_model.model.lin.rank["default"]
    x = torch.randn(3, 12)
    model.eval()
    other.eval()
    assert torch.equal(model(x), other(x))


def _saved(tmp_path: Path) -> Path:
    _trained(0).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("cut", [3, 100, -10])
def test_truncated_weights_file_is_reported_as_damaged(cut: int, tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])  # a positive cut keeps the head, a negative one drops the tail
    with pytest.raises(peft_geolora.DamagedAdapterError, match="damaged or truncated.*save or download"):
        peft_geolora.from_pretrained(_base(), folder)


@pytest.mark.parametrize("path", ["PeftModel.from_pretrained", "load_adapter"])
def test_peft_own_loaders_name_a_truncated_weights_file(path: str, tmp_path: Path) -> None:
    """PEFT's loaders (what users call) report a truncated file as damaged and name it, instead of safetensors'
    bare header error."""
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(peft_geolora.DamagedAdapterError, match=r"adapter_model\.safetensors is damaged or truncated"):
        if path == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(_base(), folder)
        else:
            _trained(1).load_adapter(folder, "other")


def test_corrupted_header_and_config_are_reported(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10:20] = b"\xff" * 10  # inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(peft_geolora.DamagedAdapterError, match="header does not parse"):
        peft_geolora.from_pretrained(_base(), folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "GEO')  # a save killed while writing the config
    with pytest.raises(peft_geolora.DamagedAdapterError, match="not valid JSON"):
        peft_geolora.from_pretrained(_base(), folder)


def test_intact_adapter_loads_through_the_checked_path(tmp_path: Path) -> None:
    model = _trained(0)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft_geolora.from_pretrained(_base(), tmp_path / "adapter")
    x = torch.randn(2, 12)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_config_from_a_newer_version_loads_with_a_warning(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["option_from_the_future"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="option_from_the_future"):
        peft_geolora.from_pretrained(_base(), folder)


class DenseWithHead(Dense):
    """Dense with a trained head (``modules_to_save``): its tensors are saved beside the factors."""

    def __init__(self) -> None:
        super().__init__(12, 16)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(x))


@pytest.mark.parametrize("poison", ["nan_in_U", "inf_in_S", "nan_in_head", "integer_V"])
@pytest.mark.parametrize("path", ["PeftModel.from_pretrained", "load_adapter", "peft_geolora.from_pretrained"])
def test_poisoned_or_mistyped_tensors_are_refused_on_every_load_path(poison: str, path: str, tmp_path: Path) -> None:
    """A NaN or an infinity in any adapter tensor, or a factor of the wrong dtype, is refused with the tensor's name
    instead of loading a model that computes NaN."""
    torch.manual_seed(0)
    model = get_peft_model(
        DenseWithHead(), GeoLoraConfig(target_modules=["lin"], r=4, max_rank=6, modules_to_save=["head"])
    )
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    suffix = {"nan_in_U": "geolora_U", "inf_in_S": "geolora_S", "nan_in_head": "head.weight", "integer_V": "geolora_V"}
    key = next(k for k in tensors if k.endswith(suffix[poison]))
    if poison == "integer_V":
        tensors[key] = tensors[key].to(torch.int32)
    else:
        tensors[key].view(-1)[0] = float("nan") if "nan" in poison else float("inf")
    save_file(tensors, weights)
    match = "dtype torch.int32" if poison == "integer_V" else "non-finite values"
    with pytest.raises(ValueError, match=match):
        if path == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(DenseWithHead(), tmp_path / "adapter")
        elif path == "load_adapter":
            model.load_adapter(tmp_path / "adapter", "again")
        else:
            peft_geolora.from_pretrained(DenseWithHead(), tmp_path / "adapter")
