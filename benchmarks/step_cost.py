"""Step cost and training memory, side by side in one process: LoRA r=8, AdaLoRA, AdaMSS and GeoLoRA (rank pinned at
8, the defaults, and the defaults at smaller storage: the lean issue's trade-off).

    python benchmarks/step_cost.py [--steps 40] [--smoke]

Every method trains MiniLM-L6 (adapters on every encoder Linear layer, as a user gets them) on the same real batches
(16 Rotten-Tomatoes snippets, dynamic padding); the methods take turns step by step, so drift on a shared machine
hits them alike. One step is forward, backward, ``optimizer.step()`` and the method's rank allocation (GeoLoRA's
``allocator.step()``, AdaLoRA's and AdaMSS's ``update_and_allocate``). Reports the mean step time of each (the cost
of a whole run, periodic rank updates included), the median, the ratios of the means, and process CPU time / wall
time beside each (below 1.8 on 2 threads the machine was contended), and the training memory each method holds at
its peak (right after the backward pass), by part: trainable weights, their gradients, the optimizer state and
GeoLoRA's allocator state (its copies of the factors from before each optimizer step and the cycle's start),
counted tensor by tensor. Each step is also timed by its parts (forward + backward, optimizer step, allocation), and
``floors`` gives what no allocator can beat: the ratios with the allocation (and the optimizer step) counted as
free, and the memory of the weights and gradients alone. ``rss_growth_mb``: each method trained alone for the same
steps in a fresh process (``--rss NAME``), how much the process's resident memory grew from the built model to the
end (the loading's own peak would hide the methods' differences). Writes ``benchmarks/results/step_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import AdaLoraConfig, AdamssConfig, LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "glue"))
from data import load_offline  # noqa: E402
from run_glue import OFFLINE_MODEL, resolve_model_path  # noqa: E402

from peft_geolora import GeoLoraConfig, RankAllocator  # noqa: E402


TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


# GeoLoRA's configurations by name: the settings beside the targets. "pinned" runs hold the rank at 8; "adaptive" ones
# are the defaults (r 8, max_rank 8: storage max_rank = 8 columns), smaller storage (max_rank 7, 6, 4 with r = max_rank),
# and cycle_length=0 (augment and truncate within one step).
PINNED = {"r": 8, "min_rank": 8, "max_rank": 8}
GEOLORA = {
    "geolora_pinned_r8_cycle": PINNED,
    "geolora_pinned_r8_step": {**PINNED, "cycle_length": 0},
    "geolora_adaptive": {},  # the defaults
    **{f"geolora_max{k}_adaptive": {"r": k, "max_rank": k} for k in (7, 6, 4)},
    "geolora_cycle0_adaptive": {"cycle_length": 0},
}
# AdaMSS as the suite runs it (configs/glue/*.yaml: the settings of its documentation's example)
ADAMSS = {
    "r": 100,
    "num_subspaces": 10,
    "subspace_rank": 3,
    "use_asa": True,
    "asa_target_subspaces": 50,
    "mask_interval": 20,
}
NAMES = ["lora_r8", *GEOLORA, "adalora", "adamss"]
# the parts of a timed step: forward and backward, optimizer.step() (GeoLoRA's pre-step hook included), and the rank
# allocation with zero_grad (GeoLoRA's allocator.step(), AdaLoRA's update_and_allocate)
PHASES = ("forward_backward", "optimizer_step", "allocation")


def build(name: str, path: str, total_steps: int):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    common = {"task_type": "SEQ_CLS", "target_modules": TARGETS}
    if name == "lora_r8":
        config = LoraConfig(r=8, lora_alpha=16, **common)
    elif name == "adamss":
        config = AdamssConfig(
            **ADAMSS, init_warmup=min(2, total_steps // 4), final_warmup=max(3, total_steps // 2), **common
        )
    elif name == "adalora":
        config = AdaLoraConfig(
            init_r=12,
            target_r=8,
            lora_alpha=16,
            total_step=total_steps,
            tinit=min(2, total_steps // 4),
            tfinal=min(2, total_steps // 4),
            **common,
        )
    else:
        config = GeoLoraConfig(**GEOLORA[name], **common)
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    allocator = None
    if name.startswith("geolora"):
        allocator = RankAllocator(model, optimizer)
        allocate = allocator.step
    elif name in ("adalora", "adamss"):
        allocate = lambda step: model.base_model.update_and_allocate(step)  # noqa: E731
    else:
        allocate = None
    return model, optimizer, allocate, allocator


def floors(
    pairs: list[tuple[str, str]], mean: dict[str, float], phase_ms: dict, memory: dict
) -> dict[str, dict[str, float]]:
    """What no allocator can beat, per compared pair (GeoLoRA variant / reference), from the measured parts.

    * ``without_allocation``: the variant's forward + backward and optimizer step over the reference's whole
      step, the ratio it would reach if its allocation cost nothing;
    * ``forward_backward_only``: its forward + backward alone over the reference's whole step, the ratio with a
      free optimizer step as well;
    * ``memory_weights_and_grads``: its trainable weights and their gradients over the reference's whole training
      memory (weights, gradients, optimizer state), the memory ratio with no optimizer or allocator state at all.
    """
    out = {}
    for a, b in pairs:
        ms = phase_ms[a]
        reference_ms = 1e3 * mean[b]
        out[f"{a} / {b}"] = {
            "without_allocation": (ms["forward_backward"] + ms["optimizer_step"]) / reference_ms,
            "forward_backward_only": ms["forward_backward"] / reference_ms,
            "memory_weights_and_grads": (memory[a]["weights"] + memory[a]["grads"]) / memory[b]["total"],
        }
    return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def training_memory(model, optimizer, allocator) -> dict[str, int]:
    """Bytes held for training right after a backward pass (the peak): weights, gradients, optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values()]
    # the step rule's tensors: the cycle's start, and the default rule's copies of U, V, S from before each step
    extra = allocator.rule.held_tensors() if isinstance(allocator, RankAllocator) else []
    memory = {
        "weights": tensor_bytes(trainable),
        "grads": tensor_bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state": tensor_bytes(state),
        "allocator_state": tensor_bytes(extra),
    }
    memory["total"] = sum(memory.values())
    return memory


