"""Out-of-distribution scores on the model's penultimate features (higher = less like training).

Three detectors, compared on evidence in ``benchmarks/bench_trust.py``:

- ``mahalanobis``: distance to the nearest class mean under one shared covariance
  (Lee et al. 2018), fitted on the training split's features;
- ``knn``: distance to the k-th nearest training feature after L2 normalisation (Sun et al. 2022);
- ``energy``: ``-logsumexp(logits)`` (Liu et al. 2020), which needs no fit.

Each is a small object with ``score`` and a state of plain arrays, so the model package can
carry it (``trust.safetensors``) and scoring can apply it with numpy alone.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..core import ConfigError

# The k-NN bank is capped: at 1280-d Lite0 features 4096 rows are 21 MB and ~5 ms a batch.
KNN_BANK = 4096
KNN_K = 10
# Shrinkage towards the diagonal: 2254 training images against 1280 feature dimensions make the
# sample covariance near-singular.
SHRINKAGE = 0.1


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Detector:
    name: ClassVar[str] = ""
    uses: ClassVar[str] = "features"  # or "logits"
    # True when the fitted state holds per-image training features (k-NN's bank): a model
    # package then carries something derived from each of those patients' scans.
    stores_training_features: ClassVar[bool] = False

    def fit(self, features: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> Detector:
        return self

    def score(self, features: np.ndarray | None = None, logits: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load(self, state: dict[str, np.ndarray]) -> Detector:
        return self


class Mahalanobis(Detector):
    name = "mahalanobis"

    def fit(self, features, labels, *, seed=0):
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        classes = np.unique(y)
        if len(x) < 2 or len(classes) < 1:
            raise ConfigError("the OOD reference needs training features: the training split is empty")
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / max(len(x) - 1, 1)
        cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.diag(np.diag(cov)) + 1e-6 * np.eye(cov.shape[0])
        self.means = means.astype(np.float32)
        self.precision = np.linalg.inv(cov).astype(np.float32)
        return self

    def score(self, features=None, logits=None):
        x = np.asarray(features, dtype=np.float32)
        d = (x[:, None, :] - self.means[None]).reshape(-1, x.shape[1])  # (N C, D)
        # One BLAS product, then a row-wise dot: numpy's einsum over "ncd,de,nce" runs unblocked
        # loops, 9.5 ms an image for Lite0's 1280 features (as long as the network's own forward
        # pass on ONNX Runtime); this is ~0.2 ms (benchmarks/bench_replica.py, docs/benchmarks.md).
        m = np.einsum("kd,kd->k", d @ self.precision, d).reshape(len(x), -1)
        return m.min(axis=1).astype(np.float64)

    def state(self):
        return {"means": self.means, "precision": self.precision}

    def load(self, state):
        self.means, self.precision = state["means"], state["precision"]
        return self


class KNN(Detector):
    name = "knn"
    stores_training_features = True

    def fit(self, features, labels, *, seed=0):
        x = _l2(features)
        if len(x) > KNN_BANK:
            x = x[np.random.default_rng(seed).choice(len(x), KNN_BANK, replace=False)]
        self.bank = x
        return self

    def score(self, features=None, logits=None):
        q = _l2(features)
        sims = q @ self.bank.T
        k = min(KNN_K, self.bank.shape[0])
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0)).astype(np.float64)

    def state(self):
        return {"bank": self.bank}

    def load(self, state):
        self.bank = state["bank"]
        return self


class Energy(Detector):
    name = "energy"
    uses = "logits"

    def score(self, features=None, logits=None):
        z = np.asarray(logits, dtype=np.float64)
        m = z.max(axis=1)
        return -(m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (Mahalanobis, KNN, Energy)}


def make_detector(name: str) -> Detector:
    if name not in DETECTORS:
        raise ConfigError(f"OOD detector {name!r} is unknown: use one of {', '.join(DETECTORS)}")
    return DETECTORS[name]()


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of an OOD sample > score of an in-distribution one), ties counted half."""
    from scipy.stats import rankdata

    a, b = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if not len(a) or not len(b):
        return float("nan")
    r = rankdata(np.concatenate([a, b]))
    return float((r[len(a) :].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))
