"""The adapters one :class:`~peft_geolora.RankAllocator` drives: found in the model, batched by shape, rewritten in
place.

Every adapter stores ``U`` (m × R), ``S`` (R × R) and ``V`` (n × R) at a fixed capacity R (notation:
:mod:`peft_geolora.integrator`); its first r columns (rows and columns of ``S``) are active and everything beyond is
exactly zero. The allocator's math runs on batches of equally shaped adapters, ``(B, m, r)``, ``(B, r, r)``,
``(B, n, r)`` in the compute dtype; :meth:`AdapterSet.write` puts a batch's result back into the parameters in place
(one fused copy), so optimizer references, DDP buckets and FSDP2 shards stay valid.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import sharding, zero
from .layer import GeoLoraLayer
from .optimizer_state import copy_all


@dataclass
class AdapterRef:
    """One (layer, adapter name) pair the allocator drives."""

    name: str
    layer: GeoLoraLayer
    adapter: str
    # FSDP2: the whole factors (U, S, V) gathered for one rewrite; read and written instead of the sharded parameters
    whole: Optional[list[torch.Tensor]] = None

    def __post_init__(self) -> None:
        # the layer's ParameterDicts (their entries are looked up at every use: FSDP2 replaces the parameters)
        self._factors = (self.layer.geolora_U, self.layer.geolora_S, self.layer.geolora_V)

    @property
    def U(self) -> torch.Tensor:
        return self.whole[0] if self.whole is not None else self._factors[0][self.adapter]

    @property
    def S(self) -> torch.Tensor:
        return self.whole[1] if self.whole is not None else self._factors[1][self.adapter]

    @property
    def V(self) -> torch.Tensor:
        return self.whole[2] if self.whole is not None else self._factors[2][self.adapter]

    @property
    def rank(self) -> int:
        return self.layer.rank[self.adapter]

    @property
    def capacity(self) -> int:
        return self.layer.capacity[self.adapter]

    @property
    def scaling(self) -> float:
        return self.layer.scaling[self.adapter]

    @property
    def dims(self) -> tuple[int, int]:
        """(m, n): the rows of ``U`` and ``V`` (read from ``ds_shape`` under DeepSpeed ZeRO-3, which leaves the
        parameters themselves empty outside the forward)."""
        U, V = self._factors[0][self.adapter], self._factors[2][self.adapter]
        return getattr(U, "ds_shape", U.shape)[0], getattr(V, "ds_shape", V.shape)[0]

    def parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """The factor parameters themselves (sharded ``DTensor``s under FSDP2)."""
        return tuple(factor[self.adapter] for factor in self._factors)


@dataclass
class Batch:
    """Equally shaped adapters between a step and their rewrite (leading dimension B = len(members)).

    ``U`` (B, m, k), ``S`` (B, k, k), ``V`` (B, n, k); ``S0`` (B, k, k): the coefficients at the cycle's start (the
    growth test's reference), or None; with the coefficient step also its first moment ``M`` (B, k, k) and second
    moment ``v`` (B,).
    """

    members: list[int]
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    S0: Optional[torch.Tensor] = None
    M: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / accelerate wrappers; return the module that owns the GeoLoRA layers."""
    while (
        isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        or type(model).__module__.startswith("deepspeed.")  # its engine forwards attributes such as peft_config
        or (hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"))
    ):
        model = model.module
    return model


def per_adapter(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One number per adapter of a batch ``like`` (B, a, b), as (B, 1, 1) in its dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]


class AdapterSet:
    """The GeoLoRA adapters named ``adapter_name`` in a PEFT model, in module order."""

    def __init__(self, peft_model: nn.Module, adapter_name: str) -> None:
        self.items: list[AdapterRef] = [
            AdapterRef(name, module, adapter_name)
            for name, module in peft_model.named_modules()
            if isinstance(module, GeoLoraLayer) and adapter_name in module.geolora_U
        ]
        if not self.items:
            raise ValueError(f"The model has no GeoLoRA layers for adapter `{adapter_name}`.")

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[AdapterRef]:
        return iter(self.items)

    def __getitem__(self, i: int) -> AdapterRef:
        return self.items[i]

    def factor_params(self) -> Iterator[nn.Parameter]:
        for a in self.items:
            yield from a.parameters()

    def ranks(self) -> list[int]:
        return [a.rank for a in self.items]

    def groups(self, param_groups: Optional[list[int]] = None) -> dict[tuple, list[int]]:
        """Adapters that can be batched: equal shapes, rank, capacity, dtype, device (and optimizer parameter group,
        where ``param_groups`` gives each adapter's)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, a in enumerate(self.items):
            group = param_groups[i] if param_groups is not None else 0
            groups[(a.U.shape[0], a.V.shape[0], a.rank, a.capacity, a.U.dtype, a.U.device, group)].append(i)
        return groups

    def stack(self, members: list[int], r: int, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active factors of ``members``: U (B, m, r), S (B, r, r), V (B, n, r) in the compute dtype ``cd``."""
        U = torch.stack([self.items[i].U[:, :r] for i in members]).to(cd)
        S = torch.stack([self.items[i].S[:r, :r] for i in members]).to(cd)
        V = torch.stack([self.items[i].V[:, :r] for i in members]).to(cd)
        return U, S, V

    def write(self, members: list[int], U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, ranks: list[int]) -> None:
        """Write new active factors of equally shaped adapters in place, zero the rest, and set their ranks.

        ``U`` (B, m, w), ``S`` (B, w, w), ``V`` (B, n, w): adapter ``members[b]`` gets the first ``ranks[b]`` columns
        (rows and columns of ``S``); everything beyond is zero.
        """
        capacity = self.items[members[0]].capacity
        if U.shape[-1] > capacity:  # an augmentation wider than the storage, truncated to ranks that fit it
            U, S, V = U[..., :capacity], S[..., :capacity, :capacity], V[..., :capacity]
        width = U.shape[-1]
        pad = capacity - width
        drop = torch.arange(width, device=U.device)[None, :] >= torch.tensor(ranks, device=U.device)[:, None]
        U = torch.nn.functional.pad(U.masked_fill(drop[:, None, :], 0), (0, pad))
        V = torch.nn.functional.pad(V.masked_fill(drop[:, None, :], 0), (0, pad))
        S = S.masked_fill(drop[:, None, :] | drop[:, :, None], 0)
        S = torch.nn.functional.pad(S, (0, pad, 0, pad))
        targets = [p for i in members for p in (self.items[i].U, self.items[i].S, self.items[i].V)]
        copy_all(targets, [x for b in range(len(members)) for x in (U[b], S[b], V[b])])
        for i, r1 in zip(members, ranks):
            self.items[i].layer.set_rank(self.items[i].adapter, r1, zero_rest=False)

    def zero_beyond(self, ranks: list[int]) -> None:
        """Set every adapter whose rank differs from ``ranks`` to that rank, zeroing what lies beyond it."""
        for a, r in zip(self.items, ranks):
            if r != a.rank:
                a.U[:, r:] = 0
                a.V[:, r:] = 0
                a.S[r:, :] = 0
                a.S[:, r:] = 0
                a.layer.set_rank(a.adapter, r, zero_rest=False)

    def active_blocks(self) -> list[torch.Tensor]:
        """``U[:, :r]``, ``S[:r, :r]``, ``V[:, :r]`` of every adapter (views)."""
        return [x for a in self.items for x in (a.U[:, : a.rank], a.S[: a.rank, : a.rank], a.V[:, : a.rank])]

    def gather(self) -> None:
        """FSDP2 or DeepSpeed ZeRO: gather every adapter's factors whole for one rewrite (FSDP2: their active columns
        travel; ZeRO: from the fp32 masters)."""
        params = list(self.factor_params())
        if zero.is_zero_param(params[0]):
            flat = zero.gather(params)
        else:
            flat = sharding.gather_columns(params, [a.rank for a in self.items for _ in "USV"])
        for i, a in enumerate(self.items):
            a.whole = flat[3 * i : 3 * i + 3]

    def release(self) -> None:
        """After a rewrite: write each process's shard (ZeRO: slice, and the model's copy) of the gathered factors back;
        tell the layers they are current."""
        gathered = [a for a in self.items if a.whole is not None]
        if gathered and zero.is_zero_param(gathered[0].parameters()[0]):
            zero.write([p for a in gathered for p in a.parameters()], [w for a in gathered for w in a.whole])
        else:
            for a in gathered:
                for param, whole in zip(a.parameters(), a.whole):
                    sharding.write_local(param, whole)
        for a in self.items:
            a.whole = None
            a.layer.mark_allocated(a.adapter)
