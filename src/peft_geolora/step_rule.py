"""The interface between the allocator and a step rule: who steps the factors within a cycle, and what state they
carry.

The :class:`~peft_geolora.RankAllocator` owns the schedule, the truncation and the rewrite of the adapters; a step
rule owns what happens between an ``optimizer.step()`` and that rewrite. Two rules implement it:

* :class:`~peft_geolora.optimizer_rule.OptimizerRule` (the default): the user's optimizer steps ``U``, ``S``, ``V``;
* :class:`~peft_geolora.coefficient_rule.CoefficientRule` (``step_rule="coefficient"``): the allocator
  steps the augmented coefficients itself and the optimizer holds no state for the factors.

One optimizer step, as the allocator drives a rule::

    optimizer.step() → rule.before_optimizer_step()   (the optimizer's pre-step hook; sets rule.finite)
    allocator.step() → batches = rule.advance(augment, truncate)
                       truncate: truncation → rule.carry(truncated) → adapters rewritten at the kept ranks
                       otherwise: rule.keep(batches) → adapters rewritten at the augmented width
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from . import integrator, sharding
from .adapters import AdapterSet, Batch
from .config import GeoLoraConfig
from .schedule import CycleSchedule
from .truncation import Truncated


def all_finite(grads: Iterable[Optional[torch.Tensor]]) -> bool:
    """Every given gradient (None: absent) is finite.

    Plain tensors are checked through their norms, one fused ``_foreach_norm`` per device accumulated in float64 (a
    NaN or an infinity makes its norm non-finite; a finite float32 or float16 gradient cannot overflow it): one kernel
    instead of one per tensor, which on 36 adapters was 4 ms of every step on CPU. Sharded ``DTensor`` gradients
    (FSDP2) are checked one by one.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    checks = []
    for g in grads:
        if g is None:
            continue
        if sharding.is_sharded(g):
            checks.append(torch.isfinite(g).all())
        else:
            by_device[g.device].append(g)
    for tensors in by_device.values():
        checks.append(torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))).all())
    return all(bool(c) for c in checks)


def new_directions(
    U: torch.Tensor, dU: torch.Tensor, V: torch.Tensor, dV: torch.Tensor, room: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ũ (B, m, k) ⊥ U and Ṽ (B, n, k) ⊥ V from the moves dU (B, m, r), dV (B, n, r): at most ``room`` each and
    equally many on both sides (a side with no room left keeps Ŝ square)."""
    U_tilde = integrator.augment_basis(U, dU, max_new=room)  # (B, m, p)
    V_tilde = integrator.augment_basis(V, dV, max_new=room)  # (B, n, q)
    k = min(U_tilde.shape[-1], V_tilde.shape[-1])
    return U_tilde[..., :k], V_tilde[..., :k]


class StepRule:
    """A way to step the factors between truncations (see the module docstring for the order of the calls).

    Parameters
    ----------
    config : the allocator's effective config
    adapters : the adapters it drives
    optimizer : the user's torch optimizer (unwrapped)
    warn_once : ``warn_once(key, message)``, the allocator's de-duplicated warning
    """

    name: str = ""

    def __init__(
        self,
        config: GeoLoraConfig,
        adapters: AdapterSet,
        optimizer: torch.optim.Optimizer,
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.config = config
        self.adapters = adapters
        self.optimizer = optimizer
        self.warn_once = warn_once
        self.finite = True  # whether the last optimizer step's adapter gradients were finite

    def before_optimizer_step(self) -> None:
        """The optimizer's pre-step hook: prepare the coming step (and set :attr:`finite`)."""
        raise NotImplementedError

    def steps_bases(self, schedule: CycleSchedule) -> bool:
        """Whether the coming optimizer step reads the bases' (K- and L-) gradients, so the backward must compute
        them."""
        raise NotImplementedError

    def advance(self, augment: bool, truncate: bool) -> list[Batch]:
        """After a finite optimizer step: the batches the allocator must rewrite (truncate, or keep open), or none
        where the parameters already hold the step."""
        raise NotImplementedError

    def batches(self) -> list[Batch]:
        """The adapters as they are now, batched, for a truncation outside the schedule (``finish()``)."""
        raise NotImplementedError

    def keep(self, batches: list[Batch]) -> None:
        """The cycle stays open: store what the rule needs of ``batches`` for its next steps."""

    def carry(self, truncated: Truncated) -> None:
        """Carry the rule's state of one truncated batch into its new coordinates ``P``, ``Q`` at the kept ranks."""
        raise NotImplementedError

    def shared_tensors(self) -> list[torch.Tensor]:
        """The rule's tensors that every process must hold as process 0 does."""
        return []

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the rule holds between steps (what it adds to the training memory)."""
        return self.shared_tensors()

    def state_dict(self) -> dict[str, Any]:
        """``{"num_steps": int, "tensors": {name: tensor}}``: what a resumed run needs beyond the optimizer's state."""
        raise NotImplementedError

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`'s output (None: saved by a version that kept none)."""
        raise NotImplementedError

    def resume_at_step(self, step: int) -> None:
        """Continue at optimizer step ``step`` without saved rule state."""
