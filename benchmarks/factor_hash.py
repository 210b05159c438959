"""Fingerprint the factors that the allocator leaves after a short run, for each product configuration.

A refactoring of the step must leave every number where it was: run this before and after, on the same machine and
thread count, and compare the SHA-256 of the final factors (U, S, V of every layer: their active blocks, bytes as
stored; everything beyond the rank is zero and the storage width is a layout choice) and the rank
history. The configurations cover what users configure: the tau rule with its growth test, the relative step,
pinned ranks, global budgets in singular values and in parameters, the paper's per-step schedule, warm-up and
freeze, Adam, AdamW and SGD, a fixed scale, a non-finite step, and ``finish()`` mid-cycle.

    python benchmarks/factor_hash.py --out before.json
    python benchmarks/factor_hash.py --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model

import peft_geolora  # noqa: F401
from peft_geolora import GeoLoraConfig, RankAllocator


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.tiny_models import build, inputs


# name → (config overrides, optimizer, lr)
CONFIGURATIONS: dict[str, tuple[dict, str, float]] = {
    "default-adamw": ({}, "adamw", 2e-2),
    "default-adam": ({}, "adam", 5e-3),
    "default-sgd": ({}, "sgd", 5e-2),
    "alpha16-adamw": ({"scaling": 16.0}, "adamw", 2e-3),  # a fixed scale (lora_alpha=16 as 0.2.0 first read it)
    "pinned-r8": ({"r": 8, "min_rank": 8, "max_rank": 8}, "adamw", 2e-2),
    "coefficient-adamw": ({"step_rule": "coefficient"}, "adamw", 2e-2),
    "budget-rank": ({"budget": 30}, "adamw", 2e-2),
    "budget-params": ({"budget": 6000, "budget_unit": "params"}, "adamw", 2e-2),
    "schedule-step": ({"cycle_length": 0}, "adamw", 2e-2),
    "warmup-freeze": ({"warmup_steps": 4, "freeze_step": 12}, "adamw", 2e-2),
    "tau-only": ({"growth_tol": None, "tau": 0.3}, "adamw", 2e-2),
}
STEPS = 22  # 5½ cycles of 4: the run ends mid-cycle and finish() closes it


def _optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def fingerprint(overrides: dict, optimizer_kind: str, lr: float) -> dict:
    """Train the tiny BERT for STEPS steps (step 7's gradient poisoned with a NaN) and hash what is left."""
    model, targets = build("bert", seed=0)
    config = GeoLoraConfig(**{"task_type": "SEQ_CLS", "target_modules": targets, "r": 4, "max_rank": 8, **overrides})
    model = get_peft_model(model, config)
    optimizer = _optimizer(optimizer_kind, [p for p in model.parameters() if p.requires_grad], lr)
    allocator = RankAllocator(model, optimizer)
    model.train()
    for step in range(STEPS):
        loss = model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        if step == 7:
            next(p for n, p in model.named_parameters() if "geolora_S" in n).grad[0, 0] = float("nan")
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    allocator.finish()
    # the factors' active blocks (U[:, :r], S[:r, :r], V[:, :r]: everything beyond is zero, and the storage width is
    # a layout choice) and every other trainable tensor, as stored
    ranks = {name: m.rank["default"] for name, m in model.named_modules() if hasattr(m, "geolora_U")}
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            layer, _, factor = name.partition(".geolora_")
            if factor:
                r = ranks[layer]
                p = p[:r, :r] if factor.startswith("S.") else p[:, :r]
            digest.update(name.encode())
            digest.update(p.detach().contiguous().numpy().tobytes())
    return {"sha256": digest.hexdigest(), "ranks": allocator.ranks(), "rank_history": allocator.rank_history()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the fingerprints as JSON")
    parser.add_argument("--compare", help="compare with fingerprints written before; exit 1 on any difference")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: fingerprint(*spec) for name, spec in CONFIGURATIONS.items()}
    results = json.loads(json.dumps(results))  # tuples → lists, as read back
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [name for name in results if results[name] != before.get(name)]
        for name in results:
            print(f"{name:16s} {'same' if name not in differ else 'DIFFERENT'} {results[name]['sha256'][:16]}")
        sys.exit(1 if differ else 0)
    for name, r in results.items():
        print(f"{name:16s} {r['sha256'][:16]} total rank {sum(r['ranks'].values())}")


if __name__ == "__main__":
    main()
