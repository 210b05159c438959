"""``GeoLoraCallback``: runs the :class:`~peft_geolora.RankAllocator` inside the transformers ``Trainer``."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from .allocator import RankAllocator
from .loading import DamagedAdapterError
from .model import check_finite_float
from .stall import StallCallback


ALLOCATOR_STATE_NAME = "geolora_allocator.json"
ALLOCATOR_TENSORS_NAME = "geolora_allocator.safetensors"  # the step rule's tensors (cycle start, moments)


def save_allocator_state(allocator: RankAllocator, folder: str) -> None:
    """Write the allocator's state into a checkpoint folder: plain values as JSON, tensors as safetensors."""
    state = allocator.state_dict()
    rule = state.pop("rule")
    save_file({k: v.contiguous() for k, v in rule["tensors"].items()}, os.path.join(folder, ALLOCATOR_TENSORS_NAME))
    state["rule_num_steps"] = rule["num_steps"]
    with open(os.path.join(folder, ALLOCATOR_STATE_NAME), "w", encoding="utf-8") as f:
        json.dump(state, f)


def load_allocator_state(allocator: RankAllocator, folder: str) -> bool:
    """Restore what :func:`save_allocator_state` wrote; False if the folder holds no allocator state."""
    path = os.path.join(folder, ALLOCATOR_STATE_NAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedAdapterError(
            f"{path} is damaged ({exc}): the checkpoint was not written completely. Resume from another checkpoint."
        ) from exc
    steps = state.pop("rule_num_steps", state.pop("coefficient_num_steps", None))  # "coefficient_…": 0.1.x
    if steps is not None:
        tensors = os.path.join(folder, ALLOCATOR_TENSORS_NAME)
        if not os.path.isfile(tensors):
            raise FileNotFoundError(
                f"{path} records a step-rule state but {tensors} is missing: the checkpoint is incomplete."
            )
        try:
            rule_tensors = load_file(tensors)
        except SafetensorError as exc:
            raise DamagedAdapterError(
                f"{tensors} is damaged or truncated ({exc}): the checkpoint was not written completely. Resume from "
                "another checkpoint."
            ) from exc
        for key, tensor in rule_tensors.items():
            check_finite_float(f"{tensors}: {key}", tensor)
        state["rule"] = {"num_steps": steps, "tensors": rule_tensors}
    allocator.load_state_dict(state)
    return True


class GeoLoraCallback(StallCallback):
    """Adapts GeoLoRA ranks during ``Trainer.train()``.

    ``Trainer(model=peft_model, ..., callbacks=[GeoLoraCallback()])``. The allocator is built when the Trainer
    has created its optimizer, stepped after every real optimizer step (a step the AMP scaler skipped never
    reaches the optimizer and is skipped here too), closes an open rank cycle before every evaluation, checkpoint and
    the end of training (so they all see the kept adapter, and ``load_best_model_at_end`` ends with exactly the best
    checkpoint's adapter), saved into each checkpoint as ``geolora_allocator.json`` (with
    the step rule's tensors in ``geolora_allocator.safetensors``) and restored on ``resume_from_checkpoint``. Logs
    gain ``geolora_total_rank`` and ``geolora_adapter_params`` of the kept adapter (inside an open cycle: the ranks
    kept before its augmentation). A logged training loss that has not fallen by half of training is warned about
    once (it is a :class:`~peft_geolora.StallCallback`).

    Parameters
    ----------
    **allocator_options : passed to :class:`~peft_geolora.RankAllocator` (``tau``, ``budget``, ...)
    """

    def __init__(self, **allocator_options: Any) -> None:
        self.allocator_options = allocator_options
        super().__init__()
        self.allocator: Optional[RankAllocator] = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("GeoLoraCallback needs the Trainer's model and optimizer at `on_train_begin`.")
        if self.allocator is not None:
            self.allocator.remove()
        self.allocator = RankAllocator(model, optimizer, **self.allocator_options)
        super().on_train_begin(args, state, control, **kwargs)
        if state.global_step > 0:  # resumed: continue the step count (and history) of the checkpoint
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not load_allocator_state(self.allocator, folder):
                self.allocator.resume_at_step(state.global_step)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.allocator.step()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Before the Trainer evaluates, saves or stops at this step, close an open cycle (kept adapters only)."""
        self._close_cycle_if_needed(control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._close_cycle_if_needed(control)

    def _close_cycle_if_needed(self, control: TrainerControl) -> None:
        """Evaluations, checkpoints (so also ``load_best_model_at_end``) and the end of training see kept adapters.

        The default flow callback, which runs before this one, has just decided whether the Trainer evaluates,
        saves or stops now; if so the allocator truncates the open cycle (and starts a new one at the next step).
        """
        if self.allocator is not None and (
            control.should_evaluate or control.should_save or control.should_training_stop
        ):
            self.allocator.finish()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Close a cycle still open (training stopped by another callback after this one's ``on_step_end``).

        Never when ``load_best_model_at_end`` has just loaded the best checkpoint: that is already a kept adapter.
        """
        if self.allocator is not None and not (args.load_best_model_at_end and state.best_model_checkpoint):
            self.allocator.finish()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.allocator is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            save_allocator_state(self.allocator, folder)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, float]] = None,
        **kwargs: Any,
    ) -> None:
        if self.allocator is None or logs is None:
            return
        super().on_log(args, state, control, logs=logs, **kwargs)
        stats = {  # the kept adapter, not an open cycle's transient augmented one
            "geolora_total_rank": self.allocator.total_rank(kept=True),
            "geolora_adapter_params": self.allocator.num_adapter_parameters(kept=True),
        }
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
