"""Where an optimizer step falls in GeoLoRA's cycle schedule, and whether ranks may change there.

The optimizer steps are grouped in cycles of c + 1 (c = ``cycle_length``; c = 0: the paper's Algorithm 1): the first
step of a cycle augments the bases, the last one truncates (with c = 0 one step does both) and the steps between
train only ``S``. Cycles count from an origin that :meth:`CycleSchedule.restart` moves: the allocator's ``finish()``
closes a cycle early and the next step opens a new one. Ranks may change at a truncation after ``warmup_steps`` and
up to ``freeze_step``; outside that window the bases still rotate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import GeoLoraConfig


@dataclass
class CycleSchedule:
    """The step count and the cycle origin of one allocator; steps are counted from 1."""

    cycle_length: int  # c: the S-only steps between an augmentation and its truncation (0: every step does both)
    warmup_steps: int = 0
    freeze_step: Optional[int] = None
    num_steps: int = 0  # optimizer steps taken so far
    origin: int = 0  # the step count after which the current run of cycles began

    @classmethod
    def from_config(cls, config: GeoLoraConfig) -> CycleSchedule:
        return cls(config.cycle_length, config.warmup_steps, config.freeze_step)

    def position(self, step: int) -> int:
        """Where optimizer step ``step`` falls in its cycle: 0 (augment) … c (truncate)."""
        return (step - 1 - self.origin) % (self.cycle_length + 1)

    def advance(self) -> tuple[bool, bool]:
        """Count one optimizer step; return whether it augments and whether it truncates."""
        self.num_steps += 1
        position = self.position(self.num_steps)
        return position == 0, position == self.cycle_length

    def next_augments(self) -> bool:
        """Whether the coming optimizer step opens a cycle (augments)."""
        return self.position(self.num_steps + 1) == 0

    def restart(self) -> None:
        """A cycle was closed early: the next step opens a new one."""
        self.origin = self.num_steps

    def ranks_may_change(self) -> bool:
        """Whether the current step's truncation may change ranks (after the warm-up, up to the freeze)."""
        t = self.num_steps
        return t > self.warmup_steps and (self.freeze_step is None or t <= self.freeze_step)
