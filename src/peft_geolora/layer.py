"""GeoLoRA layers: ``U``, ``S``, ``V`` stored at a fixed capacity with a persistent active-rank buffer.

Storage per adapter (notation in :mod:`peft_geolora.integrator`): ``geolora_U`` (m × R), ``geolora_S`` (R × R),
``geolora_V`` (n × R) with capacity ``R = min(m, n, max_rank)``
(:meth:`~peft_geolora.GeoLoraConfig.storage_columns`), and ``geolora_rank``, a persistent 0-d int64 buffer holding
the active rank ``r``. Only ``U[:, :r]``, ``S[:r, :r]``, ``V[:, :r]`` are used; the rest stays exactly zero.
Shapes never change after construction, so DDP buckets and optimizer references stay valid; the allocator rewrites
the factors in place. A Python-int mirror of the rank (``self.rank``) keeps the forward free
of device syncs.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .gradients import GeoLoraConvFunction, GeoLoraFunction
from .integrator import sign_fixed_qr


try:  # transformers is optional for the layer itself
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency of peft
    Conv1D = None

SUPPORTED_LAYER_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv2d) + ((Conv1D,) if Conv1D is not None else ())

# Optimizer steps that may move U without an allocator step before the missing-allocator warning.
UNALLOCATED_STEPS_BEFORE_WARNING = 5
_warned_missing_allocator = False


class GeoLoraLayer(BaseTunerLayer):
    """Mixin holding the per-adapter GeoLoRA state of one targeted layer."""

    adapter_layer_names: tuple[str, ...] = ("geolora_U", "geolora_S", "geolora_V")
    other_param_names: tuple[str, ...] = (
        "geolora_rank",
        "rank",
        "capacity",
        "scaling",
        "geolora_dropout",
        "rank_history",
        "_seen_version",
        "_unallocated_steps",
        "integrated",
        "basis_gradients",
        "expected_rank",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.geolora_U = nn.ParameterDict({})
        self.geolora_S = nn.ParameterDict({})
        self.geolora_V = nn.ParameterDict({})
        self.geolora_rank = BufferDict({}, persistent=True)
        self.geolora_dropout = nn.ModuleDict({})
        self.rank: dict[str, int] = {}  # Python mirror of geolora_rank
        self.capacity: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.rank_history: dict[str, list[tuple[int, int]]] = {}  # (optimizer step, new rank) at each change
        # True while a RankAllocator drives the adapter: the backward then exposes the K/L-gradients
        # (GeoLoraFunction); otherwise the adapter is a fixed-rank U S Vᵀ trained by plain gradients.
        self.integrated: dict[str, bool] = {}
        # False on the steps of a cycle where only S trains (set by the allocator before each step): the backward
        # then skips the U- and V-gradients, which nothing reads there
        self.basis_gradients: dict[str, bool] = {}
        # rank recorded in the adapter_config.json this adapter was built from; checked on the first load
        self.expected_rank: dict[str, Optional[int]] = {}
        self._seen_version: dict[str, int] = {}
        self._unallocated_steps: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif Conv1D is not None and isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape  # Conv1D stores (in, out)
            self.fan_in_fan_out = True
        elif isinstance(base, nn.Conv2d):
            _check_conv(base)
            # the adapter acts on the flattened patch: n = c · kh · kw inputs, m = output channels
            self.in_features = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
            self.out_features = base.out_channels
            self.fan_in_fan_out = False
        else:
            raise TypeError(unsupported_layer_message(base))
        self.register_load_state_dict_post_hook(_refresh_rank_mirror)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        storage: int,
        scaling: float,
        lora_dropout: float,
        init_weights: bool,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the adapter: orthonormal ``U``, ``V`` over the initial rank, ``S = 0`` (or random, for tests), stored
        at ``min(m, n, storage)`` columns (``storage``: :meth:`GeoLoraConfig.storage_columns`)."""
        m, n = self.out_features, self.in_features
        capacity = min(m, n, storage)
        rank = min(r, capacity)
        self.capacity[adapter_name] = capacity
        self.scaling[adapter_name] = scaling  # fixed at creation: follows neither the current nor the initial rank
        self.geolora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.geolora_U[adapter_name] = nn.Parameter(torch.zeros(m, capacity))
        self.geolora_S[adapter_name] = nn.Parameter(torch.zeros(capacity, capacity))
        self.geolora_V[adapter_name] = nn.Parameter(torch.zeros(n, capacity))
        self.geolora_rank[adapter_name] = torch.tensor(rank, dtype=torch.int64)
        self.rank[adapter_name] = rank
        self.reset_geolora_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.mark_allocated(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_geolora_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """U, V: QR of a Gaussian over the active rank; S: zero, or a random diagonal if ``init_weights`` is False."""
        r = self.rank[adapter_name]
        U, S, V = self.geolora_U[adapter_name], self.geolora_S[adapter_name], self.geolora_V[adapter_name]
        if U.is_meta:
            return
        U.zero_()
        S.zero_()
        V.zero_()
        U[:, :r] = sign_fixed_qr(torch.randn(U.shape[0], r, dtype=torch.float32))[0].to(U)
        V[:, :r] = sign_fixed_qr(torch.randn(V.shape[0], r, dtype=torch.float32))[0].to(V)
        if not init_weights:
            S[:r, :r] = torch.diag(torch.empty(r).uniform_(0.05, 0.2)).to(S)

    @torch.no_grad()
    def set_rank(self, adapter_name: str, rank: int, zero_rest: bool = True) -> None:
        """Set the active rank (buffer and mirror) and zero everything beyond it (``zero_rest=False``: the caller
        has written the whole factors already)."""
        self.geolora_rank[adapter_name].fill_(rank)
        self.rank[adapter_name] = rank
        if not zero_rest:
            return
        self.geolora_U[adapter_name][:, rank:] = 0
        self.geolora_V[adapter_name][:, rank:] = 0
        self.geolora_S[adapter_name][rank:, :] = 0
        self.geolora_S[adapter_name][:, rank:] = 0

    def active_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U[:, :r]`` (m × r), ``S[:r, :r]`` (r × r), ``V[:, :r]`` (n × r): views of the active slices."""
        r = self.rank[adapter_name]
        return (
            self.geolora_U[adapter_name][:, :r],
            self.geolora_S[adapter_name][:r, :r],
            self.geolora_V[adapter_name][:, :r],
        )

    def num_active_parameters(self, adapter_name: str) -> int:
        """Trainable parameters at the active rank r: ``r (m + n + r)`` (U, V and a full S)."""
        r = self.rank[adapter_name]
        return r * (self.out_features + self.in_features + r)

    def mark_allocated(self, adapter_name: str) -> None:
        """Record that the allocator (or creation/loading) has just written this adapter's factors."""
        self._seen_version[adapter_name] = self.geolora_U[adapter_name]._version
        self._unallocated_steps[adapter_name] = 0

    def _check_allocator_runs(self, adapter_name: str) -> None:
        """Warn once if U keeps being stepped by an optimizer with no allocator step in between."""
        global _warned_missing_allocator
        version = self.geolora_U[adapter_name]._version
        if version == self._seen_version.get(adapter_name, version):
            return
        self._seen_version[adapter_name] = version
        self._unallocated_steps[adapter_name] = self._unallocated_steps.get(adapter_name, 0) + 1
        if self._unallocated_steps[adapter_name] >= UNALLOCATED_STEPS_BEFORE_WARNING and not _warned_missing_allocator:
            _warned_missing_allocator = True
            warnings.warn(
                "GeoLoRA factors have been updated by an optimizer for several steps without a rank-allocator "
                "step, so ranks do not adapt and the bases lose orthonormality. Create the allocator once and "
                "step it after every optimizer step:\n"
                "    allocator = peft_geolora.RankAllocator(model, optimizer)\n"
                "    optimizer.step(); allocator.step(); optimizer.zero_grad()\n"
                "(with the transformers Trainer, pass callbacks=[peft_geolora.GeoLoraCallback()]).",
                stacklevel=3,
            )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · U S Vᵀ`` (out × in; transposed for Conv1D), computed in fp32 on CPU for fp16/bf16 adapters."""
        U, S, V = self.active_factors(adapter_name)
        dtype = U.dtype
        if U.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            U, S, V = U.float(), S.float(), V.float()
        delta = (U @ S @ V.transpose(0, 1)) * self.scaling[adapter_name]  # (m, n)
        if self.fan_in_fan_out:
            delta = delta.transpose(0, 1)
        return delta.to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


def _refresh_rank_mirror(module: GeoLoraLayer, incompatible_keys: Any) -> None:
    """After ``load_state_dict``, copy the loaded rank buffers into the Python-int mirror."""
    for name in list(module.geolora_rank.keys()):
        buffer = module.geolora_rank[name]
        if not buffer.is_meta:
            module.rank[name] = int(buffer)
            if name in module.geolora_U:
                module.mark_allocated(name)


def _check_conv(conv: nn.Conv2d) -> None:
    """GeoLoRA's Conv2d adapter covers ordinary convolutions: one group, numeric zero padding."""
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (only 1 is supported)")
    if isinstance(conv.padding, str):
        problems.append(f"padding={conv.padding!r} (give the padding as numbers)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r} (only 'zeros')")
    if problems:
        raise TypeError(
            f"GeoLoRA cannot adapt this Conv2d: {', '.join(problems)}. Remove it from `target_modules` (or add it to "
            "`exclude_modules`)."
        )


def unsupported_layer_message(layer: nn.Module) -> str:
    names = ", ".join(f"`{t.__module__}.{t.__qualname__}`" for t in SUPPORTED_LAYER_TYPES)
    return (
        f"GeoLoRA cannot adapt a layer of type `{type(layer).__module__}.{type(layer).__qualname__}`. Supported "
        f"types: {names}. Remove it from `target_modules` (or add it to `exclude_modules`)."
    )


class Linear(nn.Module, GeoLoraLayer):
    """GeoLoRA on ``torch.nn.Linear`` or transformers' ``Conv1D``: ``y = base(x) + s · U S Vᵀ dropout(x)``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        storage: int,
        scaling: float,
        lora_dropout: float = 0.0,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        GeoLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, storage, scaling, lora_dropout, init_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active adapters' ``s · U S Vᵀ`` to the base weight (checking for NaN first if ``safe_merge``)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.geolora_U:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = base.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                    base.weight.data = merged
                else:
                    base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.geolora_U:
                with torch.no_grad():
                    base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        compiling = torch.compiler.is_compiling()
        for name in self.active_adapters:
            if name not in self.geolora_U:
                continue
            if compiling:
                # Under torch.compile the adapter runs at its reserved capacity: the factors are exactly zero beyond
                # the active rank, so the output and the gradients inside the active slices are those of the
                # sliced adapter, and no guard on the rank exists, so rank changes never recompile.
                U, S, V = self.geolora_U[name], self.geolora_S[name], self.geolora_V[name]
            elif self.rank[name] == 0:
                continue
            else:
                if self.training and torch.is_grad_enabled():
                    self._check_allocator_runs(name)
                U, S, V = self.active_factors(name)
            x_in = self.geolora_dropout[name](self._cast_input_dtype(x, U.dtype))
            # compiled: always the basis gradients (reading the flag would recompile when it flips; the allocator
            # discards them on the S-only steps either way)
            bases = compiling or self.basis_gradients.get(name, True)
            result = result + self._adapter_output(name, x_in, U, S, V, bases).to(result_dtype)
        return result.to(result_dtype)

    def _adapter_output(
        self, name: str, x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bases: bool
    ) -> torch.Tensor:
        """``s · U S Vᵀ x`` through the integrator's autograd function (the K-, L- and S-gradients; ``bases``
        False: the S-gradient only)."""
        return GeoLoraFunction.apply(x, U, S, V, self.scaling[name], self.integrated.get(name, False), bases)

    def __repr__(self) -> str:
        return "geolora." + super().__repr__()


class Conv2d(Linear):
    """GeoLoRA on ``torch.nn.Conv2d`` (groups 1): ``y = conv(x) + s · (U S) conv(dropout(x), V̂)``.

    ``V`` (n × R) spans the flattened input patch (n = c · kh · kw), ``U`` (m × R) the output channels; the update
    of the convolution weight is ``s · U S Vᵀ`` reshaped to (m, c, kh, kw). Merging, saving and the allocator are
    the Linear layer's; only the forward (:class:`~peft_geolora.gradients.GeoLoraConvFunction`) and the shape of the
    weight update differ.
    """

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · U S Vᵀ`` reshaped to the convolution weight (m, c, kh, kw)."""
        base = self.get_base_layer()
        delta = super().get_delta_weight(adapter_name)  # (m, n)
        return delta.reshape(base.weight.shape)

    def _adapter_output(
        self, name: str, x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bases: bool
    ) -> torch.Tensor:
        base = self.get_base_layer()
        kernel = (base.in_channels, *base.kernel_size)
        return GeoLoraConvFunction.apply(
            x, U, S, V, self.scaling[name], self.integrated.get(name, False), bases, kernel, base.stride, base.padding,
            base.dilation,
        )  # fmt: skip
