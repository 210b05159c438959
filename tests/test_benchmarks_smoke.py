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
    # the parts add up to the timed step, and each floor leaves out more than the one before
    for name, parts in cost["phase_ms"].items():
        assert set(parts) == set(step_cost.PHASES) and all(ms > 0 for ms in parts.values())
        assert sum(parts.values()) == pytest.approx(1e3 * cost["mean_step_s"][name], rel=1e-6)
    memory = cost["training_memory_bytes"]
    for pair, floor in cost["floors"].items():
        name, reference = pair.split(" / ")
        assert 0 < floor["forward_backward_only"] < floor["without_allocation"] < cost["ratios"][pair]
        assert floor["memory_weights_and_grads"] * memory[reference]["total"] < memory[name]["total"]
    overhead = alloc_overhead.main(["--smoke", "--device", "cpu"])
    assert [r["adapters"] for r in overhead["runs"]] == [12, 12]  # 6 per layer, 2 layers
    assert all(0 < r["alloc_fraction_of_step"] < 1 for r in overhead["runs"])


def test_adapter_pass_smoke() -> None:
    import adapter_pass

    result = adapter_pass.main(["--smoke"])
    assert [(row["in"], row["out"]) for row in result["shapes"]] == list(adapter_pass.SHAPES)
    assert all(
        row["geolora / lora"] > 0 and set(row["median_s"]) == {"lora_r8", "geolora_r8"} for row in result["shapes"]
    )


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
        assert trajectory[0] == [0, 6 * r["r0"]]  # the smoke model's 6 adapted layers at the initial rank
        assert trajectory[-1][1] == sum(r["ranks"].values())
    assert data["params_max_over_min"] >= 1 and (tmp_path / "init_rank_long.png").is_file()


@pytest.mark.slow
def test_suite_smoke_runs_every_task_and_method(tmp_path) -> None:
    """A one-layer MiniLM, two steps per run: every method on one task and GeoLoRA on every offline task, the JSONs
    and the report."""
    import suite

    suite.main(["--smoke", "--results_dir", str(tmp_path)])
    records = [json.loads(p.read_text()) for p in (tmp_path / "test").glob("*.json")]
    assert {(r["task"], r["method"]) for r in records} == {(t, m) for m, t in suite.SMOKE_RUNS}
    assert {r["task"] for r in records} == set(suite.OFFLINE_TASKS) and {r["method"] for r in records} == set(
        suite.METHODS
    )
    for r in records:
        assert set(r["metrics"]) == {"validation", "test"} and r["smoke"]
        assert r["adapter_params_end"] > 0 and r["wall_s"] > 0 and r["cpu_s"] > 0 and r["command"]
    report = (tmp_path / "suite.md").read_text()
    assert all(f"| {m} |" in report for m in suite.METHODS) and (tmp_path / "suite.png").is_file()
    suite.main(["--smoke", "--results_dir", str(tmp_path)])  # resumable: every run exists, nothing is redone
    assert len(list((tmp_path / "test").glob("*.json"))) == len(records)


def _record(task: str, method: str, lr: float, score: float, seed: int = 0, split: str = "validation") -> dict:
    return {"task": task, "method": method, "lr": lr, "seed": seed, "primary": {split: score}, "adapter_params_end": 1}


def test_suite_chooses_each_lr_from_complete_grids_and_calls_ties(tmp_path) -> None:
    import suite

    for method in suite.METHODS:
        for i, lr in enumerate(suite.LR_GRID[method]):
            for task in suite.LR_TASKS:
                run = suite.lr_run(task, method, lr)
                run.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
                score = 0.5 + 0.1 * (i == 1) + 0.05 * (task == "trec6")
                run.path(tmp_path).write_text(json.dumps({"metrics": {"validation": {"accuracy": score}}}))
    chosen = suite.chosen_lrs(tmp_path)
    assert chosen == {m: suite.LR_GRID[m][1] for m in suite.METHODS}
    suite.lr_run("trec6", "lora", suite.LR_GRID["lora"][0]).path(tmp_path).unlink()
    assert "lora" not in suite.chosen_lrs(tmp_path)  # an incomplete grid chooses nothing

    records = [_record("trec6", "geolora", 1e-3, s, seed, "test") for seed, s in enumerate((0.80, 0.82, 0.81))]
    records += [_record("trec6", "lora", 1e-3, s, seed, "test") for seed, s in enumerate((0.805, 0.815, 0.80))]
    records += [_record("sms_spam", "geolora", 1e-3, s, seed, "test") for seed, s in enumerate((0.90, 0.91, 0.90))]
    records += [_record("sms_spam", "lora", 1e-3, s, seed, "test") for seed, s in enumerate((0.80, 0.81, 0.80))]
    verdicts = suite.verdicts(suite.test_table(records))
    assert verdicts == {"lora": {"trec6": "tie", "sms_spam": "win"}}


