"""DeepSpeed ZeRO (stages 1, 2 and 3): the allocator reads and writes whole factors through DeepSpeed's accessors.

Under ZeRO the optimizer steps flat fp32 partitions: process p holds a slice of every parameter's fp32 master copy
("hp") and of its optimizer state, and (stage 3) of the model's own parameter ("lp"). The allocator's step works on
whole matrices, so around each of its rewrites it

1. reads every factor whole from its fp32 master (``safe_get_full_fp32_param``, a collective every process calls in
   the same order), the same on every process;
2. computes the step on those whole tensors, and makes process 0's result everyone's (the broadcast of
   :mod:`peft_geolora.distributed`, as for DDP);
3. writes each factor back to both copies: the fp32 master (``safe_set_full_fp32_param``: each process its own
   slice) and the model's parameter (stages 1-2: whole on every process, copied in place; stage 3: through
   ``deepspeed.zero.GatheredParameters``, which re-partitions it).

The default step rule also reads the factors as they stood before the optimizer's step (in a hook on the ZeRO
optimizer's ``step``, where the gradients are already reduced into partitions) and rewrites their optimizer state
(``safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state``, :class:`WholeState`).

:class:`OptimizerView` is the ZeRO optimizer as the allocator meets a torch optimizer: parameter groups over the
model's parameters (with the live hyperparameters of DeepSpeed's flat groups, so the lr follows the scheduler), and a
pre-step hook. DeepSpeed is imported only where a ZeRO optimizer is found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch


STATE_KEYS = ("exp_avg", "exp_avg_sq")


def find_zero_optimizer(optimizer: Any) -> Optional[Any]:
    """The DeepSpeed ZeRO optimizer (stages 1-3) in a chain of wrappers (accelerate's ``AcceleratedOptimizer``,
    DeepSpeed's engine wrappers) linked by ``.optimizer``, or None."""
    wrapper = optimizer
    while wrapper is not None:
        if type(wrapper).__module__.startswith("deepspeed.runtime.zero"):
            return wrapper
        wrapper = getattr(wrapper, "optimizer", None)
    return None


def is_zero_param(param: torch.Tensor) -> bool:
    """A parameter that DeepSpeed ZeRO partitions (stage 3: ``ds_id``) or mirrors in fp32 partitions (stages 1-2)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


class _Group(Mapping):
    """One parameter group: DeepSpeed's live flat group (lr, betas, weight decay, ...) with the model's parameters
    as its ``params``."""

    def __init__(self, live: dict[str, Any], params: list[torch.nn.Parameter]) -> None:
        self._live = live
        self._params = params

    def __getitem__(self, key: str) -> Any:
        return self._params if key == "params" else self._live[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._live)

    def __len__(self) -> int:
        return len(self._live)


class _Hook:
    def __init__(self, view: OptimizerView) -> None:
        self._view = view

    def remove(self) -> None:
        self._view.zero.__dict__.pop("step", None)


class OptimizerView:
    """A DeepSpeed ZeRO optimizer as the allocator sees a torch optimizer (see the module docstring)."""

    def __init__(self, zero: Any) -> None:
        self.zero = zero
        groups = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
        if groups is None:
            raise RuntimeError(
                f"GeoLoRA does not know this DeepSpeed optimizer ({type(zero).__name__}): it finds the model's "
                "parameters in `bit16_groups` (ZeRO stages 1-2) or `fp16_groups` (stage 3)."
            )
        inner = zero.optimizer
        self.param_groups = [_Group(live, list(params)) for live, params in zip(inner.param_groups, groups)]
        self.defaults = getattr(inner, "defaults", {})
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # read whole through WholeState
        self.inner = inner

    def register_step_pre_hook(self, hook: Callable[[Any, tuple, dict], None]) -> _Hook:
        """Call ``hook(self, args, kwargs)`` before each ZeRO ``step()`` (once per optimizer step, after the
        gradients are reduced into partitions; the inner optimizer's own step runs once per flat group)."""
        original = type(self.zero).step.__get__(self.zero)

        def step(*args: Any, **kwargs: Any) -> Any:
            hook(self, args, kwargs)
            return original(*args, **kwargs)

        self.zero.step = step
        return _Hook(self)


def gather(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every parameter whole, from its fp32 master (in the parameter's shape; a collective on every process)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in params:
        whole = safe_get_full_fp32_param(p)
        out.append(whole.detach().clone().view(_shape(p)))
    return out


def full_grads(params: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Every parameter's whole (reduced) gradient, or None where it has none."""
    from deepspeed.utils import safe_get_full_grad

    return [safe_get_full_grad(p) for p in params]


def zero_grad(param: torch.Tensor) -> None:
    """Set a parameter's reduced gradient to zero (in its partitions)."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    grad = safe_get_full_grad(param)
    if grad is not None:
        safe_set_full_grad(param, torch.zeros_like(grad))


def write(params: Sequence[torch.Tensor], wholes: Sequence[torch.Tensor]) -> None:
    """Write whole values (identical on every process) into the fp32 masters and the model's parameters."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p, whole in zip(params, wholes):
        safe_set_full_fp32_param(p, whole.to(torch.float32).reshape(_shape(p)))
    staged = [(p, w) for p, w in zip(params, wholes) if hasattr(p, "ds_id")]
    for p, whole in zip(params, wholes):
        if not hasattr(p, "ds_id"):
            p.data.copy_(whole.reshape(p.shape))
    if staged:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p, _ in staged], modifier_rank=0):
            for p, whole in staged:
                p.data.copy_(whole.reshape(p.shape))


def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_id") else p.shape


class WholeState:
    """The optimizer's state of some factors read whole (``exp_avg``, ``exp_avg_sq``), as ``.state[param]``, for
    one rewrite; :meth:`write_back` writes each process's slice back through DeepSpeed."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state

        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for p in params:
            entries = {}
            for key in STATE_KEYS:
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    entries[key] = value.detach().clone().view(_shape(p))
            self.state[p] = entries

    def write_back(self) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        for p, entries in self.state.items():
            for key, value in entries.items():
                safe_set_full_optimizer_state(p, value, key)
