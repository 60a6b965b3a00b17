"""benchmarks/accuracy_report.py (issue 38): the bootstrap figures, fast and without a model."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.accuracy_report import bootstrap, confusion_counts, markdown_table, metrics_of
from braintumor_ray.train import classification_metrics


def _preds(seed=0, n=300, k=4, right=0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < right, y, rng.integers(0, k, n))
    return y, p


def test_point_figures_are_the_training_jobs():
    y, p = _preds()
    m = metrics_of(confusion_counts(y, p, 4))
    ref = classification_metrics(y, np.eye(4)[p], ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(ref["accuracy"])
    assert m["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert m["recall"].tolist() == pytest.approx([ref["per_class"][c]["recall"] for c in "abcd"])


def test_batched_confusions_equal_one_at_a_time():
    y, p = _preds(1, n=50)
    idx = np.random.default_rng(2).integers(0, 50, (7, 50))
    many = confusion_counts(y, p, 4, idx)
    assert many.shape == (7, 4, 4)
    for b in range(7):
        np.testing.assert_array_equal(many[b], confusion_counts(y[idx[b]], p[idx[b]], 4))


def test_bootstrap_interval_holds_the_value_is_seeded_and_narrows_with_n():
    y, p = _preds(3, n=200)
    a = bootstrap(y, p, 4, resamples=1000, seed=7)
    assert a == bootstrap(y, p, 4, resamples=1000, seed=7)
    assert a != bootstrap(y, p, 4, resamples=1000, seed=8)
    for key in ("accuracy", "macro_f1"):
        v, lo, hi = a[key]
        assert lo < v < hi and 0 < hi - lo < 0.2
    assert all(lo <= v <= hi for v, lo, hi in a["recall"])
    # ~1.96 standard errors each side for a proportion: sqrt(0.8 * 0.2 / 200) = 0.028
    v, lo, hi = a["accuracy"]
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(v * (1 - v) / 200), rel=0.2)
    y4, p4 = np.tile(y, 4), np.tile(p, 4)
    b = bootstrap(y4, p4, 4, resamples=1000, seed=7)
    assert b["accuracy"][2] - b["accuracy"][1] < 0.6 * (hi - lo)
    with pytest.raises(ValueError, match="1000 or more"):
        bootstrap(y, p, 4, resamples=100)
    # A class no row of the split belongs to has no recall: "-" in the table, not 0.
    keep = y != 2
    c = bootstrap(y[keep], p[keep], 4, resamples=1000, seed=7)
    assert all(x != x for x in c["recall"][2]) and all(x == x for k in (0, 1, 3) for x in c["recall"][k])
    assert markdown_table([{"name": "m", "splits": {"test_clean": c}}], list("abcd")).count(" - |") == 1


def test_markdown_table_has_a_row_per_package_and_split():
    y, p = _preds(4, n=100)
    r = bootstrap(y, p, 4)
    text = markdown_table([{"name": "lite0", "splits": {"val": r, "test": r}}], ["glioma", "meningioma", "no_tumor",
                                                                                  "pituitary"])
    lines = text.splitlines()
    assert lines[0].startswith("| model | split | n | accuracy | macro-F1 | recall glioma")
    assert len(lines) == 4 and lines[2].startswith("| lite0 | val | 100 | ")
    assert f"{r['accuracy'][0]:.3f} [{r['accuracy'][1]:.3f}, {r['accuracy'][2]:.3f}]" in lines[2]


def test_the_notebooks_split_is_stratified_disjoint_and_seeded():
    from benchmarks.notebook_split import split

    files = {c: [f"Training/{c}/{i}.jpg" for i in range(n)] + [f"Testing/{c}/{i}.jpg" for i in range(n // 4)]
             for c, n in (("glioma", 80), ("no_tumor", 40))}
    parts = split(files, test_fraction=0.2, seed=0)
    for c, all_files in files.items():
        test, train = parts["Testing"][c], parts["Training"][c]
        assert sorted(test + train) == sorted(all_files) and not set(test) & set(train)
        assert len(test) == round(0.2 * len(all_files))
        assert any(f.startswith("Testing/") for f in train) and any(f.startswith("Training/") for f in test)  # pooled
    assert split(files, test_fraction=0.2, seed=0) == parts and split(files, test_fraction=0.2, seed=1) != parts
    with pytest.raises(SystemExit, match="between 0 and 1"):
        split(files, test_fraction=1.0, seed=0)


def test_the_offset_sweep_raises_one_class_and_lets_validation_pick():
    from benchmarks.accuracy_report import offset_sweep

    # Validation: class 0 is right at offset 0; a test split where class 0 needs +1 to be called.
    val = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    test = np.array([[0.0, 0.8], [0.0, 0.8], [0.0, 2.0], [0.0, 2.0]])
    labels = {"val": np.array([0, 1, 0, 1]), "test": np.array([0, 0, 1, 1])}
    rows, picked = offset_sweep({"val": val, "test": test}, labels, 0, offsets=(0.0, 1.0, 3.0))
    assert picked == 0.0  # a tie on validation (0 and 1 both perfect): the smallest offset
    by = {r["offset"]: r for r in rows}
    assert by[0.0]["test"][2] == 0.0 and by[1.0]["test"][2] == 1.0 and by[1.0]["test"][0] == 1.0
    assert by[3.0]["val"][0] == 0.5  # too far: validation's class 1 is called class 0
    rows, picked = offset_sweep({"val": val - [[2.5, 0]], "test": test}, labels, 0, offsets=(0.0, 1.0, 3.0))
    assert picked == 1.0  # validation itself needs the offset here
