"""Calibration, out-of-distribution scores and review flags on generated data (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from braintumor_ray.core import ConfigError
from braintumor_ray.trust import (
    LOW_CONFIDENCE,
    OOD,
    Trust,
    TrustConfig,
    auroc,
    choose_review_threshold,
    ece,
    fit_temperature,
    fit_trust,
    make_detector,
    nll,
    softmax,
)


def overconfident_task(n=4000, k=4, seed=0, scale=4.0):
    """Labels drawn from softmax(z); the model reports z x scale: right argmax, far too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, size=(n, k))
    p = softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z * scale, y


def test_temperature_scaling_lowers_ece_and_nll_of_an_overconfident_model():
    logits, y = overconfident_task()
    t = fit_temperature(logits[:2000], y[:2000])
    assert 2.5 < t < 6.0, t  # the true scale is 4
    before, after = softmax(logits[2000:]), softmax(logits[2000:], t)
    assert ece(after, y[2000:]) < 0.5 * ece(before, y[2000:])
    assert nll(after, y[2000:]) < nll(before, y[2000:])
    assert (after.argmax(1) == before.argmax(1)).all()  # no prediction changes


def test_a_calibrated_model_keeps_temperature_near_one():
    logits, y = overconfident_task(scale=1.0, seed=1)
    assert 0.8 < fit_temperature(logits, y) < 1.25


@pytest.mark.parametrize("conf, correct, target, cap, expect", [
    ([0.9, 0.95, 0.99], [1, 1, 1], 0.98, 0.5, 0.0),          # already accurate: nothing flagged
    ([0.3, 0.6, 0.9, 0.95], [0, 1, 1, 1], 0.98, 0.5, 0.6),   # drop the one wrong, low row
    ([0.3, 0.4, 0.9, 0.95], [0, 0, 1, 0], 0.98, 0.25, 0.4),  # target unreachable: the cap decides
])
def test_review_threshold_table(conf, correct, target, cap, expect):
    assert choose_review_threshold(np.array(conf), np.array(correct, bool), target_accuracy=target,
                                   max_fraction=cap) == pytest.approx(expect)


def clustered_features(n_per=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, d))
    x = np.concatenate([c + rng.normal(0, 1, size=(n_per, d)) for c in centres])
    y = np.repeat(np.arange(4), n_per)
    return x, y, centres


@pytest.mark.parametrize("name", ["mahalanobis", "knn"])
def test_feature_detectors_separate_far_points(name):
    x, y, _ = clustered_features()
    det = make_detector(name).fit(x, y)
    xin, _, _ = clustered_features(n_per=50, seed=0)
    far = np.random.default_rng(5).normal(0, 1, size=(100, 16)) * 0.5 + 25.0
    assert auroc(det.score(features=xin), det.score(features=far)) > 0.99


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_mean():
    """The batched score (one matrix product) is the textbook (x - mu)^T P (x - mu), minimum over classes."""
    x, y, _ = clustered_features()
    det = make_detector("mahalanobis").fit(x, y)
    q = np.random.default_rng(3).normal(0, 2, size=(7, x.shape[1])).astype(np.float32)
    want = [min(float((v - mu) @ det.precision @ (v - mu)) for mu in det.means) for v in q]
    np.testing.assert_allclose(det.score(features=q), want, rtol=1e-4)


def test_fit_trust_flags_ood_and_low_confidence_and_round_trips(tmp_path):
    x, y, centres = clustered_features()
    w = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    logits = x @ w.T
    trust = fit_trust(TrustConfig(review_target_accuracy=0.999), train_features=x, train_labels=y,
                      val_logits=logits, val_features=x, val_labels=y)
    assert trust.report["val_ood_flagged"] == pytest.approx(0.01, abs=0.01)
    far = np.full((3, 16), 40.0)
    a = trust.assess(np.concatenate([logits[:5], far @ w.T]), np.concatenate([x[:5], far]))
    assert a.review_reason[5:] == [OOD] * 3
    assert np.allclose(a.probs.sum(1), 1)
    # low confidence: a point halfway between two class centres
    mid = (centres[0] + centres[1]) / 2
    b = trust.assess(mid[None] @ w.T, mid[None], review_threshold=0.99)
    assert b.review_reason[0] in (LOW_CONFIDENCE, OOD)
    # the package form gives the same answers
    back = Trust.from_meta(trust.to_meta(), trust.arrays())
    c = back.assess(np.concatenate([logits[:5], far @ w.T]), np.concatenate([x[:5], far]))
    assert c.review_reason == a.review_reason and np.allclose(c.ood_score, a.ood_score)


def test_unknown_trust_key_in_a_package_is_an_error():
    with pytest.raises(ConfigError, match="unknown trust settings surprise"):
        Trust.from_meta({"temperature": 1.0, "surprise": 1}, {})