def real_batches(path: str, count: int) -> list:
    """``count`` batches of 16 Rotten-Tomatoes snippets, tokenized with dynamic padding, labels attached."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_offline("rt_polarity")["train"]
    batches = []
    for i in range(count):
        rows = train[i * 16 : (i + 1) * 16]
        batch = tokenizer(rows["text"], padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch["labels"] = torch.tensor(rows["label"])
        batches.append(batch)
    return batches


def _rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_growth_alone(name: str, count: int) -> float:
    """Build ``name`` and train it alone for ``count`` steps in this process: how much its resident memory grew from
    the built model to the end of training (gradients, optimizer and allocator state, the activations' high-water
    mark that the allocator keeps), in MiB."""
    path = resolve_model_path(OFFLINE_MODEL)
    batches = real_batches(path, count)
    model, optimizer, allocate, _ = build(name, path, count)
    before = _rss_mb()
    for step, batch in enumerate(batches):
        model(**batch).loss.backward()
        optimizer.step()
        if allocate is not None:
            allocate(step) if name in ("adalora", "adamss") else allocate()
        optimizer.zero_grad()
    return _rss_mb() - before


def rss_growth(names: list[str], count: int) -> dict[str, float]:
    """Each method's :func:`rss_growth_alone` in a fresh process of its own, one after the other."""
    out = {}
    for name in names:
        command = [sys.executable, __file__, "--rss", name, "--steps", str(count), "--warmup", "0"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])["rss_growth_mb"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rss", choices=NAMES, help="(internal) train this method alone, print its RSS growth")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cost.json"))
    args = parser.parse_args(argv)
    steps, warmup = (3, 1) if args.smoke else (args.steps, args.warmup)
    if args.rss:
        result = {"rss_growth_mb": rss_growth_alone(args.rss, steps + warmup)}
        print(json.dumps(result))
        return result
    path = resolve_model_path(OFFLINE_MODEL)
    batches = real_batches(path, steps + warmup)
    names = NAMES
    setups = {name: build(name, path, steps + warmup) for name in names}
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    phases = {name: {phase: [] for phase in PHASES} for name in names}
    memory = {name: {} for name in names}
    for step, batch in enumerate(batches):
        for name, (model, optimizer, allocate, allocator) in setups.items():  # the methods take turns
            c0, w0 = time.process_time(), time.perf_counter()
            model(**batch).loss.backward()
            c1, w1 = time.process_time(), time.perf_counter()
            if step >= warmup:  # not timed
                peak = training_memory(model, optimizer, allocator)
                memory[name] = max(memory[name], peak, key=lambda m: m.get("total", 0))
            c2, w2 = time.process_time(), time.perf_counter()
            optimizer.step()
            w3 = time.perf_counter()
            if allocate is not None:
                allocate(step) if name in ("adalora", "adamss") else allocate()
            optimizer.zero_grad()
            c4, w4 = time.process_time(), time.perf_counter()
            if step >= warmup:
                for phase, seconds in zip(PHASES, (w1 - w0, w3 - w2, w4 - w3)):
                    phases[name][phase].append(seconds)
                wall[name].append(w1 - w0 + w4 - w2)
                cpu[name].append(c1 - c0 + c4 - c2)
    median = {name: statistics.median(wall[name]) for name in names}
    # the mean is the cost per step of a whole run: it includes the periodic steps (GeoLoRA's truncations every
    # cycle_length + 1 steps, AdaLoRA's budget updates) that the median leaves out
    mean = {name: statistics.mean(wall[name]) for name in names}
    phase_ms = {name: {p: 1e3 * statistics.mean(phases[name][p]) for p in PHASES} for name in names}
    pairs = [(name, "lora_r8") for name in names if name.startswith("geolora") and "pinned" in name]
    pairs += [(name, "adalora") for name in names if name.startswith("geolora") and name.endswith("adaptive")]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "steps_timed": steps,
        "mean_step_s": mean,
        "median_step_s": median,
        "cpu_over_wall": {name: sum(cpu[name]) / sum(wall[name]) for name in names},
        "training_memory_bytes": memory,
        "memory_ratios": {
            f"{name} / lora_r8": memory[name]["total"] / memory["lora_r8"]["total"]
            for name in names
            if name != "lora_r8"
        },
        "ratios": {f"{a} / {b}": mean[a] / mean[b] for a, b in pairs},
        "ratios_of_medians": {f"{a} / {b}": median[a] / median[b] for a, b in pairs},
        "phase_ms": phase_ms,
        "floors": floors(pairs, mean, phase_ms, memory),
        # each alone, after the side-by-side run (smoke: two of them)
        "rss_growth_mb": rss_growth(["lora_r8", "geolora_adaptive"] if args.smoke else names, steps + warmup),
    }
    print(json.dumps(result, indent=2))
    if not args.smoke:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
