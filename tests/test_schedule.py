"""CycleSchedule: where each optimizer step falls in its cycle, restarts, and the window in which ranks change."""

from __future__ import annotations

from peft_geolora import GeoLoraConfig
from peft_geolora.schedule import CycleSchedule


def _walk(schedule: CycleSchedule, steps: int) -> list[str]:
    """'A' augments, 'T' truncates, 'AT' both, '.' trains S only; one entry per step."""
    out = []
    for _ in range(steps):
        augments_next = schedule.next_augments()
        augment, truncate = schedule.advance()
        assert augment == augments_next
        out.append(("A" if augment else "") + ("T" if truncate else "") or ".")
    return out


def test_cycles_of_c_plus_one_steps_from_the_origin() -> None:
    schedule = CycleSchedule.from_config(GeoLoraConfig(cycle_length=3))
    assert _walk(schedule, 9) == ["A", ".", ".", "T", "A", ".", ".", "T", "A"]
    schedule.restart()  # finish() closed the open cycle after step 9: step 10 opens a new one
    assert _walk(schedule, 5) == ["A", ".", ".", "T", "A"]


def test_cycle_length_zero_augments_and_truncates_at_every_step() -> None:
    schedule = CycleSchedule.from_config(GeoLoraConfig(cycle_length=0))
    assert schedule.cycle_length == 0
    assert _walk(schedule, 3) == ["AT", "AT", "AT"]


def test_ranks_change_after_the_warm_up_and_up_to_the_freeze() -> None:
    schedule = CycleSchedule.from_config(GeoLoraConfig(warmup_steps=2, freeze_step=4))
    may_change = []
    for _ in range(6):
        schedule.advance()
        may_change.append(schedule.ranks_may_change())
    assert may_change == [False, False, True, True, False, False]