def test_a_screened_model_chooses_among_the_screen_tasks_best_lrs_and_reuses_seed_0(tmp_path, monkeypatch) -> None:
    """On a model with a screen task the whole grid runs there, the other LR_TASKS run its SCREEN_KEEP best lrs, the
    choice is the best mean among those (a better score at another lr does not count); a seed-0 test run at the chosen
    lr is its lr run's record, not a second training."""
    import suite

    monkeypatch.setitem(suite.MODELS, "wide", {"results": tmp_path, "screen": "trec6", "every_test_variant": False})
    grid = suite.LR_GRID["lora"]

    def write(task: str, lr: float, score: float) -> None:
        run = suite.lr_run(task, "lora", lr)
        run.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        run.path(tmp_path).write_text(json.dumps({"metrics": {"validation": {"accuracy": score}}, "seed": 0}))

    for lr, score in zip(grid[:-1], (0.60, 0.90, 0.80, 0.85)):
        write("trec6", lr, score)
    assert suite.lr_candidates(tmp_path, "lora") is None  # the screen is not complete yet
    planned = [r for r in suite.planned_runs("lr", tmp_path) if r.method == "lora"]
    assert {(r.task, r.lr) for r in planned} == {("trec6", lr) for lr in grid}
    write("trec6", grid[-1], 0.10)
    assert suite.lr_candidates(tmp_path, "lora") == (grid[1], grid[3])
    planned = [r for r in suite.planned_runs("lr", tmp_path) if r.method == "lora" and r.task == "rt_polarity"]
    assert [r.lr for r in planned] == [grid[1], grid[3]]
    write("rt_polarity", grid[0], 0.99)  # not a candidate: ignored
    write("rt_polarity", grid[1], 0.70)
    assert "lora" not in suite.chosen_lrs(tmp_path)
    write("rt_polarity", grid[3], 0.80)
    assert suite.chosen_lrs(tmp_path)["lora"] == grid[3]  # 0.825 against 0.80

    test_run = suite.Run("test", "rt_polarity", "lora", grid[3], 0)
    record = suite.reuse_lr_twin(test_run, tmp_path)
    assert record["reused_from"] == suite.lr_run("rt_polarity", "lora", grid[3]).path(tmp_path).name
    assert json.loads(test_run.path(tmp_path).read_text())["metrics"] == {"validation": {"accuracy": 0.80}}
    assert suite.reuse_lr_twin(suite.Run("test", "rt_polarity", "lora", grid[3], 1), tmp_path) is None
    assert suite.reuse_lr_twin(suite.Run("test", "rt_polarity", "lora", grid[2], 0), tmp_path) is None
    # a GeoLoRA variant's seed-0 test run is its ablation run (the width question's variant on MPNet)
    width = suite.RUNNABLE[suite.WIDTH_VARIANT]
    ablation = suite.Run("ablation", "trec6", "geolora", 5e-3, 0, suite.WIDTH_VARIANT, width)
    ablation.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    ablation.path(tmp_path).write_text(json.dumps({"metrics": {"validation": {"accuracy": 0.9}}, "seed": 0}))
    reused = suite.reuse_lr_twin(suite.Run("test", "trec6", "geolora", 5e-3, 0, suite.WIDTH_VARIANT, width), tmp_path)
    assert reused["reused_from"] == ablation.path(tmp_path).name
    other = suite.Run("test", "trec6", "geolora", 5e-3, 0, suite.DEFAULT_VARIANT, suite.GEOLORA_DEFAULTS)
    assert suite.reuse_lr_twin(other, tmp_path) is None


