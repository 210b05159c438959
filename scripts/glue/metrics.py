"""GLUE's official metrics, computed offline with scikit-learn and SciPy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _accuracy(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(ref, pred))}


def _accuracy_f1(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(ref, pred)), "f1": float(f1_score(ref, pred))}


def _matthews(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {"matthews_correlation": float(matthews_corrcoef(ref, pred))}


def _f1_matthews(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """F1 of the positive class (spam) and Matthews correlation (CoLA's metric)."""
    return {"f1": float(f1_score(ref, pred)), "matthews_correlation": float(matthews_corrcoef(ref, pred))}


def _pearson_spearman(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {"pearson": float(pearsonr(pred, ref)[0]), "spearmanr": float(spearmanr(pred, ref)[0])}


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "accuracy": _accuracy,
    "accuracy_f1": _accuracy_f1,
    "matthews": _matthews,
    "f1_matthews": _f1_matthews,
    "pearson_spearman": _pearson_spearman,
}
