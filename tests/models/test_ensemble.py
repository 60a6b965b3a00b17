"""Ensemble packages (issue 38): one package, one id, mean logits on both engines, trust on the ensemble."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from braintumor_ray import CLASS_NAMES, MRIPreprocess, create_model, export_model_package
from braintumor_ray.core import ConfigError
from braintumor_ray.models import (EnsembleNet, check_members, data_config, load_inference_model, load_model_package,
                                   member_build)
from braintumor_ray.trust import softmax
from tests.conftest import load_job


def _tiny(seed: int, backbone: str = "resnet10t"):
    torch.manual_seed(seed)
    return create_model(backbone, pretrained=False, drop_rate=0.0).eval()


def _ensemble(models):
    return EnsembleNet(models, data_configs=[data_config(m) for m in models], build=[member_build(m) for m in models],
                       input_size=64).eval()


@pytest.fixture(scope="module")
def second_package(tmp_path_factory):
    """Another member: a different backbone with another normalisation (Lite0: mean 0.5, std 0.5).
    No model.onnx: the ensemble is built from the members' weights and their logits are taken
    with PyTorch here (Lite0's export was the module setup's one ONNX file that nothing read)."""
    uri = str(tmp_path_factory.mktemp("member2") / "model")
    export_model_package(_tiny(1, "tf_efficientnet_lite0"), uri, preprocess=MRIPreprocess(image_size=64), onnx=False)
    return uri


@pytest.fixture(scope="module")
def built(ray_session, train_data_dir, package, second_package, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ens") / "ensemble")
    rc = load_job("ensemble").main(["--package", package, "--package", second_package, "--data", train_data_dir,
                                    "--output", out])
    assert rc == 0
    return out


def _member_logits(uris, pixels):
    return [load_inference_model(u, engine="torch").outputs(pixels)[0] for u in uris]


def test_ensemble_package_is_one_model_with_mean_logits(built, package, second_package):
    meta = json.load(open(os.path.join(built, "model.json")))
    assert [m["backbone"] for m in meta["members"]] == ["resnet10t", "tf_efficientnet_lite0"]
    assert [m["source"]["model_id"] for m in meta["members"]] == [
        json.load(open(os.path.join(u, "model.json")))["model_id"] for u in (package, second_package)]
    assert meta["onnx_in_id"] and "conformal" in meta["trust"] and meta["metrics"]["members"] == 2
    pixels = np.random.default_rng(3).integers(0, 256, (6, 64, 64), dtype=np.uint8)
    want = np.mean(_member_logits([package, second_package], pixels), axis=0)
    for engine in ("onnxruntime", "torch"):
        m = load_inference_model(built, engine=engine)
        logits, feats, cam = m.forward(pixels)
        assert m.model_id == meta["model_id"] and m.has_maps
        np.testing.assert_allclose(logits, want, atol=1e-4)
        assert cam.shape[:2] == (6, len(CLASS_NAMES)) and feats.shape[0] == 6


def test_scoring_an_ensemble_gives_the_members_mean(built, package, second_package, tmp_path):
    from braintumor_ray.imaging import encode_png
    from braintumor_ray.score import PROB_PREFIX, ScoreConfig, run_scoring
    from tests.conftest import mri_like

    archive = tmp_path / "archive"
    archive.mkdir()
    for i, im in enumerate(mri_like(4, seed=5, size=96)):
        (archive / f"img{i}.png").write_bytes(encode_png(im))
    pkg = load_model_package(built)
    files = sorted(archive.iterdir())
    pixels = np.stack([pkg.preprocess(f.read_bytes()).pixels for f in files])
    want = softmax(np.mean(_member_logits([package, second_package], pixels), axis=0), pkg.trust.temperature)
    # Flip TTA (off by default): the mean of the image's and its mirror's logits, end to end.
    flip = softmax(np.mean(_member_logits([package, second_package], pixels)
                           + _member_logits([package, second_package], pixels[:, :, ::-1].copy()), axis=0),
                   pkg.trust.temperature)
    for engine, tta, want in (("onnxruntime", "none", want), ("torch", "none", want), ("onnxruntime", "flip", flip)):
        out = str(tmp_path / f"pred-{engine}-{tta}")
        summary = run_scoring(ScoreConfig(model=built, input=str(archive), output=out, engine=engine, explain="all",
                                          tta=tta))
        assert summary["scored"] == 4 and summary["engine"] == engine
        rows = {os.path.basename(r["path"]): r for r in pads.dataset(out, format="parquet").to_table().to_pylist()}
        got = np.array([[rows[f.name][PROB_PREFIX + c] for c in CLASS_NAMES] for f in files])
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert {r["model_id"] for r in rows.values()} == {pkg.model_id}
        assert all(r["heatmap_path"] for r in rows.values())  # the ensemble's averaged maps


def test_ensemble_id_covers_every_member(tmp_path):
    pre = MRIPreprocess(image_size=64)
    a, b = _tiny(0), _tiny(1)
    ids = [export_model_package(_ensemble([a, b]), str(tmp_path / f"e{i}"), preprocess=pre, onnx=False).model_id
           for i in range(2)]
    assert ids[0] == ids[1]  # the same members: the same model
    with torch.no_grad():
        b.get_classifier().bias.add_(1e-3)
    changed = export_model_package(_ensemble([a, b]), str(tmp_path / "e2"), preprocess=pre, onnx=False)
    assert changed.model_id != ids[0]
    # The loaded ensemble is the exported one: mean logits of its members.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(load_model_package(str(tmp_path / "e2")).model(x).numpy(),
                                   ((a(x) + b(x)) / 2).numpy(), atol=1e-5)


def test_ensemble_maps_of_different_grids_are_resized_and_averaged():
    a, b = _tiny(0), _tiny(1)
    net = _ensemble([a, b])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (la, _, ca), (lb, _, cb) = net.member_outputs(x, maps=True)
        cb = torch.nn.functional.avg_pool2d(cb, 2)  # as if member b's grid were coarser
        net.member_outputs = lambda x, maps: [(la, la, ca), (lb, lb, cb)]
        _, _, cam = net.ensemble_outputs(x, maps=True)
    assert cam.shape == ca.shape
    up = torch.nn.functional.interpolate(cb, size=ca.shape[2:], mode="bilinear", align_corners=False)
    np.testing.assert_allclose(cam.numpy(), ((ca + up) / 2).numpy(), atol=1e-6)


def test_mismatched_member_is_refused_naming_member_and_field():
    first = {"class_names": list(CLASS_NAMES), "preprocess": MRIPreprocess(image_size=64).to_dict()}
    other = dict(first, class_names=list(reversed(CLASS_NAMES)))
    with pytest.raises(ConfigError, match=r"member runs/b/model has class_names"):
        check_members([first, other], ["runs/a/model", "runs/b/model"])
    bigger = dict(first, preprocess=MRIPreprocess(image_size=96).to_dict())
    with pytest.raises(ConfigError, match=r"member runs/c/model has preprocess"):
        check_members([first, first, bigger], ["runs/a/model", "runs/b/model", "runs/c/model"])
    with pytest.raises(ConfigError, match="at least 2 members"):
        check_members([first], ["runs/a/model"])


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_flip_tta_gives_the_mean_of_the_two_passes(package, engine):
    pixels = np.random.default_rng(4).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    plain = load_inference_model(package, engine=engine)
    tta = load_inference_model(package, engine=engine, tta="flip")
    lo, fe, cam = plain.forward(pixels)
    lo_m, fe_m, cam_m = plain.forward(pixels[:, :, ::-1].copy())
    got_lo, got_fe, got_cam = tta.forward(pixels)
    np.testing.assert_allclose(got_lo, (lo + lo_m) / 2, atol=1e-5)
    np.testing.assert_allclose(got_fe, (fe + fe_m) / 2, atol=1e-5)
    np.testing.assert_allclose(got_cam, (cam + cam_m[..., ::-1]) / 2, atol=1e-5)
    assert np.abs(got_lo - lo).max() > 1e-4  # the mirror does change the logits of these images
    np.testing.assert_allclose(tta.probabilities(pixels), softmax((lo + lo_m) / 2), atol=1e-6)
    with pytest.raises(ConfigError, match="tta='rotate'"):
        load_inference_model(package, engine=engine, tta="rotate")