def test_frontier_points_average_complete_seeds_and_name_each_undominated_peer(tmp_path, monkeypatch) -> None:
    """The frontier: a point's score is the mean over FRONTIER_TASKS, then over the seeds with every task done (a seed
    missing a task is left out); the suite's test runs are the methods' suite-size points; a peer point is dominated
    by the smallest GeoLoRA point of at most its size + 5 % that scores at least as high on the seeds both have."""
    import suite

    def write(phase: str, method: str, variant: str, task: str, seed: int, score: float, params: int) -> None:
        run = suite.Run(phase, task, method, 1e-3, seed, variant)
        run.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        record = {**_record(task, method, 1e-3, score, seed, "test"), "variant": variant, "adapter_params_end": params}
        run.path(tmp_path).write_text(json.dumps(record))

    monkeypatch.setattr(suite, "FRONTIER_TASKS", ("rt_polarity", "trec6"))  # two tasks keep the means readable
    first, second = suite.FRONTIER_TASKS
    smaller = next(v for v in suite.LEAN_VARIANTS if v.endswith("_max4") and v != suite.DEFAULT_VARIANT)
    cycle0 = f"{suite.STEP_VARIANT}_c0_max8"
    for seed in (0, 1):
        write("frontier", "geolora", "budget41472", first, seed, 0.80 + 0.02 * seed, 41_000)
        write("frontier", "geolora", "budget41472", second, seed, 0.90, 41_000)
        write("test", "geolora", suite.DEFAULT_VARIANT, first, seed, 0.85, 130_000)
        write("test", "geolora", suite.DEFAULT_VARIANT, second, seed, 0.93, 130_000)
        write("test", "geolora", "optimizer", first, seed, 0.99, 1)  # another variant: not a frontier point
        write("test", "geolora", "optimizer", second, seed, 0.99, 1)
        for variant in (smaller, cycle0):  # the tau rule at a smaller storage is a point; at cycle 0 it is not
            write("test", "geolora", variant, first, seed, 0.70, 100_000)
            write("test", "geolora", variant, second, seed, 0.70, 100_000)
        write("frontier", "lora", "r1", first, seed, 0.79, 41_472)
        write("frontier", "lora", "r1", second, seed, 0.90, 41_472)
        write("test", "adamss", "", first, seed, 0.83, 43_000)
        write("test", "adamss", "", second, seed, 0.91, 43_000)
        write("test", "lora", "", first, seed, 0.80, 331_776)
        write("test", "lora", "", second, seed, 0.88, 331_776)
    write("frontier", "lora", "r1", first, 2, 0.10, 41_472)  # seed 2 lacks the second task: left out

    points = {p.name: p for p in suite.frontier_points(tmp_path)}
    assert set(points) == {
        "geolora budget41472",
        "geolora tau",
        "geolora tau_max4",
        "lora r1",
        "adamss asa50",
        "lora r8",
    }
    assert points["geolora budget41472"].by_seed == {0: pytest.approx(0.85), 1: pytest.approx(0.86)}
    assert set(points["lora r1"].by_seed) == {0, 1} and points["lora r1"].score == pytest.approx(0.845)
    verdicts = {
        peer.name: (winner and winner.name, best and best.name)
        for peer, winner, best in suite.dominance(list(points.values()))
    }
    assert verdicts == {
        "lora r1": ("geolora budget41472", "geolora budget41472"),
        "adamss asa50": (None, "geolora budget41472"),  # 0.855 < 0.87 at 43 k; the tau point is too large
        "lora r8": ("geolora budget41472", "geolora tau"),  # the smallest winner, and the best within its size
    }
    report = "\n".join(suite.frontier_markdown(tmp_path))
    assert (
        "adamss asa50 (0.8700, 43,000): **not dominated**" in report
        and "0.8550 against 0.8700 on seeds 0, 1" in report
    )
    assert suite.frontier_plot(tmp_path, tmp_path / "frontier.png").is_file()


