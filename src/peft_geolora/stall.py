"""Watching for a run that does not learn: a training loss still where it started is reported once.

A run can fail without diverging. At a step too large for the task (one seed of twice the default step on the
suite's frontier, LoRA r=2 at the rate its validation chose) the classifier goes to chance in the first steps and the
loss stays at ``ln 2`` for all 300 steps; at a learning rate far too small it barely moves. Neither produces a NaN
or a large adapter (:mod:`peft_geolora.runaway`), and both end with chance-level scores. Over a run of ``T``
optimizer steps, with windows of ``w = max(1, ⌊T/10⌋)`` steps, once ``t ≥ T/2``:

.. math::  \\overline{\\ell}_{(t-w, t]} \\ge (1 - \\delta)\\, \\overline{\\ell}_{[1, w]}, \\qquad \\delta = 0.02

(the mean loss over the latest window has fallen by less than 2 % of the mean over the first). The suite's committed
runs on classification tasks bear the bound out with the final loss against ``ln C`` (where a fresh head starts): of
695 runs, the 35 binary-task runs that ended within 2 % of ``ln 2`` scored 0.49 … 0.70 on their test split (chance
0.5), and all but two of the 376 other binary-task runs scored above 0.65. A collapse to the label prior on an
unbalanced task (the loss falls from ``ln C`` to the prior's entropy, 7 % lower on trec6) is not caught: the watch
knows the loss, not the labels.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


STALL_TOLERANCE = 0.02
MIN_STEPS = 50  # shorter runs (smoke tests) are not judged: their windows would hold a handful of noisy batch losses


class StallWatch:
    """Warns once when the mean loss of the latest window is within :data:`STALL_TOLERANCE` of the first window's,
    from half of training on. Feed it every logged training loss with its optimizer step (any logging interval); a
    run whose first window was not seen (resumed from a checkpoint, or logged less often than every ``w`` steps) or
    shorter than :data:`MIN_STEPS` is not judged."""

    def __init__(self, total_steps: int) -> None:
        """``total_steps``: the run's optimizer steps ``T`` (the Trainer's ``max_steps``)."""
        self.total_steps = total_steps
        self.window = max(1, total_steps // 10)
        # running sums, so that an update costs O(1) when a loop feeds every step: the first window's losses, and the
        # losses logged after it that lie in the latest window (oldest first)
        self.first_sum, self.first_count = 0.0, 0
        self.latest: deque[tuple[int, float]] = deque()
        self.latest_sum = 0.0
        self.stalled_at: Optional[int] = None  # the step at which the warning was given

    def update(self, step: int, loss: float) -> None:
        """Record the training loss logged at optimizer ``step`` and warn if the run has stalled."""
        if not math.isfinite(loss):
            return  # a NaN or inf loss is the runaway watch's and the optimizer's business, not a stall
        if step <= self.window:
            self.first_sum, self.first_count = self.first_sum + loss, self.first_count + 1
        else:
            self.latest.append((step, loss))
            self.latest_sum += loss
        while self.latest and self.latest[0][0] <= step - self.window:
            self.latest_sum -= self.latest.popleft()[1]
        if self.stalled_at is not None or self.total_steps < MIN_STEPS or step < self.total_steps / 2:
            return
        if not self.first_count or not self.latest:  # no first window in a run resumed (or first logged) later on
            return
        start, now = self.first_sum / self.first_count, self.latest_sum / len(self.latest)
        if now >= (1 - STALL_TOLERANCE) * start:
            self.stalled_at = step
            warnings.warn(
                f"The training loss has not fallen in {step} of {self.total_steps} steps (mean {now:.4g} over "
                f"the latest {self.window} steps, {start:.4g} over the first): the run is not learning. A loss at "
                "chance from the start means a step too large for the task (lower the learning rate, or lora_alpha / "
                "scaling); a loss that barely moves means one too small (raise the learning rate).",
                stacklevel=2,
            )


class StallCallback(TrainerCallback):
    """The watch inside the transformers ``Trainer`` for any model (LoRA, AdaLoRA, full fine-tuning):
    ``Trainer(..., callbacks=[StallCallback()])``. :class:`~peft_geolora.GeoLoraCallback` is one, so a GeoLoRA run
    needs nothing more. Judged on the main process's logged losses."""

    def __init__(self) -> None:
        self.watch: Optional[StallWatch] = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.watch = StallWatch(state.max_steps)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, float]] = None,
        **kwargs: Any,
    ) -> None:
        if self.watch is not None and logs is not None and "loss" in logs and state.is_world_process_zero:
            self.watch.update(state.global_step, float(logs["loss"]))
