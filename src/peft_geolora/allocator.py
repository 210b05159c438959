"""``RankAllocator``: advance every GeoLoRA adapter at each optimizer step and decide the ranks.

One training step, in the order the data flows (docs/design.md draws it)::

    batch → forward / backward        the layers expose the K-, L- and S-gradients (gradients.GeoLoraFunction)
          → optimizer.step()          its pre-step hook: the step rule prepares (step_rule.StepRule)
          → allocator.step()          the schedule places the step in its cycle (schedule.CycleSchedule);
                                      the step rule advances the factors (optimizer_rule / coefficient_rule);
                                      at a cycle's end: truncation and the rank rule (truncation)
          → adapters rewritten in place (adapters.AdapterSet), process 0's copy everywhere (distributed)

The cycle schedule (``cycle_length`` = c): the optimizer steps form cycles of c + 1. The first step of a cycle
augments the bases with the gradient's new directions, the next ones train the coefficients on the augmented basis,
the last one truncates (c = 0: one step does both, the paper's Algorithm 1). :meth:`RankAllocator.finish` closes an
open cycle early and the next step opens a new one; the Trainer callback calls it before every evaluation and
checkpoint, so they only ever see kept adapters. The allocator is the only thing that changes ranks.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import refusals, scale, truncation
from .adapters import AdapterSet, Batch, unwrap_peft_model
from .coefficient_rule import CoefficientRule
from .config import ALLOCATOR_OPTIONS, GeoLoraConfig
from .distributed import broadcast_ints, broadcast_tensors, is_distributed, peer_failure_message
from .optimizer_rule import OptimizerRule
from .runaway import RunawayWatch
from .schedule import CycleSchedule
from .step_rule import StepRule


STEP_RULES: dict[str, type[StepRule]] = {"optimizer": OptimizerRule, "coefficient": CoefficientRule}


class RankAllocator:
    """Drives the GeoLoRA step at every optimizer step and decides the ranks.

    Usage (plain PyTorch or accelerate)::

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        allocator = RankAllocator(model, optimizer)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            allocator.step()            # after every optimizer step, before zero_grad
            optimizer.zero_grad()
        allocator.finish()              # close an open cycle: the adapters hold their kept ranks

    Parameters
    ----------
    model : the ``PeftModel`` (DDP- or accelerate-wrapped is fine)
    optimizer : the optimizer over the trainable parameters (an accelerate ``AcceleratedOptimizer`` is fine); a
        pre-step hook is registered on it. While no scale is written yet, its peak learning rate and ``lora_alpha``
        set the adapter's scale (:mod:`peft_geolora.scale`): create the allocator after a OneCycleLR (which records
        its ``max_lr`` in the groups); CyclicLR does not record its peak there, so give ``scaling`` a number with it.
    adapter_name : which adapter to drive; default: the active adapter
    sync_processes : in a distributed run, broadcast factors, ranks and the step rule's state from process 0 after
        every rewrite, so that all processes hold bit-identical adapters
    **options : overrides of the config's allocator fields (:data:`~peft_geolora.config.ALLOCATOR_OPTIONS`)

    Skipped steps (an fp16 GradScaler overflow, accelerate's accumulation micro-steps) never reach the optimizer's
    ``step`` and are skipped here too. A step whose adapter gradients are not finite leaves the adapters (and their
    optimizer state) exactly as they were, with a warning.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        adapter_name: Optional[str] = None,
        sync_processes: bool = True,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(ALLOCATOR_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown RankAllocator option(s) {unknown}; allowed: {list(ALLOCATOR_OPTIONS)}.")
        peft_model = unwrap_peft_model(model)
        configs = getattr(peft_model, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise TypeError("`model` must be a PeftModel with a GeoLoRA adapter (from peft.get_peft_model).")
        if adapter_name is None:
            active = getattr(peft_model, "active_adapter", "default")
            adapter_name = active if isinstance(active, str) else active[0]
        config = configs.get(adapter_name)
        if not isinstance(config, GeoLoraConfig):
            raise TypeError(
                f"Adapter `{adapter_name}` is not a GeoLoRA adapter (its config is {type(config).__name__})."
            )
        # A validated copy of the config carries the effective options; the model's config is never changed.
        self.config: GeoLoraConfig = copy.deepcopy(config)
        for key, value in options.items():
            setattr(self.config, key, value)
        self.config._validate()

        self.adapter_name = adapter_name
        self.sync_processes = sync_processes
        self.adapters = AdapterSet(peft_model, adapter_name)
        self._sharded = refusals.check_parameters_are_whole(model, self.adapters, self.config.step_rule)
        refusals.check_budget_covers_floors(self.config, self.adapters)
        self.optimizer = refusals.unwrap_optimizer(optimizer)
        refusals.check_optimizer_covers_factors(self.optimizer, self.adapters)
        if config.scaling is None:
            scale.resolve_scale(self.optimizer, self.adapters, (config, self.config))

        self.schedule = CycleSchedule.from_config(self.config)
        self._num_truncations = 0
        self._pending = False  # an optimizer step happened that allocator.step() has not followed yet
        self._base_ranks: dict[int, int] = {}  # ranks before the last augmentation (kept while ranks are fixed)
        self._open_cycle = False  # augmented, not yet truncated
        # a continued run (adapter loaded with its rank history) records its changes after the earlier run's
        self._history_offset = max(
            (event[0] for a in self.adapters for event in a.layer.rank_history.get(a.adapter, [])), default=0
        )
        self._warned: set[str] = set()
        self.rule: StepRule = STEP_RULES[self.config.step_rule](
            self.config, self.adapters, self.optimizer, self._warn_once
        )
        self._watch = RunawayWatch(self.adapters, self.optimizer, self.config.lora_alpha)
        self._hook = self.optimizer.register_step_pre_hook(self._before_optimizer_step)
        for a in self.adapters:
            a.layer.integrated[a.adapter] = True
        self._announce_next_step()
        base_model = getattr(peft_model, "base_model", peft_model)
        base_model.__dict__["_geolora_allocator"] = self

    @property
    def num_steps(self) -> int:
        """Optimizer steps the allocator has followed (see :class:`~peft_geolora.schedule.CycleSchedule`)."""
        return self.schedule.num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self.schedule.num_steps = value

    # ------------------------------------------------------------------ hooks and warnings
    @torch.no_grad()
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending:
            self._warn_once(
                "missing-step",
                "GeoLoRA: optimizer.step() ran twice without allocator.step() in between; the adapters skipped a "
                "step. Call allocator.step() after every optimizer.step() (the Trainer callback does).",
            )
        self.rule.before_optimizer_step()
        self._pending = True

    def _announce_next_step(self) -> None:
        """Tell the layers whether the coming backward must compute the bases' gradients."""
        bases = self.rule.steps_bases(self.schedule)
        for a in self.adapters:
            a.layer.basis_gradients[a.adapter] = bases

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """Advance every adapter after a real optimizer step (a no-op if the optimizer did not step)."""
        if not self._pending:
            return
        self._pending = False
        augment, truncate = self.schedule.advance()
        if not self.rule.finite:
            self._warn_once(
                "nonfinite",
                f"GeoLoRA: non-finite adapter gradients at optimizer step {self.num_steps}; the adapters were left "
                "as they were (factors and optimizer state). Lower the learning rate or use gradient clipping if "
                "this repeats.",
            )
        else:
            if self._sharded:
                self.adapters.gather()
            if augment:
                self._base_ranks = {i: a.rank for i, a in enumerate(self.adapters)}
            batches = self.rule.advance(augment, truncate)
            if truncate:
                self._truncate(batches or self.rule.batches())
            elif batches:
                self._keep_open(batches)
            self._publish()
        self._announce_next_step()

    def _keep_open(self, batches: list[Batch]) -> None:
        """A cycle stays open: the augmented adapters are written at their full width (their ranks are transient)."""
        self._open_cycle = True
        self.rule.keep(batches)
        for batch in batches:
            width = batch.U.shape[-1]
            self.adapters.write(batch.members, batch.U, batch.S, batch.V, [width] * len(batch.members))

    def _truncate(self, batches: list[Batch]) -> None:
        """SVD, the rank rule, the step rule's state carried over, the rewrite at the kept ranks, and the watch for
        adapters that run away (:mod:`peft_geolora.runaway`)."""
        self._num_truncations += 1
        fixed = None
        caps = costs = None
        if self.schedule.ranks_may_change():
            caps = {i: min(self.config.max_rank, a.capacity) for i, a in enumerate(self.adapters)}
            if self.config.budget is not None and self.config.budget_unit == "params":
                costs = {i: sum(a.dims) for i, a in enumerate(self.adapters)}
        else:
            fixed = {i: self._base_ranks.get(i, a.rank) for i, a in enumerate(self.adapters)}
        reorthonormalize = self._num_truncations % truncation.REORTHONORMALIZE_EVERY == 1
        done = truncation.truncate(self.config, batches, caps, costs, fixed, reorthonormalize)
        self._open_cycle = False
        for item in done:
            self.rule.carry(item)
            self._record(item.batch.members, item.ranks)
            self.adapters.write(item.batch.members, item.U, torch.diag_embed(item.sigma), item.V, item.ranks)
            self._watch.check(item.batch.members, item.sigma, item.ranks)

    def _record(self, members: list[int], ranks: list[int]) -> None:
        """Log each kept rank that differs from the adapter's last kept one in its rank history."""
        for i, r1 in zip(members, ranks):
            a = self.adapters[i]
            history = a.layer.rank_history.setdefault(a.adapter, [])
            kept = history[-1][1] if history else self._base_ranks.get(i, a.rank)
            if r1 != kept:
                history.append((self.num_steps + self._history_offset, r1))

    def _publish(self) -> None:
        """After a rewrite: every process holds process 0's adapters (FSDP2: each writes its shard back), and the
        layers know they are current."""
        if self.sync_processes and is_distributed():
            try:
                ranks = broadcast_ints(self.adapters.ranks(), self.adapters[0].U.device)
                self.adapters.zero_beyond(ranks)
                broadcast_tensors(self.adapters.active_blocks() + self.rule.shared_tensors())
            except RuntimeError as exc:  # a peer stopped responding or died: say so instead of a bare gloo error
                raise RuntimeError(peer_failure_message(exc)) from exc
        self.adapters.release()

    def is_augmented(self) -> bool:
        """True between an augmentation and its truncation: the adapters hold new directions."""
        return self._open_cycle

    @torch.no_grad()
    def finish(self) -> None:
        """Close an open cycle now: truncate, so the adapters hold their kept ranks; a no-op otherwise.

        Call it after the last step, and before evaluating or saving in the middle of training (the Trainer
        callback does both). Training may continue afterwards: the next step starts a new cycle.
        """
        if not self.is_augmented():
            return
        if self._sharded:
            self.adapters.gather()
        self._truncate(self.rule.batches())
        self._publish()
        self.schedule.restart()
        self._announce_next_step()

    # ------------------------------------------------------------------ reporting
    def runaway_layers(self) -> list[str]:
        """The layers whose adapter the runaway watch reported (:mod:`peft_geolora.runaway`), in module order."""
        return [a.name for i, a in enumerate(self.adapters) if i in self._watch.reported]

    def ranks(self, kept: bool = False) -> dict[str, int]:
        """Active rank of every adapted layer, by module name.

        ``kept=True``: during an open cycle, the ranks kept before its augmentation (what training keeps so far)
        instead of the transient augmented ones; outside a cycle both are the same.
        """
        if kept and self._open_cycle:
            return {a.name: self._base_ranks.get(i, a.rank) for i, a in enumerate(self.adapters)}
        return {a.name: a.rank for a in self.adapters}

    def rank_history(self) -> dict[str, list[tuple[int, int]]]:
        """Per layer, the (optimizer step, kept rank) pairs at which a truncation changed its rank."""
        return {a.name: list(a.layer.rank_history.get(a.adapter, [])) for a in self.adapters}

    def total_rank(self, kept: bool = False) -> int:
        """Σ r over the adapted layers (``kept``: as in :meth:`ranks`)."""
        return sum(self.ranks(kept).values())

    def num_adapter_parameters(self, kept: bool = False) -> int:
        """Trainable adapter parameters at the active ranks: Σ r (m + n + r) (``kept``: as in :meth:`ranks`)."""
        ranks = self.ranks(kept)
        return sum(r * (sum(a.dims) + r) for a, r in zip(self.adapters, ranks.values()))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the adapter weights and the optimizer's own state: plain values, and under
        ``"rule"`` the step rule's count and tensors (CPU copies)."""
        return {
            "num_steps": self.num_steps,
            "num_truncations": self._num_truncations,
            "base_ranks": [self._base_ranks.get(i, a.rank) for i, a in enumerate(self.adapters)],
            "open_cycle": self._open_cycle,
            "cycle_origin": self.schedule.origin,
            "history_offset": self._history_offset,
            "rank_history": {k: [list(e) for e in v] for k, v in self.rank_history().items()},
            "step_rule": self.config.step_rule,
            "rule": self.rule.state_dict(),
        }

    def resume_at_step(self, step: int) -> None:
        """Continue a run at optimizer step ``step`` when no allocator state was saved (derives the truncation count).

        With the coefficient rule the moments then restart from zero, so the run continues, but not exactly.
        """
        self.num_steps = step
        self._num_truncations = step // (self.schedule.cycle_length + 1)
        self.rule.resume_at_step(step)
        self._announce_next_step()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_rule = state.get("step_rule", "optimizer")
        if saved_rule != self.config.step_rule:
            raise ValueError(
                f"The allocator state was saved with `step_rule={saved_rule!r}` but this allocator uses "
                f"`step_rule={self.config.step_rule!r}`; resume with the same rule (RankAllocator(..., "
                f"step_rule={saved_rule!r}))."
            )
        self.num_steps = int(state["num_steps"])
        self._num_truncations = int(state.get("num_truncations", 0))
        self._base_ranks = dict(enumerate(state.get("base_ranks", [])))
        self._open_cycle = bool(state.get("open_cycle", False))
        self.schedule.origin = int(state.get("cycle_origin", 0))
        self._history_offset = int(state.get("history_offset", 0))
        history = state.get("rank_history", {})
        for a in self.adapters:
            a.layer.rank_history[a.adapter] = [tuple(e) for e in history.get(a.name, [])]
        self.rule.load_state_dict(state.get("rule", state.get("coefficient")))  # "coefficient": saved by 0.1.x
        self._announce_next_step()

    def remove(self) -> None:
        """Detach from the optimizer and the layers (they go back to plain gradients)."""
        self._hook.remove()
        for a in self.adapters:
            a.layer.integrated[a.adapter] = False
            a.layer.basis_gradients[a.adapter] = True
