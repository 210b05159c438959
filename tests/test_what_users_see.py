"""What a user sees around training: parameter counts, checkpoints of kept adapters, the README, refusals, compile."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_geolora
from peft_geolora import GeoLoraCallback, GeoLoraConfig, GeoLoraLayer, RankAllocator

from .tiny_models import build, classification_dataset, inputs


README = Path(__file__).resolve().parents[1] / "README.md"


def _peft(adapter_name: str = "default", **overrides):
    model, _ = build("bert", seed=0)
    options = {"task_type": "SEQ_CLS", "target_modules": ["query", "key", "value"], "r": 8, "max_rank": 16}
    return get_peft_model(model, GeoLoraConfig(**{**options, **overrides}), adapter_name=adapter_name)


def _train(model, steps: int, lr: float = 2e-2, **allocator_options) -> RankAllocator:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = RankAllocator(model, optimizer, **allocator_options)
    model.train()
    for step in range(steps):
        model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    return allocator


def _expected_counts(model) -> tuple[int, int]:
    """(trainable, all) counted by hand: every non-GeoLoRA parameter by numel, each adapter by r (m + n + r)."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".geolora_" in name:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if isinstance(module, GeoLoraLayer):
            for adapter in module.geolora_U:
                active = module.num_active_parameters(adapter)
                total += active
                trainable += active if module.geolora_U[adapter].requires_grad else 0
    return trainable, total


def test_parameter_counts_are_the_active_adapter_before_and_after_ranks_change(capsys) -> None:
    model = _peft()
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".geolora_" not in n)
    active = sum(8 * (32 + 32 + 8) for _ in range(2 * 3))  # r (m + n + r) for q, k, v in two layers
    assert model.get_nb_trainable_parameters() == _expected_counts(model)
    assert model.get_nb_trainable_parameters()[0] == active + head
    model.print_trainable_parameters()
    assert f"trainable params: {active + head:,d}" in capsys.readouterr().out

    allocator = _train(model, steps=12, tau=0.5, growth_tol=None)  # the tau rule alone: ranks shrink in 12 steps
    allocator.finish()
    assert allocator.total_rank() < 8 * 6, "ranks did not shrink, so this test would not test the change"
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == _expected_counts(model)
    assert trainable == allocator.num_adapter_parameters() + head


# The evaluation that the Trainer ranks best, by construction: a metric that peaks at this step (a checkpoint in the
# middle of the run), so which checkpoint is best never depends on the run's arithmetic (CPU, BLAS, threads).
BEST_STEP = 21