def test_every_frontier_budget_covers_geolora_s_floor_and_meets_a_lora_size() -> None:
    """GeoLoRA keeps every layer at rank >= 1, so on the suite's 36 MiniLM layers it cannot be smaller than
    sum (m + n + 1) = 41,508 parameters: the allocator refuses a smaller budget at the start of a run (as it refused
    LoRA r = 1's 41,472). Each budget is within the 5 % tolerance of a LoRA point, so every LoRA size has a GeoLoRA
    point to be compared with."""
    import suite

    floor = suite.LORA_PARAMS_PER_RANK + 36
    lora_sizes = [int(v.removeprefix("r")) * suite.LORA_PARAMS_PER_RANK for v in suite.FRONTIER["lora"]]
    assert min(suite.GEOLORA_BUDGETS) >= floor
    for size in lora_sizes:
        assert any(size <= b <= (1 + suite.SIZE_TOLERANCE) * size for b in suite.GEOLORA_BUDGETS)


def test_a_frontier_size_takes_the_larger_step_only_once_both_are_measured_and_it_wins(tmp_path, monkeypatch) -> None:
    """size_setting: the suite's lr until the size's larger step is measured on validation (seed 0, LR_TASKS); then
    the better of the two. LoRA's larger step is the next grid rate; GeoLoRA's (whose adapter step does not follow
    lr) twice the adapter step at the same lr, a variant of its own. The frontier's seed 0 at a switched step is that
    frontier_lr run on LR_TASKS and a frontier run of its own on the other FRONTIER_TASKS, its later seeds run the
    switched setting, and its point uses them."""
    import suite

    grid = suite.LR_GRID["lora"]
    suite_lr = grid[1]
    others = tuple(t for t in suite.FRONTIER_TASKS if t not in suite.LR_TASKS)
    assert others  # the frontier covers more tasks than the rates were chosen on

    def write(phase: str, lr: float, score: float, tasks=suite.LR_TASKS, method="lora", variant="r1") -> None:
        for task in tasks:
            run = suite.Run(phase, task, method, lr, 0, variant)
            run.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
            record = {**_record(task, method, lr, score, 0, "test"), "variant": variant, "adapter_params_end": 41_472}
            record["primary"]["validation"] = score
            run.path(tmp_path).write_text(json.dumps(record))

    assert suite.larger_lr("lora", suite_lr) == grid[2] and suite.larger_lr("geolora", grid[-1]) is None
    write("frontier", suite_lr, 0.80)
    write("frontier_lr", grid[2], 0.85, suite.LR_TASKS[:1])
    # the larger rate is not measured on every task
    assert suite.size_setting("lora", "r1", suite_lr, tmp_path) == (suite_lr, "r1")
    write("frontier_lr", grid[2], 0.85)
    assert suite.size_setting("lora", "r1", suite_lr, tmp_path) == (grid[2], "r1")
    write("frontier", grid[2], 0.85, others)  # seed 0 at the chosen rate on the tasks the rate was not chosen on
    points = {p.name: p for p in suite.frontier_points(tmp_path)}
    assert points["lora r1"].lr == grid[2] and points["lora r1"].score == pytest.approx(0.85)
    write("frontier_lr", grid[2], 0.75)
    assert suite.size_setting("lora", "r1", suite_lr, tmp_path) == (suite_lr, "r1")

    # GeoLoRA: the same lr, lora_alpha 32 (twice the "auto" step at r = 8) as the size's own variant
    size, geo_lr = f"budget{suite.GEOLORA_BUDGETS[0]}", suite.LR_GRID["geolora"][-1]
    lr, name, extra = suite.larger_step("geolora", size, geo_lr)
    assert (lr, name, extra) == (geo_lr, f"{size}_step2", ("geolora.lora_alpha=32",))
    write("frontier", geo_lr, 0.80, method="geolora", variant=size)
    write("frontier_lr", geo_lr, 0.83, method="geolora", variant=name)
    assert suite.size_setting("geolora", size, geo_lr, tmp_path) == (geo_lr, name)
    monkeypatch.setattr(suite, "chosen_lrs", lambda results: {"geolora": geo_lr})
    candidates = [r for r in suite.frontier_lr_runs(tmp_path) if r.variant == name]
    assert len(candidates) == len(suite.LR_TASKS) and all(r.overrides[-1] == extra[0] for r in candidates)
    frontier = [r for r in suite.frontier_runs(tmp_path) if r.variant.startswith(size)]
    assert {(r.seed, r.task) for r in frontier} == {
        *((seed, task) for seed in (1, 2) for task in suite.FRONTIER_TASKS),
        *((0, task) for task in others),
    }
    assert {r.variant for r in frontier} == {name} and all(r.overrides == candidates[0].overrides for r in frontier)
    write("frontier", geo_lr, 0.83, others, method="geolora", variant=name)
    points = {p.name: p for p in suite.frontier_points(tmp_path)}
    assert points[f"geolora {name}"].score == pytest.approx(0.83) and f"geolora {size}" not in points


