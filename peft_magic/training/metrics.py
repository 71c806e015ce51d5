"""Evaluation metrics from predictions and references (plain numpy; no scikit-learn needed).

Classification: accuracy, macro precision/recall/F1, per-class F1 and the confusion matrix.
Language modelling: eval loss and perplexity.
"""

from __future__ import annotations

import math


def classification_metrics(preds, refs, labels=None) -> dict:
    """Metrics for integer class predictions.

    Args:
        preds, refs: Sequences of class ids (same length).
        labels: Class names, index = id; sets the confusion matrix size and per-class keys.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "f1_per_class": {name: f1}, "confusion_matrix": [[...]]}``,
        where precision/recall/F1 are macro averages over the classes (a class absent from both preds and refs
        is left out of the average).
    """
    import numpy as np

    preds, refs = np.asarray(preds, dtype=np.int64), np.asarray(refs, dtype=np.int64)
    n = len(labels) if labels is not None else int(max(preds.max(initial=0), refs.max(initial=0)) + 1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (refs, preds), 1)
    tp = np.diag(cm).astype(float)
    pred_pos, true_pos = cm.sum(0).astype(float), cm.sum(1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_pos > 0, tp / pred_pos, 0.0)
        recall = np.where(true_pos > 0, tp / true_pos, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (pred_pos + true_pos) > 0
    names = [str(x) for x in labels] if labels is not None else [str(i) for i in range(n)]
    return {
        "accuracy": float(tp.sum() / max(len(refs), 1)),
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
        "f1_per_class": {names[i]: float(f1[i]) for i in range(n)},
        "confusion_matrix": cm.tolist(),
    }


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


SCALAR_KEYS = ("loss", "accuracy", "precision", "recall", "f1", "perplexity")


def scalar_metrics(metrics: dict) -> dict:
    """Only the scalar entries (for history rows and tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
