"""Trust in each prediction: temperature scaling, out-of-distribution scores, review flags.

    trust = fit_trust(TrustConfig(), train_features=..., train_labels=..., val_logits=...,
                      val_features=..., val_labels=...)        # after training, never on test
    a = trust.assess(logits, features)   # calibrated probs, confidence, ood_score, review_reason, in_set
    a.prediction_sets(CLASS_NAMES)       # class-conditional conformal sets, e.g. [["glioma", "meningioma"]]

Numpy and SciPy only: the model package carries a ``Trust`` and scoring applies it whichever
inference engine runs.
"""

from ._calibration import ECE_BINS, calibration_report, ece, fit_temperature, nll, reliability_bins, softmax
from ._conformal import SCORES as CONFORMAL_SCORES
from ._conformal import Conformal, conformal_quantile, coverage_report, fit_conformal, nonconformity, split_calibration
from ._ood import DETECTORS, KNN, Detector, Energy, Mahalanobis, auroc, make_detector
from ._trust import (
    AMBIGUOUS,
    LOW_CONFIDENCE,
    OOD,
    REVIEW_REASONS,
    Assessment,
    Trust,
    TrustConfig,
    choose_review_threshold,
    fit_trust,
)

__all__ = [
    "AMBIGUOUS",
    "CONFORMAL_SCORES",
    "Conformal",
    "conformal_quantile",
    "coverage_report",
    "fit_conformal",
    "nonconformity",
    "split_calibration",
    "DETECTORS",
    "ECE_BINS",
    "KNN",
    "LOW_CONFIDENCE",
    "OOD",
    "REVIEW_REASONS",
    "Assessment",
    "Detector",
    "Energy",
    "Mahalanobis",
    "Trust",
    "TrustConfig",
    "auroc",
    "calibration_report",
    "choose_review_threshold",
    "ece",
    "fit_temperature",
    "fit_trust",
    "make_detector",
    "nll",
    "reliability_bins",
    "softmax",
]
