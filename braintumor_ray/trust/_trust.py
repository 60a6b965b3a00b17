"""What a model package carries so that each prediction says how far to trust it.

Fitted once after training (``fit_trust``), on splits the test sets never touch. The validation
split is cut in two, per class and by a seeded draw (split conformal, not cross-fitting): one
part fits the temperature and the review threshold, the other (``conformal_fraction`` of it)
calibrates the prediction sets, so the sets' scores are exchangeable with new rows' (the
temperature was not fitted on them). The out-of-distribution reference is fitted on the
training split's features, its threshold on the whole validation split. Scoring applies it with
numpy alone (``Trust.assess``): calibrated probabilities, ``confidence``, ``ood_score``, the
prediction set and a ``review_reason`` (``out_of_distribution`` wins over ``low_confidence``,
which wins over ``ambiguous``, a set of more than one class; null = the prediction stands).

Split rather than cross-fit: split conformal's guarantee is exact at a finite sample, while
cross-conformal / CV+ only promise ``1 - 2 alpha`` and would need each fold's temperature at
scoring time; a temperature (one number) and a confidence cut need few rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..core import Config, ConfigError, setting
from ._calibration import calibration_report, fit_temperature, softmax
from ._conformal import SCORES, Conformal, fit_conformal, split_calibration
from ._ood import DETECTORS, Detector, make_detector

OOD = "out_of_distribution"
LOW_CONFIDENCE = "low_confidence"
AMBIGUOUS = "ambiguous"  # the prediction set holds more than one class
REVIEW_REASONS = (OOD, LOW_CONFIDENCE, AMBIGUOUS)


@dataclass(frozen=True, kw_only=True)
class TrustConfig(Config):
    """How the calibration, the out-of-distribution reference and the review threshold are fitted."""

    calibrate: bool = setting(True, help="fit temperature scaling on the validation split (off: raw softmax)")
    # Chosen in benchmarks/bench_trust.py on the validation split against an offline OOD set
    # (docs/benchmarks.md): Mahalanobis separated it best.
    ood_detector: Literal["mahalanobis", "knn", "energy"] = setting(
        "mahalanobis",
        help="out-of-distribution score on penultimate features: mahalanobis (shared covariance), "
        "knn (k-th neighbour distance) or energy (logsumexp of logits)",
    )
    ood_pass_rate: float = setting(0.99, help="share of validation images that must pass the OOD threshold")
    review_target_accuracy: float = setting(
        0.98,
        help="the low-confidence threshold is the lowest calibrated confidence at which the validation "
        "predictions kept reach this accuracy",
    )
    review_max_fraction: float = setting(
        0.2, help="the low-confidence threshold never flags more than this share of validation images"
    )
    conformal_alpha: float = setting(
        0.1,
        aliases=("--conformal-alpha",),
        help="prediction sets miss the true class of at most this share of "
        "each class's images (class-conditional conformal, calibrated on part of the validation split)",
    )
    conformal_score: Literal["lac", "aps"] = setting(
        "lac", help="conformal score: lac (1 - probability; smallest sets) or aps (probability mass ranked above)"
    )
    conformal_fraction: float = setting(
        0.5,
        help="share of each class's validation images that calibrate the prediction sets (the rest fit the "
        "temperature and the review threshold); 0: no prediction sets",
    )

    def __post_init__(self) -> None:
        if not 0.5 <= self.ood_pass_rate <= 1.0:
            raise ConfigError(f"ood_pass_rate={self.ood_pass_rate}: use a share in 0.5..1")
        if not 0.0 < self.review_target_accuracy <= 1.0:
            raise ConfigError(f"review_target_accuracy={self.review_target_accuracy}: use a share in (0, 1]")
        if not 0.0 <= self.review_max_fraction < 1.0:
            raise ConfigError(f"review_max_fraction={self.review_max_fraction}: use a share in 0..1")
        if not 0.0 < self.conformal_alpha < 1.0:
            raise ConfigError(f"conformal_alpha={self.conformal_alpha}: use a miscoverage rate in (0, 1), e.g. 0.1")
        if self.conformal_score not in SCORES:
            raise ConfigError(f"conformal_score={self.conformal_score!r}: use one of {', '.join(SCORES)}")
        if not 0.0 <= self.conformal_fraction < 1.0:
            raise ConfigError(f"conformal_fraction={self.conformal_fraction}: use a share in 0..1 (0: no sets)")


@dataclass(frozen=True)
class Assessment:
    """Per row: calibrated probabilities, top probability, OOD score, review reason (or None),
    and the prediction set as a (N, classes) mask (None: a package from before sets)."""

    probs: np.ndarray
    confidence: np.ndarray
    ood_score: np.ndarray
    ood: np.ndarray
    review_reason: list[str | None]
    in_set: np.ndarray | None = None

    def prediction_sets(self, class_names) -> list[list[str]] | None:
        if self.in_set is None:
            return None
        return [[c for c, k in zip(class_names, row) if k] for row in self.in_set]


@dataclass
class Trust:
    """The fitted calibration and flags that travel in a model package."""

    temperature: float = 1.0
    detector: str = "mahalanobis"
    ood_threshold: float = float("inf")
    review_threshold: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    conformal: Conformal | None = None  # prediction sets (None: a package from before them)
    _det: Detector | None = field(default=None, repr=False)

    @property
    def needs_features(self) -> bool:
        return DETECTORS[self.detector].uses == "features"

    def assess(
        self, logits: np.ndarray, features: np.ndarray | None = None, *, review_threshold: float | None = None
    ) -> Assessment:
        logits = np.asarray(logits, dtype=np.float64)
        probs = softmax(logits, self.temperature)
        conf = probs.max(axis=1)
        det = self._det or make_detector(self.detector)
        if det.uses == "features" and features is None:
            raise ConfigError(f"the {self.detector} OOD score needs the model's features; the engine gave none")
        score = det.score(features=features, logits=logits) if len(logits) else np.zeros(0)
        ood = score > self.ood_threshold
        tau = self.review_threshold if review_threshold is None else review_threshold
        in_set = self.conformal.in_set(probs) if self.conformal is not None else None
        wide = in_set.sum(axis=1) > 1 if in_set is not None else np.zeros(len(conf), bool)
        reasons = [
            OOD if o else LOW_CONFIDENCE if c < tau else AMBIGUOUS if w else None for o, c, w in zip(ood, conf, wide)
        ]
        return Assessment(probs=probs, confidence=conf, ood_score=score, ood=ood, review_reason=reasons, in_set=in_set)

    # --- package form: a JSON mapping + arrays --------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        meta = {
            "temperature": self.temperature,
            "detector": self.detector,
            "ood_threshold": self.ood_threshold,
            "review_threshold": self.review_threshold,
            "report": self.report,
        }
        # Absent (not null) without sets: a package from before them keeps its model_id.
        return meta | ({"conformal": self.conformal.to_meta()} if self.conformal is not None else {})

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v) for k, v in (self._det.state() if self._det else {}).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], *, num_classes: int | None = None) -> Trust:
        """The package form back, each stored value range-checked (:func:`check_stored`):
        ``num_classes`` is the package's number of classes, the count of conformal thresholds."""
        known = {"temperature", "detector", "ood_threshold", "review_threshold", "report", "conformal"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise ConfigError(
                f"unknown trust settings {', '.join(unknown)} in the model package: known are "
                f"{', '.join(sorted(known))}; this package needs a newer braintumor-ray"
            )
        check_stored(meta, arrays, num_classes=num_classes)
        conformal = Conformal.from_meta(meta["conformal"]) if meta.get("conformal") is not None else None
        t = cls(**{**meta, "conformal": conformal})
        t._det = make_detector(t.detector).load(arrays) if arrays or t.detector == "energy" else None
        if t._det is None:
            raise ConfigError(f"the model package's {t.detector} OOD reference has no arrays: export it again")
        return t


# An APS score is a sum of probabilities: it may pass 1 by a rounding error in a valid package.
_ROUNDING = 1e-6


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def check_stored(meta: dict[str, Any], arrays: dict[str, np.ndarray], *, num_classes: int | None = None) -> None:
    """Refuse a stored calibration value out of its range, in one line naming its key. The model
    id covers these values, but an id can be recomputed after an edit: a negative temperature
    turns every softmax around and NaN thresholds flag nothing, so that every label and review
    flag could differ from what the network says, silently."""

    def bad(key: str, value: Any, rule: str) -> ConfigError:
        return ConfigError(
            f"{key} = {value!r} is out of range ({rule}): the package's calibration was edited or "
            "corrupted; export the package again"
        )

    if "temperature" in meta:
        t = _number(meta["temperature"])
        if t is None or not np.isfinite(t) or t <= 0:
            raise bad("trust.temperature", meta["temperature"], "a finite number > 0")
    if "review_threshold" in meta:
        r = _number(meta["review_threshold"])
        if r is None or not -_ROUNDING <= r <= 1.0 + _ROUNDING:
            raise bad("trust.review_threshold", meta["review_threshold"], "a confidence in [0, 1]")
    if "ood_threshold" in meta:
        o = _number(meta["ood_threshold"])
        if o is None or not np.isfinite(o):
            raise bad("trust.ood_threshold", meta["ood_threshold"], "a finite number")
    conformal = meta.get("conformal")
    if isinstance(conformal, dict) and isinstance(conformal.get("thresholds"), list):
        ts = conformal["thresholds"]
        if num_classes is not None and len(ts) != num_classes:
            raise bad("trust.conformal.thresholds", ts, f"one per class: {num_classes}, not {len(ts)}")
        for k, t in enumerate(ts):  # null: the class is always in the set
            if t is not None and ((v := _number(t)) is None or not -_ROUNDING <= v <= 1.0 + _ROUNDING):
                raise bad(f"trust.conformal.thresholds[{k}]", t, "a nonconformity score in [0, 1], or null")
    for name, a in arrays.items():
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
            raise ConfigError(
                f"the OOD reference array {name!r} in the package's trust file holds NaN or infinite "
                "values (or is not numeric): the package was corrupted; export it again"
            )


def choose_review_threshold(
    confidence: np.ndarray, correct: np.ndarray, *, target_accuracy: float, max_fraction: float
) -> float:
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


def fit_trust(
    cfg: TrustConfig,
    *,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_logits: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    seed: int = 0,
) -> Trust:
    """Temperature and review threshold on one part of validation, the prediction sets on the other
    (:func:`split_calibration`); OOD reference on train, its threshold on all of validation."""
    all_logits = np.asarray(val_logits, dtype=np.float64)
    labels = np.asarray(val_labels)
    conf_rows = _conformal_rows(cfg, labels, seed=seed)
    val_logits, val_labels = all_logits[~conf_rows], labels[~conf_rows]
    temperature = fit_temperature(val_logits, val_labels) if cfg.calibrate else 1.0
    det, ood_threshold, val_scores = _fit_ood(
        cfg, train_features, train_labels, val_features=val_features, val_logits=all_logits, seed=seed
    )
    probs = softmax(val_logits, temperature)
    review = choose_review_threshold(
        probs.max(axis=1),
        probs.argmax(axis=1) == val_labels,
        target_accuracy=cfg.review_target_accuracy,
        max_fraction=cfg.review_max_fraction,
    )
    report = {
        "val": calibration_report(val_logits, val_labels, temperature),
        "val_ood_flagged": float((val_scores > ood_threshold).mean()),
        "val_review_flagged": float((probs.max(axis=1) < review).mean()),
    }
    conformal = None
    if conf_rows.any():
        conformal = fit_conformal(
            softmax(all_logits[conf_rows], temperature),
            labels[conf_rows],
            alpha=cfg.conformal_alpha,
            score=cfg.conformal_score,
            num_classes=all_logits.shape[1],
        )
        report["conformal"] = _conformal_report(conformal, rows=int(conf_rows.sum()))
    report["val_rows_temperature"] = int(len(val_labels))
    return Trust(
        temperature=temperature,
        detector=cfg.ood_detector,
        ood_threshold=ood_threshold,
        review_threshold=review,
        report=report,
        conformal=conformal,
        _det=det,
    )


def _conformal_rows(cfg: TrustConfig, labels: np.ndarray, *, seed: int) -> np.ndarray:
    """The validation rows that calibrate the prediction sets (:func:`split_calibration`), refused
    when fewer than 2 rows are left beside them for the temperature and the review threshold."""
    conf_rows = split_calibration(labels, cfg.conformal_fraction, seed=seed)
    if len(labels) < 2 or (~conf_rows).sum() < 2:
        raise ConfigError(
            f"calibration and the review threshold need 2 or more validation images beside the "
            f"{int(conf_rows.sum())} that calibrate the prediction sets, and the validation split has "
            f"{len(labels)}: re-run the ingest with a larger --val-fraction (or lower "
            "--trust.conformal-fraction)"
        )
    return conf_rows


def _fit_ood(
    cfg: TrustConfig,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    *,
    val_features: np.ndarray,
    val_logits: np.ndarray,
    seed: int,
) -> tuple[Detector, float, np.ndarray]:
    """The OOD detector fitted on the training split, its threshold (``ood_pass_rate`` of all the
    validation images pass it) and the validation images' scores."""
    det = make_detector(cfg.ood_detector).fit(np.asarray(train_features), np.asarray(train_labels), seed=seed)
    val_scores = det.score(features=np.asarray(val_features), logits=val_logits)
    ood_threshold = (
        float(np.quantile(val_scores, cfg.ood_pass_rate)) if cfg.ood_pass_rate < 1 else float(val_scores.max())
    )
    return det, ood_threshold, val_scores


def _conformal_report(conformal: Conformal, *, rows: int) -> dict[str, Any]:
    """The prediction sets as the training report shows them."""
    return {
        "alpha": conformal.alpha,
        "score": conformal.score,
        "rows": rows,
        "thresholds": conformal.to_meta()["thresholds"],
        "counts": conformal.counts,
    }
