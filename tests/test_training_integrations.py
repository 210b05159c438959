"""The allocator where users meet it: the transformers Trainer, accelerate checkpoints, two processes."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import get_peft_model, get_peft_model_state_dict
from transformers import Trainer, TrainingArguments

from peft_geolora import GeoLoraCallback, GeoLoraConfig, RankAllocator

from .processes import launch_two_processes
from .tiny_models import CONFIGS, VOCAB, build, classification_dataset, inputs


STEP_RULES = ["optimizer", "coefficient"]


def _model(seed: int = 0, step_rule: str = "optimizer", **options):
    model, targets = build("bert", seed=seed)
    settings = {"r": 4, "max_rank": 6, "tau": 0.3, "cycle_length": 0, "step_rule": step_rule, **options}
    config = GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, **settings)
    return get_peft_model(model, config)


def _trainer(
    output_dir: Path, max_steps: int, step_rule: str = "optimizer", learning_rate: float = 5e-3, **options
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="steps",
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(
        model=_model(step_rule=step_rule, **options),
        args=args,
        train_dataset=classification_dataset(),
        callbacks=[GeoLoraCallback()],
    )


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a), "ranks differ"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("step_rule", STEP_RULES)
def test_trainer_adapts_ranks_logs_them_and_resumes_exactly(tmp_path: Path, step_rule: str) -> None:
    full = _trainer(tmp_path / "full", max_steps=12, step_rule=step_rule)
    full.train()
    callback = next(cb for cb in full.callback_handler.callbacks if isinstance(cb, GeoLoraCallback))
    assert callback.allocator.num_steps == 12
    assert any(events for events in callback.allocator.rank_history().values()), "ranks never changed"
    logged = [row for row in full.state.log_history if "geolora_total_rank" in row]
    assert logged and all("geolora_adapter_params" in row for row in logged)
    assert len({row["geolora_total_rank"] for row in logged}) > 1 or logged[0]["geolora_total_rank"] != 4 * 13

    resumed = _trainer(tmp_path / "full", max_steps=12, step_rule=step_rule)  # resume from checkpoint-6
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert _max_diff(_adapter(full.model), _adapter(resumed.model)) <= 1e-6
    resumed_callback = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, GeoLoraCallback))
    assert resumed_callback.allocator.rank_history() == callback.allocator.rank_history()


def _assert_every_log_is_kept(trainer: Trainer, steps: int, initial_rank: int) -> None:
    """Every step's logged ``geolora_total_rank`` and ``geolora_adapter_params`` are the kept adapters' (what the
    rank history says and a checkpoint would hold), never an open cycle's transient augmented ones."""
    allocator = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GeoLoraCallback)).allocator
    history = allocator.rank_history()
    sizes = {a.name: a.U.shape[0] + a.V.shape[0] for a in allocator.adapters}

    def kept_at(step: int) -> dict[str, int]:
        return {name: ([r for t, r in events if t <= step] or [initial_rank])[-1] for name, events in history.items()}

    logged = [row for row in trainer.state.log_history if "geolora_total_rank" in row]
    assert sorted({row["step"] for row in logged}) == list(range(1, steps + 1))  # the last twice: log and summary
    for row in logged:
        kept = kept_at(row["step"])
        assert row["geolora_total_rank"] == sum(kept.values()), row
        assert row["geolora_adapter_params"] == sum(r * (sizes[n] + r) for n, r in kept.items()), row
    assert any(events for events in history.values()), "ranks never changed: the test would not test the logs"


def test_every_logged_rank_and_parameter_count_is_the_kept_adapters(tmp_path: Path) -> None:
    """With the default cycle (augment, 2 S-only steps, truncate) most logged steps fall inside an open cycle."""
    trainer = _trainer(tmp_path, max_steps=24, cycle_length=3, tau=0.5)
    trainer.args.logging_steps = 1
    trainer.train()
    _assert_every_log_is_kept(trainer, 24, initial_rank=4)


