"""Classification metrics with numpy: accuracy, macro-F1, per-class precision/recall, ROC-AUC, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are the true class, columns the predicted one."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return cm


def macro_f1(cm: np.ndarray) -> float:
    return float(np.mean(_prf(cm)[2])) if cm.sum() else 0.0


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    pred, true = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None if one side is empty."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average ranks over ties.
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *, loss: float | None = None
) -> dict[str, Any]:
    """Everything the reports need from true labels and predicted class probabilities (N, K)."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    k = len(class_names)
    n = int(len(labels))
    preds = probs.argmax(1) if n else np.zeros(0, np.int64)
    cm = confusion_matrix(labels, preds, k)
    precision, recall, f1 = _prf(cm)
    per_class = {}
    aucs = []
    for i, name in enumerate(class_names):
        auc = roc_auc(probs[:, i], labels == i) if n else None
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(cm[i].sum()),
            "roc_auc": auc,
        }
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_f1": float(np.mean(f1)) if n else 0.0,
        "roc_auc_ovr": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out
