"""What a model package carries so that each prediction says how far to trust it.

Fitted once after training (``fit_trust``), on splits the test sets never touch: the temperature
and the review threshold on the validation split, the out-of-distribution reference on the
training split's features with its threshold on the validation split. Scoring applies it with
numpy alone (``Trust.assess``): calibrated probabilities, ``confidence``, ``ood_score`` and a
``review_reason`` (``out_of_distribution`` wins over ``low_confidence``; null = the prediction
stands).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..core import Config, ConfigError, setting
from ._calibration import calibration_report, fit_temperature, softmax
from ._ood import DETECTORS, Detector, make_detector

OOD = "out_of_distribution"
LOW_CONFIDENCE = "low_confidence"
REVIEW_REASONS = (OOD, LOW_CONFIDENCE)


@dataclass(frozen=True, kw_only=True)
class TrustConfig(Config):
    """How the calibration, the out-of-distribution reference and the review threshold are fitted."""

    calibrate: bool = setting(True, help="fit temperature scaling on the validation split (off: raw softmax)")
    # Chosen in benchmarks/bench_trust.py on the validation split against an offline OOD set
    # (docs/benchmarks.md): Mahalanobis separated it best.
    ood_detector: Literal["mahalanobis", "knn", "energy"] = setting(
        "mahalanobis", help="out-of-distribution score on penultimate features: mahalanobis (shared covariance), "
        "knn (k-th neighbour distance) or energy (logsumexp of logits)")
    ood_pass_rate: float = setting(0.99, help="share of validation images that must pass the OOD threshold")
    review_target_accuracy: float = setting(
        0.98, help="the low-confidence threshold is the lowest calibrated confidence at which the validation "
        "predictions kept reach this accuracy")
    review_max_fraction: float = setting(0.2, help="the low-confidence threshold never flags more than this share "
                                         "of validation images")

    def __post_init__(self) -> None:
        if not 0.5 <= self.ood_pass_rate <= 1.0:
            raise ConfigError(f"ood_pass_rate={self.ood_pass_rate}: use a share in 0.5..1")
        if not 0.0 < self.review_target_accuracy <= 1.0:
            raise ConfigError(f"review_target_accuracy={self.review_target_accuracy}: use a share in (0, 1]")
        if not 0.0 <= self.review_max_fraction < 1.0:
            raise ConfigError(f"review_max_fraction={self.review_max_fraction}: use a share in 0..1")


@dataclass(frozen=True)
class Assessment:
    """Per row: calibrated probabilities, top probability, OOD score, review reason (or None)."""

    probs: np.ndarray
    confidence: np.ndarray
    ood_score: np.ndarray
    ood: np.ndarray
    review_reason: list[str | None]


@dataclass
class Trust:
    """The fitted calibration and flags that travel in a model package."""

    temperature: float = 1.0
    detector: str = "mahalanobis"
    ood_threshold: float = float("inf")
    review_threshold: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    _det: Detector | None = field(default=None, repr=False)

    @property
    def needs_features(self) -> bool:
        return DETECTORS[self.detector].uses == "features"

    def assess(self, logits: np.ndarray, features: np.ndarray | None = None, *,
               review_threshold: float | None = None) -> Assessment:
        logits = np.asarray(logits, dtype=np.float64)
        probs = softmax(logits, self.temperature)
        conf = probs.max(axis=1)
        det = self._det or make_detector(self.detector)
        if det.uses == "features" and features is None:
            raise ConfigError(f"the {self.detector} OOD score needs the model's features; the engine gave none")
        score = det.score(features=features, logits=logits) if len(logits) else np.zeros(0)
        ood = score > self.ood_threshold
        tau = self.review_threshold if review_threshold is None else review_threshold
        reasons = [OOD if o else (LOW_CONFIDENCE if c < tau else None) for o, c in zip(ood, conf)]
        return Assessment(probs=probs, confidence=conf, ood_score=score, ood=ood, review_reason=reasons)

    # --- package form: a JSON mapping + arrays --------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "detector": self.detector, "ood_threshold": self.ood_threshold,
                "review_threshold": self.review_threshold, "report": self.report}

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v) for k, v in (self._det.state() if self._det else {}).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Trust":
        known = {"temperature", "detector", "ood_threshold", "review_threshold", "report"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise ConfigError(f"unknown trust settings {', '.join(unknown)} in the model package: known are "
                              f"{', '.join(sorted(known))}; this package needs a newer braintumor-ray")
        t = cls(**meta)
        t._det = make_detector(t.detector).load(arrays) if arrays or t.detector == "energy" else None
        if t._det is None:
            raise ConfigError(f"the model package's {t.detector} OOD reference has no arrays: export it again")
        return t


def choose_review_threshold(confidence: np.ndarray, correct: np.ndarray, *, target_accuracy: float,
                            max_fraction: float) -> float:
    """Lowest confidence cut at which the kept rows reach ``target_accuracy``, flagging at most
    ``max_fraction`` of rows; 0 when every row may stand."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if not len(conf):
        return 0.0
    order = np.argsort(conf)
    conf, ok = conf[order], ok[order]
    n = len(conf)
    kept_correct = np.cumsum(ok[::-1])[::-1]  # correct among rows i.. (kept when the cut is conf[i])
    kept = n - np.arange(n)
    acc = kept_correct / kept
    max_flag = int(np.floor(max_fraction * n))
    for i in range(0, max_flag + 1):
        if i == n:
            break
        if acc[i] >= target_accuracy:
            return float(conf[i]) if i else 0.0
    return float(conf[min(max_flag, n - 1)])


def fit_trust(cfg: TrustConfig, *, train_features: np.ndarray, train_labels: np.ndarray, val_logits: np.ndarray,
              val_features: np.ndarray, val_labels: np.ndarray, seed: int = 0) -> Trust:
    """Temperature and review threshold on validation; OOD reference on train, its threshold on validation."""
    val_logits = np.asarray(val_logits, dtype=np.float64)
    val_labels = np.asarray(val_labels)
    if len(val_labels) < 2:
        raise ConfigError("calibration and the review threshold need a validation split of 2 or more images: "
                          "re-run the ingest with --val-fraction > 0")
    temperature = fit_temperature(val_logits, val_labels) if cfg.calibrate else 1.0
    det = make_detector(cfg.ood_detector).fit(np.asarray(train_features), np.asarray(train_labels), seed=seed)
    val_scores = det.score(features=np.asarray(val_features), logits=val_logits)
    ood_threshold = float(np.quantile(val_scores, cfg.ood_pass_rate)) if cfg.ood_pass_rate < 1 else float(val_scores.max())
    probs = softmax(val_logits, temperature)
    review = choose_review_threshold(probs.max(axis=1), probs.argmax(axis=1) == val_labels,
                                     target_accuracy=cfg.review_target_accuracy, max_fraction=cfg.review_max_fraction)
    report = {"val": calibration_report(val_logits, val_labels, temperature),
              "val_ood_flagged": float((val_scores > ood_threshold).mean()),
              "val_review_flagged": float((probs.max(axis=1) < review).mean())}
    return Trust(temperature=temperature, detector=cfg.ood_detector, ood_threshold=ood_threshold,
                 review_threshold=review, report=report, _det=det)