def test_fit_trust_refuses_an_empty_validation_split():
    x, y, _ = clustered_features(n_per=5)
    with pytest.raises(ConfigError, match="validation split"):
        fit_trust(TrustConfig(), train_features=x, train_labels=y, val_logits=np.zeros((1, 4)),
                  val_features=x[:1], val_labels=y[:1])


# --- series verdicts ------------------------------------------------------------------------------
from braintumor_ray.score import series_verdict  # noqa: E402

GLIOMA, MENINGIOMA, NO_TUMOR, PITUITARY = range(4)


def _slices(n, tumour_at=(), p_tumour=0.9, cls=GLIOMA):
    p = np.tile([0.02, 0.02, 0.94, 0.02], (n, 1))
    for i in tumour_at:
        p[i] = (1 - p_tumour) / 3
        p[i, cls] = p_tumour
    return p


def test_healthy_volume_with_one_noisy_slice_is_no_tumor():
    p = _slices(25, tumour_at=[12], p_tumour=0.95, cls=MENINGIOMA)
    v = series_verdict(p, no_tumor=NO_TUMOR)
    assert v.label == NO_TUMOR and v.voting == 25 and v.review_reason is None


def test_lesion_in_a_few_central_slices_names_the_tumour():
    p = _slices(25, tumour_at=[11, 12, 13], p_tumour=0.85, cls=PITUITARY)
    v = series_verdict(p, no_tumor=NO_TUMOR)
    assert v.label == PITUITARY and v.top_slice in (11, 12, 13) and v.confidence > 0.5


def test_edge_slices_and_ood_slices_do_not_vote():
    p = _slices(10, tumour_at=[0, 1, 9], p_tumour=0.99)  # tumour-looking slices at the top and bottom
    head = np.array([0.05, 0.08] + [0.5] * 7 + [0.06])
    assert series_verdict(p, no_tumor=NO_TUMOR).label == GLIOMA  # without the head rule they decide
    v = series_verdict(p, head_fraction=head, no_tumor=NO_TUMOR)
    assert v.label == NO_TUMOR and v.voting == 7
    ood = np.zeros(10, bool)
    ood[[0, 1, 9]] = True
    assert series_verdict(p, ood=ood, no_tumor=NO_TUMOR).label == NO_TUMOR
    allood = series_verdict(p, ood=np.ones(10, bool), no_tumor=NO_TUMOR)
    assert allood.label is None and allood.review_reason == "out_of_distribution"


def test_unsure_series_is_flagged_for_review():
    p = _slices(6, tumour_at=[2, 3], p_tumour=0.8)
    v = series_verdict(p, no_tumor=NO_TUMOR, review_threshold=0.9)
    assert v.review_reason == "low_confidence"


@pytest.mark.parametrize("edit, key", [
    ({"temperature": -1.0}, "trust.temperature = -1.0"),
    ({"temperature": 0}, "trust.temperature = 0"),
    ({"temperature": float("nan")}, "trust.temperature = nan"),
    ({"temperature": float("inf")}, "trust.temperature = inf"),
    ({"temperature": "2"}, "trust.temperature = '2'"),
    ({"review_threshold": 1.5}, "trust.review_threshold = 1.5"),
    ({"review_threshold": float("nan")}, "trust.review_threshold = nan"),
    ({"ood_threshold": float("nan")}, "trust.ood_threshold = nan"),
    ({"conformal": {"alpha": 0.1, "score": "lac", "thresholds": [0.5, float("nan"), 0.5, None]}},
     "trust.conformal.thresholds[1] = nan"),
    ({"conformal": {"alpha": 0.1, "score": "lac", "thresholds": [0.5, -0.1, 0.5, None]}},
     "trust.conformal.thresholds[1] = -0.1"),
    ({"conformal": {"alpha": 0.1, "score": "lac", "thresholds": [0.5, 0.5, 0.5]}},
     "trust.conformal.thresholds = [0.5, 0.5, 0.5] is out of range (one per class: 4, not 3)"),
])
def test_stored_calibration_values_out_of_range_are_refused_naming_the_key(edit, key):
    """Issue 35: a negative temperature, NaN or out-of-range thresholds, the wrong number of them:
    refused in one line naming the key (they were taken, and every label could change)."""
    good = {"temperature": 1.3, "detector": "energy", "ood_threshold": -2.0, "review_threshold": 0.4,
            "conformal": {"alpha": 0.1, "score": "lac", "thresholds": [0.5, 0.9, 0.2, None]}}
    assert Trust.from_meta(good, {}, num_classes=4).temperature == 1.3
    with pytest.raises(ConfigError) as e:
        Trust.from_meta({**good, **edit}, {}, num_classes=4)
    assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="OOD reference array 'means' in the package's trust file holds NaN"):
        Trust.from_meta({**good, "detector": "mahalanobis"},
                        {"means": np.array([[0.0, np.nan]]), "precision": np.eye(2)}, num_classes=4)
