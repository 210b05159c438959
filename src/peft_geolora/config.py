"""``GeoLoraConfig``: the settings of a GeoLoRA adapter and of its rank allocator (JSON-safe fields only)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .registry import GEOLORA


# lora_alpha="auto" under an Adam-family optimizer: the scale s = AUTO_ADAPTER_STEP / lr, so that the adapter's step
# s · lr (Adam moves every coefficient by about lr, so ΔW moves by about s · lr) is the one that trained best on the
# suite's learning-rate tasks (lora_alpha 1 at lr 5e-3; docs/research.md, "Choosing the defaults").
AUTO_ADAPTER_STEP = 5e-3
# the scale an adapter with lora_alpha="auto" computes with before an allocator has resolved it (and for ever when no
# allocator drives it, or under SGD)
UNRESOLVED_AUTO_SCALE = 1.0
# The default starting rank, and the default max_rank of a smaller r: 8 columns of storage, 1.01x LoRA r=8's training
# memory. Smaller storage trains in less (6: 0.76x) and scores less on the suite's test protocol (docs/research.md,
# "Lean: training memory against score").
DEFAULT_RANK = 8


# Settings of the step variants that 0.2.0 removed (their measurements: docs/research.md), with the value that trains
# as the default step does. A saved config may still hold them; GeoLoraConfig reads it (_read_retired_settings).
RETIRED_SETTINGS = {"moment_init": "mean", "balance_bases": False, "basis_steps": "every", "relative_step_above": 1.0}


def _check_range(name: str, value, allowed: str, ok: bool, hint: str = "") -> None:
    if not ok:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.{' ' + hint if hint else ''}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class GeoLoraConfig(PeftConfig):
    """Configuration of a GeoLoRA adapter (Schotthöfer et al., "GeoLoRA", arXiv 2410.18720).

    Each targeted layer learns ``ΔW = s · U S Vᵀ`` with orthonormal ``U``, ``V`` and a rank that the
    :class:`~peft_geolora.RankAllocator` adapts after every optimizer step, either per layer (relative
    tolerance ``tau``) or under one global ``budget``.

    Rank schedule, a worked example: with ``cycle_length=3`` (the default) the optimizer steps form cycles of 4: at
    steps 1, 5, 9, … the bases are augmented with the optimizer's new directions (the rank doubles, up to the
    capacity), at the other steps only ``S`` moves on the augmented basis, and at steps 4, 8, 12, … the augmented
    adapter is truncated by its SVD. With ``cycle_length=0`` (the paper's Algorithm 1) every step augments and
    truncates. With ``warmup_steps=100`` and ``freeze_step=900`` the bases still rotate at every truncation, but
    the ranks stay at ``r`` up to step 100, adapt from 101 to 900, and keep their step-900 values afterwards.
    """

    r: Optional[int] = field(
        default=None,
        metadata={
            "help": f"Initial rank of every adapter (clamped to min(in, out) per layer); as in LoRA, also the "
            f"storage when it is above the default max_rank. None: min({DEFAULT_RANK}, max_rank), so max_rank alone "
            f"sets a smaller storage."
        },
    )
    max_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": f"Largest rank a layer keeps after truncation, and the adapter's storage: min(in, out, max_rank) "
            f"columns, into whose free columns an augmentation adds its new directions (2 * max_rank with "
            f"step_rule='coefficient'). None: max(r, {DEFAULT_RANK}), so a LoRA recipe's r=8 or r=16 trains with "
            f"LoRA's storage and a small r can grow to {DEFAULT_RANK}.",
            "allocator": True,
        },
    )
    min_rank: int = field(
        default=1, metadata={"help": "Smallest rank a layer keeps after truncation (>= 1).", "allocator": True}
    )
    # 0.5 with the default step rule and growth test (growth_tol=0.1): on the suite's tasks it keeps about 42 % of
    # LoRA r=8's parameters (0.4: 52 %); with step_rule="coefficient" 0.15 keeps about half (docs/research.md,
    # "Choosing the defaults").
    tau: float = field(
        default=0.5,
        metadata={
            "help": "Relative truncation tolerance in [0, 1): keep the smallest rank r1 with "
            "||sigma[r1:]||_2 <= tau * ||sigma||_2. Ignored for rank decisions when `budget` is set.",
            "allocator": True,
        },
    )
    abs_tol: float = field(
        default=0.0,
        metadata={"help": "Singular values at or below this absolute value are always discarded.", "allocator": True},
    )
    lora_alpha: Union[float, Literal["auto"]] = field(
        default="auto",
        metadata={
            "help": "The adapter's step, read as in LoRA: lora_alpha / r relative to LoRA's usual lora_alpha = 2r. "
            "The RankAllocator sets the scale s (Delta W = s * U S V^T) when it is created: s = (lora_alpha / 2r) * "
            "5e-3 / lr under an Adam-family optimizer (lr: the peak learning rate of the optimizer's group holding "
            "S), so the adapter moves by (lora_alpha / 2r) * 5e-3 per step at any learning rate, the step tuned on "
            "the suite; s = lora_alpha / 2r under SGD. 'auto' (the default) is lora_alpha = 2r. A LoRA recipe "
            "(r=8, lora_alpha=16, any lr) therefore trains with the tuned step; the learning rate still sets the "
            "step of the head and anything else the optimizer trains. To fix s yourself, give `scaling`."
        },
    )
    scaling: Optional[float] = field(
        default=None,
        metadata={
            "help": "The scale s the adapter computes with (Delta W = s * U S V^T, not divided by the rank). "
            "Written when the RankAllocator is created, from lora_alpha and the learning rate, and saved with the "
            "adapter; fixed for the adapter's life once written. Give a number to fix it yourself (then lora_alpha "
            "is not read). Configs saved by peft-geolora 0.1.0 lack it and load with lora_alpha / r."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter's input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match), a regex, or 'all-linear' for the modules to adapt. Supported types: "
            "torch.nn.Linear and transformers' Conv1D. None uses the model type's defaults."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters that are trained and saved (e.g. a head)."}
    )
    bias: Literal["none", "all", "geolora_only"] = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all', or 'geolora_only'."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: S = 0, so the adapted model starts exactly at the base model. False: a random non-zero "
            "S (for tests)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt; None adapts every matching layer."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') used by layers_to_transform."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by GeoLoRA; must stay None."}
    )
    budget: Optional[int] = field(
        default=None,
        metadata={
            "help": "Global budget over all adapters: None uses the per-layer tau rule; otherwise the pooled "
            "singular values are truncated to this many (budget_unit='rank') or to this many trainable "
            "parameters sum r*(m+n+r) (budget_unit='params').",
            "allocator": True,
        },
    )
    budget_unit: Literal["rank", "params"] = field(
        default="rank",
        metadata={"help": "What `budget` counts: 'rank' (singular values) or 'params'.", "allocator": True},
    )
    cycle_length: int = field(
        default=3,
        metadata={
            "help": "The optimizer steps form cycles of cycle_length + 1: the first augments the bases with the "
            "gradient's new directions, the next ones train S on the augmented basis, the last truncates (the "
            "authors' experiments). 0: augment and truncate at every step (the paper's Algorithm 1).",
            "allocator": True,
        },
    )
    step_rule: Literal["optimizer", "coefficient"] = field(
        default="optimizer",
        metadata={
            "help": "Who steps the factors. 'optimizer' (default): your optimizer steps U, S and V, and the "
            "allocator augments the bases with the part of its proposed moves orthogonal to them. 'coefficient': "
            "the allocator takes the adapter gradients before optimizer.step() and steps the augmented coefficient "
            "matrix itself with your optimizer's hyperparameters, so U and V hold no optimizer state. It scores "
            "below the default on the suite (docs/research.md): give it tau=0.15 and a number in lora_alpha. Both "
            "rules run under FSDP2 (`fully_shard`).",
            "allocator": True,
        },
    )
    # 0.1 by measurement: the growth test sets how far an adapter started small can grow (under Adam every entry of
    # the cycle's step moves by about lr, so its norm grows with the adapter's width while one direction's growth
    # does not); at 0.2 adapters started at r = 1 stop at about 3 directions and the final size depends on the
    # initial rank (+-32.8 % on trec6), at 0.1 they grow to where the others settle (docs/research.md, "Choosing the
    # defaults").
    growth_tol: Optional[float] = field(
        default=0.1,
        metadata={
            "help": "At a truncation, a direction whose singular value grew during the "
            "cycle by at least "
            "growth_tol * ||cycle step of S||_F is kept even if the tau rule would cut it: a direction the "
            "gradient keeps pointing to can enter however large the established ones are. None: the tau rule "
            "alone. Applies to the tau rule, not to a global budget.",
            "allocator": True,
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps before the first rank change (bases still rotate).", "allocator": True},
    )
    freeze_step: Optional[int] = field(
        default=None,
        metadata={"help": "From this optimizer step on ranks are frozen (None: never).", "allocator": True},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Written at save time: the active rank of each layer. Checked against the weights on load."},
    )
    rank_history: dict[str, list[list[int]]] = field(
        default_factory=dict,
        metadata={"help": "Written at save time: per layer, the [optimizer step, rank] pairs where its rank changed."},
    )
    conv_kernels: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Written at save time: for each Conv2d layer, [in_channels, kh, kw, dilation_h, dilation_w]: "
            "the patch its V spans (so the adapter converts to LoRA from the files alone)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GEOLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        # r and max_rank follow each other when one is left out: r=16 alone stores 16 columns as LoRA r=16 does,
        # max_rank=6 alone starts at 6 (the smaller storage the lean trade-off measured)
        if self.r is None:
            self.r = min(DEFAULT_RANK, self.max_rank) if _is_int(self.max_rank) else DEFAULT_RANK
        if self.max_rank is None and _is_int(self.r):
            self.max_rank = max(self.r, DEFAULT_RANK)
        self._validate()

    def storage_columns(self) -> int:
        """Columns each adapter reserves for ``U``, ``V`` (and rows and columns of ``S``), before the layer's own
        bound ``min(in, out)``: ``max_rank`` under the default step rule. A cycle augments an adapter of rank r into
        the storage's free columns (``min(r, max_rank − r)`` new directions); with ``cycle_length=0`` the augmented
        adapter (up to ``2 · max_rank`` columns) lives only in the allocator's temporaries. ``2 · max_rank`` with
        ``step_rule="coefficient"``, which keeps its own moments of the augmented coefficients.
        Training memory (factors, their gradients, the optimizer's moments) follows this width."""
        return 2 * self.max_rank if self.step_rule == "coefficient" else self.max_rank

    def current_scaling(self) -> float:
        """The scale ``s`` the adapter computes with now: ``scaling``, or 1 while it waits for its allocator."""
        return UNRESOLVED_AUTO_SCALE if self.scaling is None else float(self.scaling)

    def _validate(self) -> None:
        for name in ("r", "max_rank", "min_rank"):
            value = getattr(self, name)
            _check_range(name, value, "an integer >= 1", _is_int(value) and value >= 1)
        for name in ("cycle_length", "warmup_steps"):
            value = getattr(self, name)
            _check_range(name, value, "an integer >= 0", _is_int(value) and value >= 0)
        _check_range("min_rank", self.min_rank, f"<= `max_rank` ({self.max_rank})", self.min_rank <= self.max_rank)
        _check_range(
            "r",
            self.r,
            f"in [`min_rank`, `max_rank`] = [{self.min_rank}, {self.max_rank}]",
            self.min_rank <= self.r <= self.max_rank,
            # max_rank given below r: say what each field means and what to give
            f"GeoLoRA's `r` is the starting rank and `max_rank` the largest rank a layer keeps (its storage: training "
            f"memory follows it); to train up to rank {self.r}, give max_rank={self.r} as well."
            if _is_int(self.r) and self.r > self.max_rank
            else "",
        )
        _check_range("tau", self.tau, "a number in [0, 1)", isinstance(self.tau, (int, float)) and 0 <= self.tau < 1)
        _check_range(
            "abs_tol", self.abs_tol, "a number >= 0", isinstance(self.abs_tol, (int, float)) and self.abs_tol >= 0
        )
        _check_range(
            "lora_dropout",
            self.lora_dropout,
            "a number in [0, 1)",
            isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
        )
        _check_range(
            "lora_alpha",
            self.lora_alpha,
            "a number > 0 or 'auto'",
            self.lora_alpha == "auto" or (_is_number(self.lora_alpha) and self.lora_alpha > 0),
        )
        _check_range(
            "bias", self.bias, "one of 'none', 'all', 'geolora_only'", self.bias in ("none", "all", "geolora_only")
        )
        _check_range(
            "budget_unit", self.budget_unit, "one of 'rank', 'params'", self.budget_unit in ("rank", "params")
        )
        _check_range(
            "scaling",
            self.scaling,
            "None or a number > 0",
            self.scaling is None or (isinstance(self.scaling, (int, float)) and self.scaling > 0),
        )
        _check_range(
            "step_rule",
            self.step_rule,
            "one of 'optimizer', 'coefficient'",
            self.step_rule in ("optimizer", "coefficient"),
        )
        if self.growth_tol is not None:
            _check_range(
                "growth_tol",
                self.growth_tol,
                "None or a number in (0, 1]",
                isinstance(self.growth_tol, (int, float)) and 0 < self.growth_tol <= 1,
            )
        if self.budget is not None:
            _check_range("budget", self.budget, "None or an integer >= 1", _is_int(self.budget) and self.budget >= 1)
        if self.freeze_step is not None:
            _check_range(
                "freeze_step",
                self.freeze_step,
                f"None or an integer > `warmup_steps` ({self.warmup_steps})",
                _is_int(self.freeze_step) and self.freeze_step > self.warmup_steps,
            )
        if self.target_parameters is not None:
            raise ValueError("`target_parameters` is not supported by GeoLoRA; use `target_modules` instead.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("`layers_pattern` only applies together with `layers_to_transform`; set both or neither.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (regex).")


def _read_retired_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Settings written by 0.1.x: ``schedule="step"`` becomes ``cycle_length=0``, and the settings of step variants
    that 0.2.0 removed (:data:`RETIRED_SETTINGS`, ``step_rule="split"``) are dropped, with a warning that names each
    one whose value trained differently from the default step. None of them changes what a saved adapter computes.
    A config with recorded ranks but no ``scaling`` key at all was saved by 0.1.0, which computed with
    ``lora_alpha / r``: that becomes its ``scaling``."""
    kwargs = dict(kwargs)
    if kwargs.get("rank_pattern") and "scaling" not in kwargs and _is_number(kwargs.get("lora_alpha")):
        kwargs["scaling"] = float(kwargs["lora_alpha"]) / kwargs.get("r", 8)
    if kwargs.pop("schedule", "cycle") == "step":
        kwargs["cycle_length"] = 0
    changed = [f"{k}={kwargs[k]!r}" for k, default in RETIRED_SETTINGS.items() if kwargs.get(k, default) != default]
    for key in RETIRED_SETTINGS:
        kwargs.pop(key, None)
    if kwargs.get("step_rule") == "split":
        changed.append("step_rule='split'")
        kwargs["step_rule"] = "optimizer"
    if changed:
        warnings.warn(
            f"GeoLoraConfig: {', '.join(changed)} asked for step variants that peft-geolora 0.2.0 removed "
            "(docs/research.md). They are ignored: an adapter saved with them loads and computes as saved, and "
            "training uses the default step.",
            stacklevel=3,
        )
    return kwargs


def _accepting_retired_settings(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass ``__init__``, reading configs saved by 0.1.x on every load path (PEFT's and transformers')."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_read_retired_settings(kwargs))

    return __init__


GeoLoraConfig.__init__ = _accepting_retired_settings(GeoLoraConfig.__init__)

# The config fields that configure the RankAllocator (RankAllocator(..., **options) and GeoLoraCallback(**options)
# may override them for one run): those whose metadata says "allocator".
ALLOCATOR_OPTIONS = tuple(f.name for f in fields(GeoLoraConfig) if f.metadata.get("allocator"))
