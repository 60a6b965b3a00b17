"""Class-conditional conformal prediction sets (issue 28): the finite-sample guarantee, per class
on imbalanced data, the package form, scoring in both engines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from braintumor_ray.core import ConfigError
from braintumor_ray.trust import (AMBIGUOUS, Conformal, Trust, TrustConfig, conformal_quantile, fit_conformal, fit_trust,
                                  nonconformity, softmax)


def _binomial_interval(n: int, p: float, level: float = 0.999) -> tuple[float, float]:
    lo, hi = binom.interval(level, n, p)
    return lo / n, hi / n


def _coverage_of(quantile, *, trials=4000, n=20, alpha=0.1, seed=0) -> float:
    """Share of trials whose one new score is within the quantile of its own n calibration
    scores (continuous, exchangeable): exactly ceil((n+1)(1-alpha))/(n+1) for the right quantile."""
    s = np.random.default_rng(seed).random((trials, n + 1))
    return float(np.mean([row[n] <= quantile(row[:n], alpha) for row in s]))


def test_coverage_on_exchangeable_data_is_within_its_binomial_bound():
    n, alpha, trials = 20, 0.1, 4000
    exact = math.ceil((n + 1) * (1 - alpha)) / (n + 1)  # 19/21 = 0.905
    lo, hi = _binomial_interval(trials, exact)
    got = _coverage_of(conformal_quantile, trials=trials, n=n, alpha=alpha)
    assert lo <= got <= hi, (got, lo, hi)
    # The same test refuses a quantile computed wrong: without the (n + 1) correction, and numpy's
    # interpolated quantile, both cover less than promised.
    naive = _coverage_of(lambda s, a: np.sort(s)[math.ceil(len(s) * (1 - a)) - 1], trials=trials, n=n, alpha=alpha)
    interpolated = _coverage_of(lambda s, a: np.quantile(s, 1 - a), trials=trials, n=n, alpha=alpha)
    assert not lo <= naive <= hi and not lo <= interpolated <= hi, (naive, interpolated, lo, hi)
    # Too few rows for the rank: nothing can be excluded.
    assert conformal_quantile(np.arange(5.0), 0.1) == float("inf")


def _generated(n, *, weights, signal, seed):
    """Labels with class ``weights`` and logits where class k's own logit is raised by signal[k]."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(weights), size=n, p=weights)
    logits = rng.normal(0, 1, size=(n, len(weights)))
    logits[np.arange(n), y] += np.asarray(signal)[y]
    return softmax(logits), y


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_cover_each_class_of_exchangeable_data(score):
    alpha = 0.1
    cal_p, cal_y = _generated(3000, weights=[0.4, 0.3, 0.2, 0.1], signal=[2.5, 2.0, 1.5, 2.0], seed=1)
    test_p, test_y = _generated(20000, weights=[0.4, 0.3, 0.2, 0.1], signal=[2.5, 2.0, 1.5, 2.0], seed=2)
    cp = fit_conformal(cal_p, cal_y, alpha=alpha, score=score)
    keep = cp.in_set(test_p)
    assert keep.any(axis=1).all()  # never an empty set
    for k in range(4):
        m = test_y == k
        lo, _ = _binomial_interval(int(m.sum()), 1 - alpha)
        # per class: at least 1 - alpha up to the test sample's noise and the calibration's (n_k >= 300)
        assert keep[m, k].mean() >= lo - 0.02, (score, k, keep[m, k].mean())
    assert keep.sum(axis=1).mean() < 4  # the sets do exclude classes


def test_marginal_under_covers_the_rare_class_and_class_conditional_does_not():
    alpha = 0.1
    w, sig = [0.48, 0.47, 0.05], [3.0, 3.0, 0.8]  # the rare class is also the hard one
    cal_p, cal_y = _generated(20000, weights=w, signal=sig, seed=3)  # ~1000 rare rows
    test_p, test_y = _generated(40000, weights=w, signal=sig, seed=4)
    marginal = fit_conformal(cal_p, cal_y, alpha=alpha, class_conditional=False).in_set(test_p)
    mondrian = fit_conformal(cal_p, cal_y, alpha=alpha).in_set(test_p)
    rare = test_y == 2
    assert marginal[np.arange(len(test_y)), test_y].mean() >= 1 - alpha - 0.01  # marginal holds on average...
    assert marginal[rare, 2].mean() < 1 - alpha - 0.1, marginal[rare, 2].mean()  # ...not for the rare class
    for k in range(3):
        m = test_y == k
        assert mondrian[m, k].mean() >= 1 - alpha - 0.03, (k, mondrian[m, k].mean())


