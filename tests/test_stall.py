"""A run that does not learn is reported once (StallWatch), through the Trainer callback and the GLUE script."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from peft_geolora import GeoLoraCallback, GeoLoraConfig, StallCallback
from peft_geolora.stall import MIN_STEPS, STALL_TOLERANCE, StallWatch

from .tiny_models import build


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "glue"))
import run_glue


def _feed(watch: StallWatch, losses: dict[int, float]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, loss in losses.items():
            watch.update(step, loss)
    return [w for w in caught if "not learning" in str(w.message)]


def test_a_loss_at_its_start_value_is_reported_once_at_half_of_training() -> None:
    noisy_flat = {t: math.log(2) * (1 + 0.01 * math.sin(t)) for t in range(1, 301)}  # the collapsed run: ln 2 throughout
    watch = StallWatch(300)
    caught = _feed(watch, noisy_flat)
    assert len(caught) == 1 and watch.stalled_at == 150
    assert "300 steps" in str(caught[0].message) and "lower the learning rate" in str(caught[0].message)


def test_a_falling_loss_is_never_reported_and_the_bound_is_relative() -> None:
    learning = {t: 0.69 * math.exp(-t / 100) + 0.2 for t in range(1, 301)}
    assert _feed(StallWatch(300), learning) == []
    just_below = {t: (0.69 if t <= 30 else 0.69 * (1 - STALL_TOLERANCE) - 1e-6) for t in range(1, 301)}
    assert _feed(StallWatch(300), just_below) == []
    just_above = {t: (0.69 if t <= 30 else 0.69 * (1 - STALL_TOLERANCE) + 1e-6) for t in range(1, 301)}
    assert len(_feed(StallWatch(300), just_above)) == 1


def test_runs_not_seen_from_their_start_short_runs_and_nan_losses_are_not_judged() -> None:
    flat = dict.fromkeys(range(1, 301), 0.69)
    assert _feed(StallWatch(300), {t: v for t, v in flat.items() if t > 100}) == []  # resumed at step 100
    assert _feed(StallWatch(300), {t: v for t, v in flat.items() if t % 50 == 0}) == []  # logged every 50 > w = 30
    assert _feed(StallWatch(MIN_STEPS - 1), dict.fromkeys(range(1, MIN_STEPS), 0.69)) == []
    with_nan = {**{t: 0.69 - t * 1e-3 for t in range(1, 301)}, 200: float("nan")}
    assert _feed(StallWatch(300), with_nan) == []
    every_10 = dict.fromkeys(range(10, 301, 10), 0.69)  # the Trainer's logging_steps=10: windows of 3 logs each
    assert len(_feed(StallWatch(300), every_10)) == 1


def test_the_trainer_callback_watches_the_logged_loss(tmp_path: Path) -> None:
    model, targets = build("bert", seed=0)
    model = get_peft_model(model, GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(max_steps=100), TrainerControl()
    callback = GeoLoraCallback()
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5, 101, 5):
            state.global_step = step
            logs = {"loss": 0.6931, "learning_rate": 1e-3}
            callback.on_log(args, state, control, logs=logs)
            assert "geolora_total_rank" in logs
    stalled = [w for w in caught if "not learning" in str(w.message)]
    assert len(stalled) == 1 and callback.watch.stalled_at == 50


@pytest.mark.parametrize("stuck", [True, False])
def test_the_glue_script_records_the_step_its_run_stalled_at(stuck: bool) -> None:
    log = [{"step": t, "loss": 0.69 if stuck else 0.69 / (1 + t / 30)} for t in range(1, 301)]
    assert run_glue.stalled_at(log, 300) == (150 if stuck else None)


@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_any_trainer_run_gets_the_watch_from_stall_callback(tmp_path: Path, lr: float) -> None:
    """A LoRA model in a real Trainer: at lr 0 the loss stays where it started and the callback warns once, at half
    of training; a run that learns is left alone."""
    from peft import LoraConfig
    from transformers import Trainer

    from .tiny_models import classification_dataset

    model, targets = build("bert", seed=0)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=100,
        per_device_train_batch_size=16,
        learning_rate=lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    callback = StallCallback()
    trainer = Trainer(model=model, args=args, train_dataset=classification_dataset(256), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    stalled = [w for w in caught if "not learning" in str(w.message)]
    assert (len(stalled), callback.watch.stalled_at) == ((1, 50) if lr == 0 else (0, None))
