"""Damaged, poisoned and mismatched adapter files on every load path users take.

Each case writes an intact adapter (a tiny BERT classifier with GeoLoRA on its encoder and a trained head), then
damages one thing in it; each path loads it the way users do. A damaged file, a poisoned tensor or a file that does
not describe the model must raise an error that names what is wrong; a config from a newer version still loads, with
a warning that names the unknown field.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import peft_geolora
from peft_geolora import GeoLoraCallback, GeoLoraConfig

from .tiny_models import build, classification_dataset


WEIGHTS, CONFIG, ALLOCATOR = "adapter_model.safetensors", "adapter_config.json", "geolora_allocator.safetensors"


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


def _first(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:-10])


def _garble_header(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:40] = b"\x00\xff" * 16
    (folder / WEIGHTS).write_bytes(bytes(data))


def _poison(suffix: str, value: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        _edit_tensors(folder, lambda t: t[_first(t, suffix)].view(-1).__setitem__(0, value))

    return damage


def _integer_V(folder: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        key = _first(t, "geolora_V")
        t[key] = t[key].to(torch.int32)

    _edit_tensors(folder, edit)


def _drop_S(folder: Path) -> None:
    _edit_tensors(folder, lambda t: t.pop(_first(t, "geolora_S")))


def _extra_layer(folder: Path) -> None:
    """A consistent adapter for a deeper model: layer 0's query adapter copied to a layer 7 the base lacks."""
    source = "bert.encoder.layer.0.attention.self.query"

    def edit(t: dict[str, torch.Tensor]) -> None:
        for part in ("U", "S", "V", "rank"):
            key = f"base_model.model.{source}.geolora_{part}"
            t[key.replace("layer.0.", "layer.7.")] = t[key].clone()

    _edit_tensors(folder, edit)
    _edit_config(folder, lambda c: c["rank_pattern"].__setitem__(source.replace("0", "7"), c["rank_pattern"][source]))


def _missing_layer(folder: Path) -> None:
    """A consistent adapter without layer 1's query adapter (another `target_modules`)."""
    source = "bert.encoder.layer.1.attention.self.query"
    _edit_tensors(folder, lambda t: [t.pop(f"base_model.model.{source}.geolora_{p}") for p in ("U", "S", "V", "rank")])
    _edit_config(folder, lambda c: c["rank_pattern"].pop(source))


def _rank_pattern_disagrees(folder: Path) -> None:
    def edit(config: dict) -> None:
        name = min(config["rank_pattern"])
        config["rank_pattern"][name] += 1

    _edit_config(folder, edit)


def _future_field(folder: Path) -> None:
    _edit_config(folder, lambda config: config.__setitem__("option_from_the_future", 3))


# case → (damage, what the error must say); None: it loads, with a warning naming the field
CASES: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "truncated": (_truncate, rf"{WEIGHTS} is damaged or truncated"),
    "garbled_header": (_garble_header, rf"{WEIGHTS} is damaged"),
    "nan_in_U": (_poison("geolora_U", float("nan")), "non-finite values"),
    "inf_in_S": (_poison("geolora_S", float("inf")), "non-finite values"),
    "nan_in_head": (_poison("classifier.weight", float("nan")), "non-finite values"),
    "integer_V": (_integer_V, "dtype torch.int32"),
    "missing_S": (_drop_S, "lacks .*geolora_S"),
    "extra_layer": (_extra_layer, "layer.7.* no such GeoLoRA layer"),
    "missing_layer": (_missing_layer, r"(lacks|layers) .*layer\.1\.attention\.self\.query\.geolora_"),
    "rank_pattern_disagrees": (_rank_pattern_disagrees, "records rank .* weights file holds rank"),
    "future_field": (_future_field, None),
}


def _peft_model(seed: int = 0) -> PeftModel:
    model, targets = build("bert", seed=seed)
    return get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, max_rank=6))


def _training_args(output_dir: Path, max_steps: int, **options) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **options,
    )


class _DamageAfterSave(TrainerCallback):
    """Damages checkpoint-3 right after the Trainer wrote it (the best checkpoint's files, read again at the end)."""

    def __init__(self, damage: Callable[[Path], None]) -> None:
        self.damage = damage

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.global_step == 3:
            self.damage(Path(args.output_dir) / "checkpoint-3")


