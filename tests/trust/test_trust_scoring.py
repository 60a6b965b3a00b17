"""Scoring with a package that carries calibration and review flags: non-MRI inputs are flagged
out of distribution, MRI-like ones are not, a non-MR DICOM is skipped, thresholds round-trip."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest

from braintumor_ray.imaging import encode_png
from braintumor_ray.models import load_inference_model, load_model_package
from braintumor_ray.score import ScoreConfig, run_scoring
from conftest import mri_like


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _non_mri() -> dict[str, bytes]:
    import skimage.data as skd
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    out = {f"photo_{n}.png": _png(np.asarray(getattr(skd, n)())) for n in ("camera", "astronaut", "coffee", "chelsea", "moon")}
    out["page.png"] = _png(skd.page())
    out["noise.png"] = _png(rng.integers(0, 256, (128, 128), dtype=np.uint8))
    text = Image.new("L", (256, 256), 255)
    d = ImageDraw.Draw(text)
    for y in range(0, 250, 12):
        d.text((4, y), "lorem ipsum dolor sit amet consectetur", fill=0)
    out["text.png"] = _png(np.asarray(text))
    return out


@pytest.fixture(scope="module")
def scored(ray_session, trusted_package, tmp_path_factory):
    from generators.medical import dicom_bytes, head12

    root = tmp_path_factory.mktemp("trust_archive")
    archive = root / "archive"
    (archive / "mri").mkdir(parents=True)
    (archive / "other").mkdir()
    for i, im in enumerate(mri_like(12, seed=3)):
        (archive / "mri" / f"{i}.png").write_bytes(encode_png(im))
    for name, data in _non_mri().items():
        (archive / "other" / name).write_bytes(data)
    (archive / "blank_black.png").write_bytes(_png(np.zeros((96, 96), np.uint8)))
    (archive / "blank_white.png").write_bytes(_png(np.full((96, 96), 255, np.uint8)))
    (archive / "chest_cr.dcm").write_bytes(dicom_bytes(head12(1), modality="CR"))
    out = root / "preds"
    summary = run_scoring(ScoreConfig(model=trusted_package, input=str(archive), output=str(out), batch_size=8))
    return archive, out, pd.read_parquet(out), summary


def test_non_mri_images_are_flagged_and_mri_like_ones_are_not(scored):
    archive, out, df, _ = scored
    mri = df[df.path.str.contains(os.sep + "mri" + os.sep)]
    other = df[df.path.str.contains(os.sep + "other" + os.sep)]
    assert len(mri) == 12 and len(other) == 8 and (mri.status == "ok").all() and (other.status == "ok").all()
    assert (mri.review_reason != "out_of_distribution").all(), mri[["path", "ood_score"]]
    assert (other.review_reason == "out_of_distribution").all(), other[["path", "ood_score", "review_reason"]]
    assert other.ood_score.min() > mri.ood_score.max()
    probs = df.loc[df.status == "ok", [c for c in df.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(df.loc[df.status == "ok", "confidence"], probs.max(1), atol=1e-6)


def test_blank_images_are_errors_and_a_chest_radiograph_is_skipped(scored):
    _, _, df, summary = scored
    rows = {os.path.basename(p): r for p, r in zip(df.path, df.to_dict("records"))}
    for name in ("blank_black.png", "blank_white.png"):
        assert rows[name]["status"] == "error" and "no content" in rows[name]["error"]
    cr = rows["chest_cr.dcm"]
    assert cr["status"] == "skipped" and "not brain MR: modality CR" in cr["error"] and pd.isna(cr["predicted_label"])
    assert summary["not_selected"] == 1


def test_calibrated_probabilities_and_thresholds_round_trip(trusted_package, tmp_path):
    pkg = load_model_package(trusted_package)
    t = pkg.trust
    assert t is not None and t.detector == "mahalanobis" and np.isfinite(t.ood_threshold) and t.temperature > 0
    for engine in ("torch", "onnxruntime"):
        im = load_inference_model(trusted_package, engine=engine, threads=1)
        assert (im.trust.temperature, im.trust.ood_threshold, im.trust.review_threshold) == (
            t.temperature, t.ood_threshold, t.review_threshold)
    # a changed trust file is refused
    path = os.path.join(trusted_package, "trust.safetensors")
    copy = tmp_path / "model"
    import shutil

    shutil.copytree(trusted_package, copy)
    with open(copy / "trust.safetensors", "r+b") as f:
        f.seek(os.path.getsize(path) - 8)
        f.write(b"\x00" * 8)
    from braintumor_ray import ConfigError

    with pytest.raises(ConfigError, match="trust.safetensors"):
        load_model_package(str(copy))


def test_review_threshold_option_flags_low_confidence(scored, trusted_package, tmp_path):
    archive = scored[0] / "mri"
    out = tmp_path / "preds"
    run_scoring(ScoreConfig(model=trusted_package, input=str(archive), output=str(out), review_threshold=1.0))
    df = pd.read_parquet(out)
    assert (df.review_reason == "low_confidence").all()