def test_habit_phase_runs_each_reading_of_a_lora_users_alpha_beside_lora(tmp_path) -> None:
    """The habit phase: GeoLoRA with lora_alpha read as a fixed scale, as LoRA's fixed alpha / r, and as the package
    reads it (alpha 16 with r = 8 is "auto": its lr-grid runs), at each alpha and LoRA lr on the lr tasks, and LoRA
    with alpha 32 (alpha 16 is the suite's LoRA); its table reads every record."""
    import suite

    runs = list(suite.planned_runs("habits", tmp_path))
    per_alpha = len(suite.HABIT_LRS) * len(suite.LR_TASKS)
    assert len(runs) == per_alpha * (2 + 4)  # alpha 16: scale, over_r; alpha 32: scale, over_r, lora, LoRA
    settings = {r.variant: r.overrides[-1] for r in runs if r.method == "geolora"}
    assert settings == {
        "alpha16_scale": "geolora.scaling=16",
        "alpha16_over_r": "geolora.scaling=2",
        "alpha32_scale": "geolora.scaling=32",
        "alpha32_over_r": "geolora.scaling=4",
        "alpha32_lora": "geolora.lora_alpha=32",
    }
    assert all(o != "geolora.lora_alpha=auto" for r in runs for o in r.overrides)
    for r in runs:
        record = {**_record(r.task, r.method, r.lr, 0.7), "variant": r.variant}
        record["primary"]["test"] = 0.7
        r.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        r.path(tmp_path).write_text(json.dumps(record))
    table = "\n".join(suite.habits_table(tmp_path))
    assert table.count("| 32 | lora |") == 1 and table.count("geolora (over_r)") == 2
    assert table.count("0.700 (0.700)") == len(runs)


def test_numbers_in_lora_alpha_of_recorded_variants_run_as_the_scale_they_were() -> None:
    import suite

    assert "geolora.scaling=1" in suite.RUNNABLE["coefficient"]
    assert suite.runnable(["geolora.lora_alpha=auto"]) == ("geolora.lora_alpha=auto",)


def _ablation_grid(tmp_path, variant: str, best: int) -> None:
    """A variant's ablation runs over GeoLoRA's lr grid, the best at index ``best``."""
    import suite

    for i, lr in enumerate(suite.LR_GRID["geolora"]):
        for task in suite.LR_TASKS:
            run = suite.Run("ablation", task, "geolora", lr, 0, variant)
            run.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
            record = {"task": task, "metrics": {"validation": {"accuracy": 0.5 + 0.1 * (i == best)}}}
            run.path(tmp_path).write_text(json.dumps(record))