def _load_best(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    eval_data = classification_dataset(8)
    args = _training_args(
        tmp_path / "run",
        6,
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="closeness",
        greater_is_better=True,
    )
    trainer = Trainer(
        model=_peft_model(),
        args=args,
        train_dataset=classification_dataset(),
        eval_dataset=eval_data,
        compute_metrics=lambda _: {"closeness": -abs(trainer.state.global_step - 3)},
        callbacks=[GeoLoraCallback(), _DamageAfterSave(damage)],
    )
    trainer.train()


def _resume(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    first = Trainer(
        model=_peft_model(),
        args=_training_args(tmp_path / "run", 3),
        train_dataset=classification_dataset(),
        callbacks=[GeoLoraCallback()],
    )
    first.train()
    damage(tmp_path / "run" / "checkpoint-3")
    again = Trainer(
        model=_peft_model(),
        args=_training_args(tmp_path / "run", 6),
        train_dataset=classification_dataset(),
        callbacks=[GeoLoraCallback()],
    )
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    """An intact adapter (non-zero factors, a head moved away from its initialisation) and its base model, on disk."""
    base, _ = build("bert", seed=0)
    base.save_pretrained(tmp_path / "base")
    model = _peft_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "geolora_S" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.ones_like(p))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def _plain(base: Path) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(base)


def _into(model: torch.nn.Module, load: Callable[[torch.nn.Module], object]) -> torch.nn.Module:
    load(model)
    return model


PATHS: dict[str, Callable[[Path, Path], torch.nn.Module]] = {
    "PeftModel.from_pretrained": lambda base, adapter: PeftModel.from_pretrained(_plain(base), adapter),
    "PeftModel.load_adapter": lambda base, adapter: _into(
        _peft_model(), lambda m: (m.load_adapter(adapter, "other"), m.set_adapter("other"))
    ),
    "load_adapter(is_trainable=True)": lambda base, adapter: _into(
        _peft_model(), lambda m: m.load_adapter(adapter, "default", is_trainable=True)
    ),
    "AutoPeftModelForSequenceClassification": lambda base, adapter: (
        AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    ),
    "transformers load_adapter": lambda base, adapter: _into(_plain(base), lambda m: m.load_adapter(adapter)),
    "peft_geolora.from_pretrained": lambda base, adapter: peft_geolora.from_pretrained(_plain(base), adapter),
}
TRAINER_PATHS = {"Trainer resume": _resume, "Trainer load_best_model_at_end": _load_best}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", [*PATHS, *TRAINER_PATHS])
def test_every_load_path_refuses_damage_poison_and_mismatch(case: str, path: str, tmp_path: Path) -> None:
    damage, error = CASES[case]
    if path in TRAINER_PATHS:
        load = lambda: TRAINER_PATHS[path](tmp_path, damage)  # noqa: E731
    else:
        base, adapter = _saved(tmp_path)
        damage(adapter)
        load = lambda: PATHS[path](base, adapter)  # noqa: E731
    if error is None:
        with pytest.warns(UserWarning, match="option_from_the_future"):
            load()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=error):
            load()


@pytest.mark.parametrize("case", ["truncated", "nan"])
def test_resume_refuses_a_damaged_or_poisoned_allocator_state(case: str, tmp_path: Path) -> None:
    """The step rule's state (``geolora_allocator.safetensors``) is read on resume: damage there is refused too."""

    def damage(folder: Path) -> None:
        path = folder / ALLOCATOR
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:-10])
        else:
            tensors = load_file(path)
            tensors[min(tensors)].view(-1)[0] = float("nan")
            save_file(tensors, path)

    match = f"{ALLOCATOR} is damaged" if case == "truncated" else "non-finite"
    with pytest.raises(ValueError, match=match):
        _resume(tmp_path, damage)


def test_intact_files_load_on_every_path(tmp_path: Path) -> None:
    """The battery's control: the same adapter, undamaged, loads on every path and computes the same outputs."""
    base, adapter = _saved(tmp_path)
    ids = {"input_ids": torch.tensor([[3, 5, 7, 9]])}
    outputs = {}
    for name, load in PATHS.items():
        model = load(base, adapter).eval()
        with torch.no_grad():
            outputs[name] = model(**ids).logits
    reference = outputs.pop("PeftModel.from_pretrained")
    assert not torch.equal(reference, _plain(base).eval()(**ids).logits)  # the adapter changes the outputs
    for name, logits in outputs.items():
        assert torch.allclose(reference, logits, atol=1e-6), name
