"""The RankAllocator under FSDP2 (``fully_shard``), two processes (gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_geolora import GeoLoraConfig

from .processes import launch_two_processes, run_child


@pytest.mark.distributed
@pytest.mark.parametrize("step_rule", ["optimizer", "optimizer-cycle0", "coefficient"])
def test_fsdp2_sharded_training_agrees_resumes_and_saves_a_plain_adapter(step_rule: str, tmp_path: Path) -> None:
    """40 steps with gradient accumulation 2 and different data per process, the package defaults (or the per-step
    schedule, whose augmentation outgrows its storage, or the coefficient rule): the same ranks and adapters on both
    processes and as under DDP, exact resume, a plain adapter."""
    launch_two_processes("-m", "tests.fsdp_child", str(tmp_path), step_rule)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["rank_changes"] > 0, "ranks never changed"
    assert result["factors_identical_across_processes"] and result["ranks_identical_across_processes"]
    assert result["resume_ranks_equal"] and result["resume_max_diff"] <= 1e-6
    # DDP on the same data: the same ranks, the same adapters U S Vᵀ up to float rounding (measured 3.6e-6 on
    # entries up to 0.28); the factors themselves may differ by the sign or rotation of a singular pair
    assert result["ddp_ranks_equal"]
    assert result["ddp_delta_max_diff"] <= 1e-4 * max(1.0, result["delta_max_abs"])
    reloaded = run_child("tests.fsdp_reload_child", str(tmp_path))
    assert reloaded["max_logit_diff"] <= 1e-5, reloaded
    assert reloaded["ranks"] == {k.removeprefix("base_model.model."): v for k, v in result["ranks"].items()}


@pytest.mark.distributed
def test_fsdp2_example_script_saves_an_adapter_that_loads_unsharded(tmp_path: Path) -> None:
    launch_two_processes("scripts/fsdp2/finetune_fsdp2.py", "--output_dir", str(tmp_path), "--max_steps", "4")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["world_size"] == 2
    config = GeoLoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert sum(config.rank_pattern.values()) == sum(summary["ranks"].values())


@pytest.mark.distributed
def test_fsdp2_gather_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/fsdp_gather.py on 2 steps and one block (the committed run, 12 blocks: results/fsdp_gather_cpu.json):
    both rules under DDP and FSDP2, the default step under DeepSpeed ZeRO-2 and ZeRO-3, at DeBERTaV3-base widths, with
    the bytes the default step gathers."""
    out = tmp_path / "gather.json"
    launch_two_processes("benchmarks/fsdp_gather.py", "--steps", "2", "--blocks", "1", "--out", str(out))
    result = json.loads(out.read_text())
    kinds = {f"{r}/{k}" for r in ("optimizer", "coefficient") for k in ("ddp", "fsdp2")}
    assert set(result["runs"]) == kinds | {"optimizer/zero2", "optimizer/zero3"}
    assert result["runs"]["optimizer/fsdp2"]["moment_bytes_per_augmentation_or_truncation"] > 0
    assert all(row["adapters"] == 6 for row in result["runs"].values())