def test_suite_measures_each_initial_rank_and_test_variant_at_its_own_best_lr(tmp_path) -> None:
    """Each variant runs at its own best lr once its ablation grid is complete (GeoLoRA's chosen lr before); variants
    that need a setting 0.2.0 removed are not planned (their records stay)."""
    import suite

    variant, grid = "optimizer_mean_growth0.1_tau0.4_auto_rel1", suite.LR_GRID["geolora"]  # the previous default
    _ablation_grid(tmp_path, variant, best=2)
    for i, lr in enumerate(grid):  # GeoLoRA's own grid: the chosen lr is the second
        for task in suite.LR_TASKS:
            run = suite.lr_run(task, "geolora", lr)
            run.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
            run.path(tmp_path).write_text(json.dumps({"metrics": {"validation": {"accuracy": 0.5 + 0.1 * (i == 1)}}}))
    assert suite.variant_lr(variant, tmp_path) == grid[2]
    lrs = {run.variant.rsplit("_r", 1)[0]: run.lr for run in suite.planned_runs("init_rank", tmp_path)}
    assert lrs[variant] == grid[2] and lrs[suite.STEP_VARIANT] == grid[1]
    assert lrs["coefficient"] == grid[1]  # no complete grid of its own: GeoLoRA's chosen lr
    assert set(lrs) == {suite.STEP_VARIANT, variant, "coefficient"}  # the others need removed settings
    seeds = {(run.variant.rsplit("_r", 1)[0], run.seed) for run in suite.planned_runs("init_rank", tmp_path)}
    assert {seed for v, seed in seeds if v == suite.STEP_VARIANT} == set(suite.SEEDS)  # one run's size is noisy
    assert {seed for v, seed in seeds if v == variant} == {0}
    assert {run.seed for run in suite.planned_runs("init_rank", tmp_path, seeds=(2,))} == {2}
    test_lrs = {(run.variant, run.lr) for run in suite.planned_runs("test", tmp_path) if run.method == "geolora"}
    assert test_lrs == {(suite.DEFAULT_VARIANT, grid[1]), (suite.STEP_VARIANT, grid[1]), (variant, grid[2])}
    suite.Run("ablation", "trec6", "geolora", grid[0], 0, variant).path(tmp_path).unlink()
    assert suite.variant_lr(variant, tmp_path) is None


def test_retired_variants_are_recognised_and_the_default_runs_as_the_package_defaults() -> None:
    import suite

    assert suite.runnable(["geolora.moment_init=zero"]) is None and suite.runnable(["geolora.step_rule=split"]) is None
    assert suite.runnable(["geolora.moment_init=mean", "geolora.tau=0.5"]) == ("geolora.tau=0.5",)
    assert suite.DEFAULT_VARIANT == "optimizer_mean_growth0.1_tau0.5_auto_rel1_max8"
    assert suite.STEP_VARIANT == "optimizer_mean_growth0.1_tau0.5_auto_rel1"
    # the default is the step the learning-rate grid measured, stored at max_rank 8
    assert set(suite.GEOLORA_DEFAULTS) - set(suite.STEP_DEFAULTS) == {"geolora.max_rank=8", "geolora.r=8"}
    assert all("relative_step_above" not in o and "moment_init" not in o for o in suite.GEOLORA_DEFAULTS)


def test_suite_runs_are_claimed_once_and_dead_owners_released(tmp_path) -> None:
    import os

    import suite

    run = suite.Run("lr", "trec6", "lora", 5e-4)
    assert suite.claim(run, tmp_path)
    assert not suite.claim(run, tmp_path)  # held by a live process (this one)
    lock = run.path(tmp_path).with_suffix(".lock")
    lock.write_text("999999999")  # an owner that no longer exists
    assert suite.claim(run, tmp_path) and lock.read_text() == str(os.getpid())
    lock.unlink()
    run.path(tmp_path).write_text("{}")
    assert not suite.claim(run, tmp_path) and not lock.exists()  # already done


@pytest.mark.slow
def test_rank_trajectory_smoke_runs_each_initial_rank(tmp_path) -> None:
    import rank_trajectory
    import suite

    if suite.chosen_lrs(suite.RESULTS).get("geolora") is None:
        pytest.skip("the committed suite results choose no GeoLoRA lr")
    data = rank_trajectory.main(["--smoke", "--r0", "1", "4", "--out_dir", str(tmp_path)])
    assert list(data["runs"]) == ["1", "4"]
    for r0, run in data["runs"].items():
        assert run["total_rank_by_step"][0][1] == 6 * int(r0)  # one encoder layer: six adapted Linear layers
        assert all(a[0] < b[0] for a, b in zip(run["total_rank_by_step"], run["total_rank_by_step"][1:]))
    assert not list(tmp_path.iterdir())  # a smoke run writes nothing