class _PeakAtStep:
    """``compute_metrics`` whose ``closeness`` is ``-|global step - BEST_STEP|``: the best evaluation is BEST_STEP's."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def __call__(self, _prediction) -> dict[str, float]:
        return {"closeness": -abs(self.trainer.state.global_step - BEST_STEP)}


def _best_model_trainer(output_dir: Path, max_steps: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="closeness",
        greater_is_better=True,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = _peft(target_modules=["query", "key", "value", "dense"], tau=0.3, scaling=1.0)
    metric = _PeakAtStep()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=classification_dataset(64),
        eval_dataset=classification_dataset(24),
        compute_metrics=metric,
        callbacks=[GeoLoraCallback()],
    )
    metric.trainer = trainer
    return trainer


def _logits(model, seed: int = 7) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs(seed=seed)).logits


def test_trainer_evaluates_and_saves_kept_adapters_and_ends_with_the_best_checkpoint(tmp_path: Path) -> None:
    trainer = _best_model_trainer(tmp_path / "run", max_steps=42)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "middle of a rank cycle" in str(w.message)], "a checkpoint saved mid-cycle"
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == f"checkpoint-{BEST_STEP}"

    fresh = PeftModel.from_pretrained(build("bert", seed=0)[0], str(best))
    last = PeftModel.from_pretrained(build("bert", seed=0)[0], str(best.parent / "checkpoint-42"))
    assert (_logits(last) - _logits(fresh)).abs().max().item() > 1e-3, "training after the best step changed nothing"
    assert (_logits(trainer.model) - _logits(fresh)).abs().max().item() == 0.0, "the Trainer did not end at the best"

    kept_at = {
        row["step"]: row["geolora_total_rank"] for row in trainer.state.log_history if "geolora_total_rank" in row
    }
    saved_total = sum(fresh.peft_config["default"].rank_pattern.values())
    assert saved_total == kept_at[int(best.name.split("-")[1])]
    assert max(fresh.peft_config["default"].rank_pattern.values()) <= 16, "a checkpoint holds an augmented adapter"


def test_trainer_resume_with_cycles_closed_at_checkpoints_is_exact(tmp_path: Path) -> None:
    full = _best_model_trainer(tmp_path / "run", max_steps=15)
    full.args.load_best_model_at_end = False
    full.train()
    resumed = _best_model_trainer(tmp_path / "run", max_steps=15)
    resumed.args.load_best_model_at_end = False
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert (_logits(full.model) - _logits(resumed.model)).abs().max().item() <= 1e-6
    ranks = [
        cb.allocator.rank_history()
        for t in (full, resumed)
        for cb in t.callback_handler.callbacks
        if isinstance(cb, GeoLoraCallback)
    ]
    assert ranks[0] == ranks[1]


def test_saving_mid_cycle_warns_and_says_how_to_keep_the_adapter(tmp_path: Path) -> None:
    model = _peft()
    allocator = _train(model, steps=2)  # cycle of 4 steps: augmented after the first
    assert allocator.is_augmented()
    with pytest.warns(UserWarning, match=r"allocator\.finish\(\)"):
        model.save_pretrained(str(tmp_path / "mid"))
    allocator.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(str(tmp_path / "kept"))
    assert sum(GeoLoraConfig.from_pretrained(str(tmp_path / "kept")).rank_pattern.values()) == allocator.total_rank()


def test_finish_mid_training_starts_a_new_cycle_at_the_next_step() -> None:
    model = _peft()
    allocator = _train(model, steps=2)
    allocator.finish()
    assert not allocator.is_augmented()
    kept = allocator.total_rank()
    batch = inputs(seed=99)
    model(**batch, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    allocator.optimizer.step()
    allocator.step()
    allocator.optimizer.zero_grad()
    assert allocator.is_augmented() and allocator.total_rank() > kept
    assert allocator.total_rank(kept=True) == kept


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_quick_start_runs_as_written_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """The README's first Python block, extracted as it stands, runs in a new process with no preamble: it trains,
    saves, reloads and checks the reloaded logits itself."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = _python_blocks(quick_start)[0]
    (tmp_path / "quick_start.py").write_text(block)
    done = subprocess.run(
        [sys.executable, "quick_start.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable params:" in done.stdout
    saved = GeoLoraConfig.from_pretrained(str(tmp_path / "geolora-adapter"))
    assert sum(saved.rank_pattern.values()) < 8 * 6, "the ranks did not adapt in the quick start"


def test_readme_stays_a_readme() -> None:
    """The README is at most 300 lines and its settings table names every GeoLoRA-own config field."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    own = {f.name for f in dataclasses.fields(GeoLoraConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    lora_fields = text.split("## Settings", 1)[1].split("|", 1)[0]
    missing = [name for name in own if f"`{name}`" not in table and f"`{name}`" not in lora_fields]
    assert not missing, missing


def test_add_weighted_adapter_is_refused_with_a_pointer_to_export_to_lora() -> None:
    model = _peft()
    with pytest.raises(TypeError, match="export_to_lora"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def test_export_to_lora_defaults_to_the_active_adapter(tmp_path: Path) -> None:
    model = _peft(adapter_name="A")
    _train(model, steps=4).finish()
    config = peft_geolora.export_to_lora(model, str(tmp_path / "lora"))
    assert config.r >= 1
    lora = PeftModel.from_pretrained(build("bert", seed=0)[0], str(tmp_path / "lora"))
    assert torch.allclose(_logits(model), _logits(lora), atol=1e-5)
    with pytest.raises(ValueError, match="no adapter named `B`"):
        peft_geolora.export_to_lora(model, str(tmp_path / "other"), adapter_name="B")


def test_rank_history_survives_continued_training(tmp_path: Path) -> None:
    model = _peft()
    first = _train(model, steps=12, tau=0.5)
    first.finish()
    history = first.rank_history()
    assert any(history.values())
    model.save_pretrained(str(tmp_path / "first"))

    again = PeftModel.from_pretrained(build("bert", seed=0)[0], str(tmp_path / "first"), is_trainable=True)
    second = _train(again, steps=12, tau=0.05)
    second.finish()
    again.save_pretrained(str(tmp_path / "second"))
    saved = GeoLoraConfig.from_pretrained(str(tmp_path / "second")).rank_history
    for name, events in history.items():
        key = name.removeprefix("base_model.model.")
        assert [tuple(e) for e in saved[key][: len(events)]] == [tuple(e) for e in events]
        later = saved[key][len(events) :]
        assert all(step > 12 for step, _ in later), "the continued run's steps must follow the first run's"


def test_compiled_training_has_no_graph_break_in_geolora_and_matches_eager() -> None:
    """torch.compile over a model whose ranks change: GeoLoRA's forward is one graph, compiled once."""
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> tuple[list[float], dict[str, int]]:
        torch._dynamo.reset()
        counters.clear()
        model = _peft(tau=0.5)
        for module in model.modules():  # compiled dropout draws other random numbers than eager
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        allocator = RankAllocator(model, optimizer)
        forward = torch.compile(model) if compiled else model
        model.train()
        losses = []
        for step in range(9):
            loss = forward(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss
            loss.backward()
            optimizer.step()
            allocator.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert any(allocator.rank_history().values()), "ranks never changed: recompiles would not be tested"
        return losses, {str(reason): n for reason, n in counters["graph_break"].items()}

    eager, _ = run(False)
    compiled, breaks = run(True)
    assert torch.allclose(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert not breaks, breaks
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