def test_trl_sft_logs_the_kept_adapters(tmp_path: Path) -> None:
    """TRL's SFTTrainer (a Trainer subclass with its own logs) on a tiny Llama, every linear layer: the same logs."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["llama"][0]))
    words = models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words), pad_token="t0", eos_token="t2")
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(3, VOCAB, (64, 12), generator=g).tolist()})
    config = GeoLoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4, max_rank=6, tau=0.5)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=get_peft_model(model, config),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[GeoLoraCallback()],
    )
    trainer.train()
    _assert_every_log_is_kept(trainer, 12, initial_rank=4)


def test_trainer_resumes_exactly_with_the_scale_set_from_the_learning_rate(tmp_path: Path) -> None:
    """lora_alpha="auto": the resumed Trainer rebuilds the model from the code's config (scale not yet written) and
    its allocator writes the same scale from the same learning rate, so the run continues exactly."""
    full = _trainer(tmp_path / "full", max_steps=12, learning_rate=1e-3, lora_alpha="auto")
    full.train()
    assert full.model.peft_config["default"].scaling == pytest.approx(5.0)  # 5e-3 / lr 1e-3
    saved = json.loads((tmp_path / "full" / "checkpoint-6" / "adapter_config.json").read_text())
    assert saved["scaling"] == pytest.approx(5.0) and saved["lora_alpha"] == "auto"
    resumed = _trainer(tmp_path / "full", max_steps=12, learning_rate=1e-3, lora_alpha="auto")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert _max_diff(_adapter(full.model), _adapter(resumed.model)) <= 1e-6


def _accelerate_run(
    steps: int, state_dir: Path, save_at: int | None = None, load: bool = False, step_rule: str = "optimizer"
):
    accelerator = Accelerator(cpu=True)
    model = _model(step_rule=step_rule)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    allocator = RankAllocator(model, optimizer)
    accelerator.register_for_checkpointing(allocator)
    if load:
        accelerator.load_state(str(state_dir))
    model.train()
    for step in range(allocator.num_steps, steps):
        loss = model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss
        accelerator.backward(loss)
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        if save_at == step + 1:
            accelerator.save_state(str(state_dir))
    return accelerator.unwrap_model(model), allocator


@pytest.mark.parametrize("step_rule", STEP_RULES)
def test_accelerate_save_state_load_state_continues_exactly(tmp_path: Path, step_rule: str) -> None:
    full, full_allocator = _accelerate_run(10, tmp_path / "state", save_at=5, step_rule=step_rule)
    resumed, allocator = _accelerate_run(10, tmp_path / "state", load=True, step_rule=step_rule)
    assert allocator.num_steps == 10
    assert allocator.ranks() == full_allocator.ranks()
    assert _max_diff(_adapter(full), _adapter(resumed)) <= 1e-6


@pytest.mark.distributed
@pytest.mark.parametrize("step_rule", STEP_RULES)
def test_two_processes_agree_bit_for_bit(tmp_path: Path, step_rule: str) -> None:
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU), different data per process, GA 2."""
    out = tmp_path / "result.json"
    launch_two_processes("-m", "tests.distributed_child", str(out), step_rule)
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2
    assert result["distributed_type"] == "MULTI_CPU"
    assert len(set(result["state_hashes"])) == 1, result
    assert len({json.dumps(r, sort_keys=True) for r in result["ranks"]}) == 1
    assert result["ranks_changed"]
    assert result["optimizer_steps"] == 40


@pytest.mark.distributed
def test_a_stalled_process_makes_the_other_fail_clearly(tmp_path: Path) -> None:
    out = tmp_path / "error.txt"
    started = time.monotonic()
    with pytest.raises(AssertionError):  # the launch fails: process 0 raised
        launch_two_processes("-m", "tests.stall_child", str(out), timeout=300)
    assert time.monotonic() - started < 240
    message = out.read_text()
    assert "GeoLoRA could not synchronise the adapters across processes (this is process 0 of 2)" in message
    assert "InitProcessGroupKwargs(timeout=...)" in message