def test_aps_score_is_the_mass_ranked_above_plus_own():
    p = np.array([[0.5, 0.3, 0.2]])
    assert np.allclose(nonconformity(p, "aps"), [[0.5, 0.8, 1.0]])
    assert np.allclose(nonconformity(p, "lac"), [[0.5, 0.7, 0.8]])
    with pytest.raises(ConfigError, match="unknown"):
        nonconformity(p, "raps")


def _fitted_trust(**cfg):
    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    x = rng.normal(0, 1, size=(400, 8)) + np.eye(4, 8)[y] * 3
    logits = x[:, :4] * 2
    return fit_trust(TrustConfig(**cfg), train_features=x, train_labels=y, val_logits=logits, val_features=x,
                     val_labels=y), logits, x


def test_trust_carries_sets_and_the_package_form_round_trips():
    trust, logits, x = _fitted_trust(conformal_alpha=0.2)
    cp = trust.conformal
    assert cp is not None and cp.alpha == 0.2 and cp.class_conditional and cp.counts == [50] * 4
    assert trust.report["val_rows_temperature"] == 200  # the other half fitted the temperature
    a = trust.assess(logits, x)
    sizes = a.in_set.sum(axis=1)
    for r, s, c in zip(a.review_reason, sizes, a.confidence):
        assert (r == AMBIGUOUS) == (s > 1 and r not in ("out_of_distribution", "low_confidence"))
    back = Trust.from_meta(trust.to_meta(), trust.arrays())
    b = back.assess(logits, x)
    assert np.array_equal(b.in_set, a.in_set) and b.review_reason == a.review_reason
    assert a.prediction_sets(["g", "m", "n", "p"])[0][0] in "gmnp"
    # No sets (conformal_fraction 0): the trust's package form is the one from before sets, so
    # an old package's model_id (a hash of it) is unchanged, and it loads without sets.
    old, _, _ = _fitted_trust(conformal_fraction=0.0)
    assert "conformal" not in old.to_meta() and old.conformal is None
    assert Trust.from_meta(old.to_meta(), old.arrays()).assess(logits, x).in_set is None


def test_unknown_key_in_the_stored_calibration_is_an_error():
    trust, _, _ = _fitted_trust()
    meta = trust.to_meta()
    meta["conformal"]["surprise"] = 1
    with pytest.raises(ConfigError, match="unknown conformal settings surprise"):
        Trust.from_meta(meta, trust.arrays())
    with pytest.raises(ConfigError, match="not valid"):
        Conformal.from_meta({**trust.conformal.to_meta(), "score": "raps"})


def test_infinite_threshold_is_stored_as_null():
    cp = fit_conformal(np.full((3, 2), 0.5), np.array([0, 0, 1]), alpha=0.05)
    meta = cp.to_meta()
    assert meta["thresholds"] == [None, None]
    assert Conformal.from_meta(meta).in_set(np.array([[0.99, 0.01]])).all()


# --- in the package and in scoring --------------------------------------------------------------

def _pixels(package_uri: str, n: int = 16) -> np.ndarray:
    from braintumor_ray.imaging import encode_png
    from braintumor_ray.models import load_inference_model
    from conftest import mri_like

    pre = load_inference_model(package_uri, engine="torch").preprocess
    return np.stack([pre(encode_png(im)).pixels for im in mri_like(n, seed=11)])


def test_both_engines_give_the_same_sets_from_the_package(trusted_package):
    from braintumor_ray.models import load_inference_model, load_model_package

    trust = load_model_package(trusted_package).trust
    assert trust.conformal is not None and trust.conformal.alpha == TrustConfig().conformal_alpha
    px = _pixels(trusted_package)
    got = {}
    for engine in ("torch", "onnxruntime"):
        m = load_inference_model(trusted_package, engine=engine)
        assert m.engine == engine and m.trust.to_meta() == trust.to_meta()
        a = m.trust.assess(*m.outputs(px))
        got[engine] = (a.in_set, a.review_reason)
    assert np.array_equal(got["torch"][0], got["onnxruntime"][0]) and got["torch"][1] == got["onnxruntime"][1]