@pytest.mark.slow
def test_rank_trajectory_runs_an_ablation_variant_with_its_settings(tmp_path) -> None:
    import rank_trajectory
    import suite

    if suite.chosen_lrs(suite.RESULTS).get("geolora") is None:
        pytest.skip("the committed suite results choose no GeoLoRA lr")
    variant = "optimizer_mean_growth0.1_tau0.4_auto_rel1"
    data = rank_trajectory.main(["--smoke", "--variant", variant, "--r0", "2", "--out_dir", str(tmp_path)])
    assert data["variant"] == variant and tuple(data["settings"]) == suite.RUNNABLE[variant]
    assert "geolora.tau=0.4" in data["runs"]["2"]["command"]
    suite_lr = suite.chosen_lrs(suite.RESULTS)["geolora"]
    assert data["lr"] == suite.variant_lrs([variant], suite_lr, suite.RESULTS)[variant]


def test_soak_smoke_stays_finite_orthonormal_and_flat() -> None:
    """The soak benchmark's checks on a short run, in fp32 and under bf16 autocast (the full run: soak.json)."""
    import soak

    data = soak.main(["--steps", "200", "--smoke", "--methods", "geolora"])
    assert [run["precision"] for run in data["runs"]] == ["fp32", "bf16"]
    for run in data["runs"]:
        summary = run["summary"]
        assert summary["all_finite"] and summary["max_orthonormality_error"] < 1e-5
        assert [row["step"] for row in run["trajectory"]] == [100, 200]
        assert all(row["total_rank_kept"] > 0 and row["rss_mb"] > 0 for row in run["trajectory"])


def test_relative_step_bound_smoke_runs_every_gain_on_every_instrument() -> None:
    """The relative-step study's instruments on one case each (the full run: relative_step_bound.json); the product's
    own step is restored afterwards."""
    import relative_step_bound
    from peft_geolora import integrator

    original = integrator.relative_step
    data = relative_step_bound.main(["--smoke"])
    assert integrator.relative_step is original
    assert [row["gain"] for row in data["rows"]] == list(relative_step_bound.GAINS)
    for row in data["rows"]:
        assert row["rank_recovery"]["cases"] == 1 and row["soak_fp32"]["all_finite"]
        assert all(row[k] > 0 for k in ("divergence_alpha16_lr2e-2", "divergence_alpha16_lr2e-3", "defaults_lr2e-2"))


def test_gpu_cost_runs_every_method_on_a_tiny_shape() -> None:
    """benchmarks/gpu_cost.py on CPU with a tiny Llama: the code a GPU run uses, every method, the ratios to LoRA."""
    import gpu_cost

    data = gpu_cost.main(["--shape", "tiny", "--smoke", "--steps", "3", "--length", "16", "--batch", "2"])
    assert set(data["runs"]) == set(gpu_cost.METHODS) and data["step_over_lora"]["lora_r8"] == 1.0
    assert data["runs"]["geolora"]["adapter_params_kept"] > 0
    assert all(row["median_step_s"] > 0 and row["weight_bytes"] > 0 for row in data["runs"].values())


