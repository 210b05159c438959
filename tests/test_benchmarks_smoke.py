"""CI runs the benchmarks' short smoke versions only (the full runs' results are committed in benchmarks/results)."""

from __future__ import annotations

import json
import sys

import pytest

from .processes import ROOT


sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_training_study_smoke(tmp_path) -> None:
    import run as bench

    bench.main(["--study", "schedule", "--smoke", "--results_dir", str(tmp_path)])
    data = json.loads((tmp_path / "schedule.json").read_text())
    assert data["smoke"] and len(data["runs"]) == 4
    assert {r["schedule"] for r in data["runs"]} == {"step", "cycle"}
    assert all(r["max_rss_mb"] > 0 and r["adapter_params_end"] > 0 for r in data["runs"])
    assert (tmp_path / "schedule.png").is_file()


@pytest.mark.slow
def test_step_cost_and_allocation_overhead_smoke() -> None:
    import alloc_overhead
    import step_cost

    cost = step_cost.main(["--smoke"])
    assert set(cost["ratios"]) >= {"geolora_pinned_r8_step / lora_r8", "geolora_adaptive / adalora"}
    assert all(v > 0 for v in cost["median_step_s"].values())
    overhead = alloc_overhead.main(["--smoke", "--device", "cpu"])
    assert [r["adapters"] for r in overhead["runs"]] == [12, 12]  # 6 per layer, 2 layers
    assert all(0 < r["alloc_fraction_of_step"] < 1 for r in overhead["runs"])


def test_total_rank_trajectory_follows_the_rank_history() -> None:
    import run as bench

    results = {
        "initial_ranks": {"a": 4, "b": 4, "c": 4},
        "rank_history": {"a": [[4, 2], [8, 3]], "b": [[4, 6]], "c": []},
    }
    assert bench.total_rank_by_step(results) == [[0, 12], [4, 12], [8, 13]]
    assert bench.total_rank_by_step({"rank_history": None}) is None


@pytest.mark.slow
def test_initial_rank_study_smoke_records_trajectories(tmp_path) -> None:
    import run as bench

    bench.main(["--study", "init_rank_long", "--smoke", "--results_dir", str(tmp_path)])
    data = json.loads((tmp_path / "init_rank_long.json").read_text())
    assert [r["r0"] for r in data["runs"]] == [1, 8, 32]
    for r in data["runs"]:
        trajectory = r["total_rank_by_step"]
        assert trajectory[0] == [0, 36 * r["r0"]]  # 36 adapted layers at the initial rank
        assert trajectory[-1][1] == sum(r["ranks"].values())
    assert data["params_max_over_min"] >= 1 and (tmp_path / "init_rank_long.png").is_file()