def test_scoring_writes_sets_flags_ambiguous_rows_and_shows_them(ray_session, trusted_package, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from braintumor_ray.imaging import encode_png
    from braintumor_ray.score import ScoreConfig, run_scoring
    from conftest import mri_like
    from generators.medical import dicom_bytes, head12

    archive = tmp_path / "archive"
    (archive / "series").mkdir(parents=True)
    for i, im in enumerate(mri_like(8, seed=5)):
        (archive / f"{i}.png").write_bytes(encode_png(im))
    (archive / "broken.png").write_bytes(b"not an image")
    for i in range(4):
        (archive / "series" / f"{i}.dcm").write_bytes(dicom_bytes(head12(i), series="1.2.3.4", study="1.2.3", instance=i + 1))
    out = tmp_path / "preds"
    run_scoring(ScoreConfig(model=trusted_package, input=str(archive), output=str(out), batch_size=4))
    df = pd.read_parquet(out)
    ok = df[df.status == "ok"]
    assert len(ok) == 12 and df[df.status != "ok"].prediction_set.isna().all()
    for _, r in ok.iterrows():
        s = list(r.prediction_set)
        assert r.set_size == len(s) >= 1 and r.predicted_label in s
        assert (r.review_reason == AMBIGUOUS) == (len(s) > 1 and r.review_reason not in ("out_of_distribution", "low_confidence"))
    # The random-init model is unsure of everything: its sets are wide, and that is what flags its rows.
    assert (ok.review_reason == AMBIGUOUS).any()
    series = pq.read_table(str(out) + "_series/series.parquet").to_pylist()
    assert len(series) == 1
    st = series[0]
    # These 12-bit slices are out of distribution for the fixture's model: no slice votes, no set.
    assert st["review_reason"] == "out_of_distribution" and st["prediction_set"] is None and st["set_size"] is None
    html = (out / "_report.html").read_text()
    assert "Prediction-set size (ok rows)" in html and "<dt>prediction set</dt>" in html and "ambiguous" in html


def test_series_set_is_the_union_of_the_deciding_slices_sets():
    from braintumor_ray.score import series_verdict

    # classes glioma, meningioma, no_tumor, pituitary; 5 slices, the first 3 carry the tumour
    p = np.array([[0.7, 0.2, 0.05, 0.05], [0.6, 0.3, 0.05, 0.05], [0.5, 0.1, 0.3, 0.1], [0.05, 0.05, 0.85, 0.05],
                  [0.05, 0.05, 0.8, 0.1]])
    in_set = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    v = series_verdict(p, no_tumor=2, in_set=in_set)
    assert v.label == 0 and v.in_set == (True, True, False, False) and v.review_reason == AMBIGUOUS
    # a confident single-class set stands; low confidence wins over ambiguous; no sets, no set
    one = series_verdict(p, no_tumor=2, in_set=np.eye(4, dtype=bool)[[0, 0, 0, 2, 2]])
    assert one.in_set == (True, False, False, False) and one.review_reason is None
    assert series_verdict(p, no_tumor=2, in_set=in_set, review_threshold=0.99).review_reason == "low_confidence"
    assert series_verdict(p, no_tumor=2).in_set is None


def test_training_report_shows_coverage_set_sizes_and_each_examples_set(tmp_path):
    from braintumor_ray.core import CLASS_NAMES, resolve
    from braintumor_ray.report import Example, training_report_html
    from braintumor_ray.train import split_report
    from braintumor_ray.trust import coverage_report

    trust, logits, x = _fitted_trust()
    o = {"logits": logits, "features": x, "labels": np.arange(400) % 4}
    val = split_report(trust, o) | {"conformal": coverage_report(trust.conformal, softmax(logits, trust.temperature),
                                                                 o["labels"], CLASS_NAMES)}
    metrics = {"run": {"name": "r"}, "epochs": [], "best_epoch": 1,
               "trust": {"temperature": trust.temperature, "ood_detector": "mahalanobis", "review_threshold": 0.5,
                         "val": val, "conformal": trust.report["conformal"]}}
    ex = Example(true_label="glioma", predicted_label="glioma", confidence=0.6, prediction_set=("glioma", "meningioma"))
    html = training_report_html(metrics, resolve(str(tmp_path)), [ex])
    assert 'id="sets"' in html and "prediction-set size" in html and f"{val['conformal']['coverage']:.3f}" in html
    assert "<dt>prediction set</dt><dd>glioma, meningioma</dd>" in html