def test_training_memory_by_part_is_what_the_design_says() -> None:
    """step_cost.py's memory by part against the design, from the shapes alone. Per adapter of an (m × n) layer with
    storage C = min(m, n, max_rank), fp32: weights U (m × C), S (C × C), V (n × C); gradients of all three (the
    bases' at every step under the default rule); AdamW's two moments of each (and one step counter per tensor); the
    allocator's copy of S from before each optimizer step and the cycle's start Ŝ (C × C each; under torch's AdamW the
    bases before a step are recovered from the optimizer's state, not copied). LoRA r=8 holds (m + n) r weights, their
    gradients and two moments. At C = 8 (LoRA's r) GeoLoRA is above LoRA only by S, its moments and the two copies."""
    import torch
    from peft import LoraConfig, get_peft_model

    import step_cost
    from peft_geolora import GeoLoraConfig, RankAllocator

    from .tiny_models import build, inputs

    def memory(config) -> tuple[dict[str, int], list[tuple[int, int, int]], int, int]:
        model, _ = build("bert", seed=0)
        model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        allocator = RankAllocator(model, optimizer) if isinstance(config, GeoLoraConfig) else None
        for step in range(2):
            model(**inputs(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
            if step == 1:
                measured = step_cost.training_memory(model, optimizer, allocator)
            optimizer.step()
            if allocator is not None:
                allocator.step()
            optimizer.zero_grad(set_to_none=False)
        layers = [m for m in model.modules() if hasattr(m, "geolora_U") or hasattr(m, "lora_A")]
        shapes = [(m.out_features, m.in_features, getattr(m, "capacity", {}).get("default", 0)) for m in layers]
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
        return measured, shapes, head, len(trainable)

    targets = ["query", "key", "value", "dense"]
    # max_rank columns, with cycles and with cycle_length=0 (whose augmented adapter lives only inside the allocator's
    # step); under torch's AdamW the allocator recovers the bases before a step from the optimizer's state, so it
    # holds only S before the step and the cycle's start, C x C each
    for options in ({"max_rank": 8}, {"max_rank": 8, "cycle_length": 0}):
        config = GeoLoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, **options)
        geo, shapes, head, geo_tensors = memory(config)
        assert all(C == min(m, n, 8) for m, n, C in shapes)
        weights = sum((m + n) * C + C * C for m, n, C in shapes) + head
        assert geo["weights"] == 4 * weights and geo["grads"] == 4 * weights
        assert geo["optimizer_state"] == 4 * (2 * weights + geo_tensors)  # two moments, one step counter per tensor
        assert geo["allocator_state"] == 4 * sum(2 * C * C for m, n, C in shapes)

    lora, lora_shapes, head, tensors = memory(
        LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=8, lora_alpha=16)
    )
    lora_weights = sum((m + n) * 8 for m, n, _ in lora_shapes) + head
    assert lora["weights"] == 4 * lora_weights and lora["grads"] == 4 * lora_weights
    assert lora["optimizer_state"] == 4 * (2 * lora_weights + tensors) and lora["allocator_state"] == 0
    # above LoRA r=8 only by S (C² beside (m + n) C per layer; here m, n ∈ {32, 48}, so 13 %), its moments, the
    # step counters of one more tensor per layer, and the allocator's two C x C copies
    geo_total = 16 * weights + 4 * geo_tensors + 4 * sum(2 * C * C for m, n, C in shapes)
    assert geo["total"] == geo_total and lora["total"] == 16 * lora_weights + 4 * tensors
    assert geo["total"] / lora["total"] < 1.18


def test_the_suite_adapts_the_same_layers_of_mpnet_in_its_own_folder() -> None:
    """--model mpnet: every Linear inside MPNet's encoder (attention q, k, v, o; intermediate; output), not the
    classifier head, with results kept apart from MiniLM's."""
    import re

    import suite

    settings = dict(o.split("=", 1) for o in suite.MODELS["mpnet"]["overrides"])
    pattern = re.compile(settings["target_modules"])
    layer = "mpnet.encoder.layer.11."
    adapted = [f"{layer}attention.attn.{p}" for p in "qkvo"] + [f"{layer}intermediate.dense", f"{layer}output.dense"]
    assert all(pattern.fullmatch(name) for name in adapted)
    assert not any(pattern.fullmatch(n) for n in ("classifier.dense", "classifier.out_proj", "mpnet.pooler.dense"))
    assert settings["model_name_or_path"] == "all-mpnet-base-v2"
    assert suite.MODELS["mpnet"]["results"] != suite.MODELS["minilm"]["results"]


def test_the_lean_trade_off_table_is_built_from_committed_files_only() -> None:
    """Every row of docs/research.md's memory-against-score table comes from a committed step-cost file and committed
    suite runs; the default's row is today's storage and has every task at three seeds."""
    import lean_tradeoff

    data = lean_tradeoff.table()
    assert all(row["memory_over_lora_r8"] is not None for row in data["rows"])
    default = data["rows"][0]
    assert default["results"] == "suite" and default["step_cost"] == "step_cost.json"
    assert len(default["tasks"]) == 6 and all(t["seeds"] == 3 for t in default["tasks"].values())
    assert lean_tradeoff.markdown(data) in (lean_tradeoff.DOC.read_text())
