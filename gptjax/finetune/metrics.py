"""Task metrics, in NumPy: accuracy, F1, Matthews correlation, Pearson and Spearman.

The GLUE tasks report: CoLA Matthews correlation; SST-2, MNLI, QNLI, RTE, WNLI
accuracy; MRPC and QQP F1 and accuracy; STS-B Pearson and Spearman
correlation. Every function takes array-likes of equal length and returns a
Python float. Degenerate inputs follow scikit-learn and SciPy where those are
defined: F1 and Matthews give 0.0 when the formula divides by zero; Pearson and
Spearman give NaN when either input is constant.
"""

from __future__ import annotations

import math

import numpy as np


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"metric inputs differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.size == 0:
        raise ValueError("metric of no examples")
    return a, b


def accuracy(labels, predictions) -> float:
    """Share of predictions equal to the labels."""
    y, p = _pair(labels, predictions)
    return float(np.mean(y == p))


def f1(labels, predictions, positive=1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN) (MRPC, QQP: positive = 1)."""
    y, p = _pair(labels, predictions)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews(labels, predictions) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004); CoLA's metric.

    With the confusion matrix C, t_k = row sums (true), p_k = column sums
    (predicted), c = trace, s = total:
        (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)).
    For two classes this is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    """
    y, p = _pair(labels, predictions)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inverse[: len(y)], inverse[len(y):]
    conf = np.zeros((k, k), np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t, q = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = math.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - q @ t) / denom) if denom else 0.0


def pearson(x, y) -> float:
    """Pearson correlation coefficient."""
    a, b = _pair(x, y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom else float("nan")


def rank(x) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0
            start = end
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    a, b = _pair(x, y)
    return pearson(rank(a), rank(b))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names, labels, predictions) -> dict[str, float]:
    """{name: metric(labels, predictions)} for each metric name."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {n: METRICS[n](labels, predictions) for n in names}
