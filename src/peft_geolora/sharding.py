"""FSDP2 (``fully_shard``) factors: the allocator gathers them whole, decides once, and writes each shard back.

Under FSDP2 every factor is a ``DTensor`` sharded on its rows (``Shard(0)``): process p holds ``U[rows_p, :]``,
``S[rows_p, :]``, ``V[rows_p, :]`` and the matching rows of the gradients. The allocator works on whole matrices
(QR of ``[U | G V]``, SVD of the 2r × 2r coefficients), so around each of its rewrites it

1. gathers every factor and gradient whole, the same on every process: one all-gather for all of them, carrying
   only the active columns (everything beyond the active rank is zero by construction);
2. computes the step on those whole tensors, then makes process 0's result everyone's (the broadcast of
   :mod:`peft_geolora.distributed`, as for DDP), so that all processes take one decision;
3. copies each process's own rows of the result into its local shard, in place (parameters and optimizer
   references stay valid).

The default step rule needs more: the factors as they stood before the optimizer's step (gathered whole in the
optimizer's pre-step hook), and the optimizer's moments of the factors where it rewrites them (the new entries of an
augmentation, the rotation of a truncation). Those are ``DTensor``s sharded as the factors are; :class:`WholeState`
gathers them whole for the rewrite (one all-gather) and writes each process's rows back in place. Every process
computes the same whole result from the same gathered inputs, so the rows each writes agree with everyone's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch


def is_sharded(tensor: Optional[torch.Tensor]) -> bool:
    """A ``DTensor`` (FSDP2's sharded parameters and gradients)."""
    if tensor is None:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor, as a plain tensor (an all-gather for a ``DTensor``; every process must call it)."""
    if not is_sharded(tensor):
        return tensor
    return tensor.detach().full_tensor()


def gather_columns(tensors: Sequence[Optional[torch.Tensor]], columns: Sequence[int]) -> list[Optional[torch.Tensor]]:
    """The whole tensors, of which only the first ``columns[i]`` columns of ``tensors[i]`` travel (the rest is zero
    by construction: the factors and their gradients beyond the active rank), with one all-gather for all of them.

    ``DTensor``s sharded on their rows (``Shard(0)`` on a one-dimensional mesh, as FSDP2 places parameters) are
    batched; plain tensors come back as they are; any other placement is gathered whole on its own.
    """

    def batched(t: Optional[torch.Tensor]) -> bool:
        return is_sharded(t) and t.device_mesh.ndim == 1 and t.placements[0].is_shard(0) and t.dim() == 2

    batch = [i for i, t in enumerate(tensors) if batched(t)]
    out = [None if i in batch else gather(t) for i, t in enumerate(tensors)]
    if not batch:
        return out
    mesh = tensors[batch[0]].device_mesh
    world = mesh.size()
    # rows each process holds of each tensor: torch.chunk's split of the first dimension, as DTensor shards it
    rows = [[c.shape[0] for c in torch.empty(tensors[i].shape[0], 0).chunk(world)] for i in batch]
    rows = [r + [0] * (world - len(r)) for r in rows]
    cols = [columns[i] for i in batch]
    totals = [sum(rows[j][r] * cols[j] for j in range(len(batch))) for r in range(world)]
    local = torch.cat([tensors[i].to_local().detach()[:, : cols[j]].reshape(-1) for j, i in enumerate(batch)])
    padded = local.new_zeros(max(totals))
    padded[: local.numel()] = local
    received = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(received, padded, group=mesh.get_group())
    for j, i in enumerate(batch):
        whole = local.new_zeros(tensors[i].shape)
        start = 0
        for r in range(world):
            offset = sum(rows[k][r] * cols[k] for k in range(j))
            block = received[r][offset : offset + rows[j][r] * cols[j]].view(rows[j][r], cols[j])
            whole[start : start + rows[j][r], : cols[j]] = block
            start += rows[j][r]
        out[i] = whole
    return out


def write_local(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this process's shard of ``whole`` (identical on every process) into the sharded ``param``, in place."""
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(whole.detach(), param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())


class WholeState:
    """The optimizer's state of some factors with every sharded tensor gathered whole, as ``.state[param]`` (the
    mapping ``optimizer.state`` is), for one rewrite; :meth:`write_back` copies each process's rows of the rewritten
    tensors into the sharded state in place. Plain (unsharded) state is handed through as it is."""

    def __init__(self, optimizer: Any, params: Sequence[torch.Tensor]) -> None:
        self.state: dict[torch.Tensor, dict[str, Any]] = {}
        sharded: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        for p in params:
            entries = optimizer.state.get(p, {})
            self.state[p] = dict(entries)
            sharded += [(p, k, v) for k, v in entries.items() if is_sharded(v)]
        whole = gather_columns([v for _, _, v in sharded], [v.shape[-1] if v.dim() else 0 for _, _, v in sharded])
        self._sharded = [(v, w) for (_, _, v), w in zip(sharded, whole)]
        for (p, k, _), w in zip(sharded, whole):
            self.state[p][k] = w

    def write_back(self) -> None:
        for original, whole in self._sharded:
            write_local(original, whole)
