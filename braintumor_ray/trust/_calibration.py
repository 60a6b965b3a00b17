"""Temperature scaling (Guo et al. 2017) and the figures that judge a calibration: ECE, NLL.

One scalar ``T`` divides the logits; it changes no prediction (argmax is unchanged), only how
sure the probabilities say the model is. It is fitted on the validation split by minimising
the negative log-likelihood, never on a test split.
"""

from __future__ import annotations

import numpy as np

from ..core import ConfigError

ECE_BINS = 15
# T outside [0.05, 20] means the logits carry no usable scale (or the split is degenerate).
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)], 1e-12, 1.0)
    return float(-np.log(p).mean()) if len(p) else float("nan")


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(probs):
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Per bin: range, count, mean confidence, accuracy (for the reliability diagram)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = probs.argmax(axis=1) == np.asarray(labels) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out.append(
            {
                "lo": float(lo),
                "hi": float(hi),
                "n": int(m.sum()),
                "confidence": float(conf[m].mean()) if m.any() else None,
                "accuracy": float(correct[m].mean()) if m.any() else None,
            }
        )
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the NLL of ``softmax(logits / T)`` on (validation) ``labels``."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) < 2:
        raise ConfigError(
            f"temperature scaling needs (N, classes) logits and N labels with N >= 2, got {logits.shape} and "
            f"{labels.shape}: the validation split is empty or too small; re-run the ingest with --val-fraction > 0"
        )
    res = minimize_scalar(
        lambda lt: nll(softmax(logits, np.exp(lt)), labels),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE (15 bins) and NLL before (T = 1) and after temperature scaling."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "n": int(len(labels)),
        "ece_before": ece(before, labels),
        "ece_after": ece(after, labels),
        "nll_before": nll(before, labels),
        "nll_after": nll(after, labels),
    }
