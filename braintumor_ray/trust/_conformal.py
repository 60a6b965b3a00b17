"""Split conformal prediction sets, class-conditional (Mondrian): which classes are still in play.

For every label ``y`` a nonconformity score ``s(x, y)`` says how unlike class ``y`` the model
finds ``x`` (``lac``: 1 - p(y|x), Sadinle et al. 2019; ``aps``: the probability mass of the
classes ranked above ``y`` plus p(y|x), Romano et al. 2020, not randomised). Calibration takes,
per true class ``k``, the scores of its ``n_k`` calibration rows and keeps the
``ceil((n_k + 1)(1 - alpha))``-th smallest as ``q_k`` (none, i.e. every score passes, when that
rank exceeds ``n_k``). The set of a new ``x`` is ``{y : s(x, y) <= q_y}``, plus the top class so
that no set is empty (a superset: the guarantee still holds). For rows exchangeable with the
calibration rows of class ``k``, ``P(k in set | Y = k) >= 1 - alpha``: per class, not only on
average, which on imbalanced data is what keeps the rare class covered (marginal conformal
meets ``1 - alpha`` over all rows by over-covering the common classes). The marginal variant
(one ``q`` from all rows) is kept for comparison (``class_conditional=False``).

Why a small numpy implementation rather than a library (weighed for issue 28): MAPIE's
classifiers promise marginal coverage and reach Mondrian only through a wrapper around a
scikit-learn estimator; crepes (``ConformalClassifier`` with Mondrian ``bins``) works on score
arrays but brings scikit-learn and pandas into every scoring worker for a sort and a compare;
TorchCP (class-wise predictor, APS/THR scores) works on torch tensors, and scoring with ONNX
Runtime runs no torch. What the package must carry is one threshold per class, and what scoring
must do is one comparison per class: that is the 40 lines below, checked in
tests/trust/test_conformal.py against the finite-sample guarantee (coverage within its binomial
bound; a quantile without the ``(n + 1)`` correction fails it). numpy is already in every
worker, and the package stays readable without any of those libraries installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..core import ConfigError

SCORES = ("lac", "aps")
Score = Literal["lac", "aps"]


def nonconformity(probs: np.ndarray, score: str) -> np.ndarray:
    """(N, K) scores of every candidate label (higher: less like that class)."""
    p = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - p
    if score == "aps":
        order = np.argsort(-p, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
        out = np.empty_like(p)
        np.put_along_axis(out, order, cum, axis=1)
        return out
    raise ConfigError(f"conformal score {score!r} is unknown: use one of {', '.join(SCORES)}")


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` calibration scores; +inf when that
    rank exceeds ``n`` (too few rows to exclude anything at this alpha)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(s) + 1) * (1.0 - alpha) - 1e-9)
    return float(s[rank - 1]) if rank <= len(s) else float("inf")


@dataclass
class Conformal:
    """Fitted conformal thresholds (one per class, or one shared when marginal)."""

    alpha: float
    score: str = "lac"
    class_conditional: bool = True
    thresholds: list[float] = field(default_factory=list)  # per class; inf: the class is always in the set
    counts: list[int] = field(default_factory=list)  # calibration rows per class

    def in_set(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) bool: label ``y`` is in row ``i``'s prediction set."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.thresholds):
            raise ConfigError(
                f"conformal thresholds for {len(self.thresholds)} classes, probabilities shaped {p.shape}"
            )
        keep = nonconformity(p, self.score) <= np.asarray(self.thresholds, dtype=np.float64)[None, :]
        if len(p):
            keep[np.arange(len(p)), p.argmax(axis=1)] = True
        return keep

    def to_meta(self) -> dict[str, Any]:
        # JSON has no infinity (the package is written with allow_nan=False): null = always in the set.
        return {
            "alpha": self.alpha,
            "score": self.score,
            "class_conditional": self.class_conditional,
            "thresholds": [None if math.isinf(t) else t for t in self.thresholds],
            "counts": list(self.counts),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Conformal:
        known = {"alpha", "score", "class_conditional", "thresholds", "counts"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise ConfigError(
                f"unknown conformal settings {', '.join(unknown)} in the model package: known are "
                f"{', '.join(sorted(known))}; this package needs a newer braintumor-ray"
            )
        if meta.get("score") not in SCORES or not 0 < float(meta.get("alpha", -1)) < 1 or not meta.get("thresholds"):
            raise ConfigError(
                f"the model package's conformal calibration {meta} is not valid (score in "
                f"{', '.join(SCORES)}, alpha in (0, 1), thresholds per class): export it again"
            )
        return cls(**{**meta, "thresholds": [float("inf") if t is None else float(t) for t in meta["thresholds"]]})


def fit_conformal(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float,
    score: str = "lac",
    class_conditional: bool = True,
    num_classes: int | None = None,
) -> Conformal:
    """Thresholds from calibration rows (calibrated probabilities and true labels)."""
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"conformal alpha={alpha}: use a miscoverage rate in (0, 1), e.g. 0.1")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    k = num_classes or p.shape[1]
    s = nonconformity(p, score)[np.arange(len(y)), y] if len(y) else np.zeros(0)
    counts = [int((y == c).sum()) for c in range(k)]
    if class_conditional:
        thresholds = [conformal_quantile(s[y == c], alpha) for c in range(k)]
    else:
        thresholds = [conformal_quantile(s, alpha)] * k
    return Conformal(
        alpha=float(alpha), score=score, class_conditional=class_conditional, thresholds=thresholds, counts=counts
    )


def split_calibration(labels: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Bool mask of the rows that calibrate the sets: ``fraction`` of each class (rounded down),
    drawn with ``seed``; the others fit the temperature and the review threshold."""
    y = np.asarray(labels)
    mask = np.zeros(len(y), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        mask[rng.permutation(idx)[: int(np.floor(fraction * len(idx)))]] = True
    return mask


def coverage_report(
    conformal: Conformal, probs: np.ndarray, labels: np.ndarray, class_names: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Coverage (share of rows whose set holds the true class) and mean set size, overall and per
    true class, and the set-size histogram."""
    y = np.asarray(labels, dtype=np.int64)
    if not len(y):
        return {"n": 0}
    keep = conformal.in_set(probs)
    covered = keep[np.arange(len(y)), y]
    size = keep.sum(axis=1)
    per = {}
    for c, name in enumerate(class_names):
        m = y == c
        if m.any():
            per[name] = {
                "n": int(m.sum()),
                "coverage": float(covered[m].mean()),
                "mean_set_size": float(size[m].mean()),
            }
    return {
        "n": int(len(y)),
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "set_sizes": {str(s): int((size == s).sum()) for s in range(1, keep.shape[1] + 1)},
        "per_class": per,
    }
