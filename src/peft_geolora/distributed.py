"""Keeping the processes of a distributed run in agreement: process 0's adapters are authoritative."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def is_distributed() -> bool:
    """True inside an initialised process group of two or more processes."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with process 0's values: one flat broadcast per (dtype, device)."""
    by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_key[(t.dtype, t.device)].append(t)
    for group in by_key.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_ints(values: Sequence[int], device: torch.device) -> list[int]:
    """Process 0's list of integers (ranks), the same length on every process."""
    tensor = torch.tensor(list(values), dtype=torch.int64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()


def peer_failure_message(exc: BaseException) -> str:
    """What to tell the user when a collective fails because another process stopped responding."""
    return (
        f"GeoLoRA could not synchronise the adapters across processes (this is process "
        f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()}): another process stopped "
        "responding or exited. The wait is bounded by the process-group timeout (accelerate: "
        "InitProcessGroupKwargs(timeout=...)). Cause: "
        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )
