"""Model factory, weights (offline Lite0, URI loading, safety checks), transfer modes, packages.

No test needs the internet: HF_HUB_OFFLINE is set and every cache points into a temp folder.
Where the backbone does not matter, timm's tiny ``test_*`` models keep the tests fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import socket
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from braintumor_ray import CLASS_NAMES, ConfigError, InputError, MRIPreprocess
from braintumor_ray.models import (
    CACHE_ENV,
    PRESETS,
    Transfer,
    apply_transfer,
    backbone_stages,
    LITE_CHECKPOINTS,
    convert_lukemelas_lite,
    count_parameters,
    create_model,
    data_config,
    export_model_package,
    lite_offline_weights,
    load_model_package,
    param_groups,
    prepare_input,
)
from braintumor_ray.models import _weights
from braintumor_ray.models._lite import lukemelas_lite_checkpoint

LITE0 = "tf_efficientnet_lite0"
TINY = "test_efficientnet"  # 0.1M parameters, same family and head layout as EfficientNet


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv(CACHE_ENV, str(base / "bt-cache"))  # shared: Lite0 is converted once per session
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(base / "hf-empty"))
    monkeypatch.setenv("TORCH_HOME", str(base / "torch-empty"))


@pytest.fixture(scope="module")
def lukemelas_sd():
    return torch.load(lukemelas_lite_checkpoint(LITE0), map_location="cpu", weights_only=True)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


# --- offline Lite0 weights ----------------------------------------------------------------------


def test_lite0_conversion_maps_every_tensor(lukemelas_sd):
    converted = convert_lukemelas_lite(lukemelas_sd)
    target = timm.create_model(LITE0).state_dict()
    assert len(lukemelas_sd) == len(converted) == len(target) == 296
    assert converted.keys() == target.keys()  # nothing missing, nothing left over
    assert all(converted[k].shape == target[k].shape for k in target)
    # Each source tensor is used exactly once.
    assert sorted(map(id, converted.values())) == sorted(map(id, lukemelas_sd.values()))
    with pytest.raises(ConfigError, match=r"_blocks\.16\._bn0\.weight"):
        convert_lukemelas_lite({**lukemelas_sd, "_blocks.16._bn0.weight": torch.zeros(1)})


@pytest.mark.parametrize("arch", list(LITE_CHECKPOINTS))
def test_lite_logits_match_reference_implementation(arch, lukemelas_sd):
    from efficientnet_lite_pytorch import EfficientNet

    c = LITE_CHECKPOINTS[arch]
    sd = lukemelas_sd if c.variant == 0 else torch.load(lukemelas_lite_checkpoint(arch), map_location="cpu",
                                                        weights_only=True)
    ref = EfficientNet.from_name(f"efficientnet-lite{c.variant}")
    ref.load_state_dict(sd)
    # The offline default weights of the preset, through the public path.
    ours = create_model(arch, num_classes=1000, drop_rate=0.0)
    side = data_config(ours)["input_size"][-1]  # 224, 240, 260
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # plain efficientnet_lite* pads symmetrically, so the same weights give other logits
    other = timm.create_model(f"efficientnet_lite{c.variant}").eval()
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (other(x) - expected).abs().max() > 0.1


def test_lite0_sees_a_cat_in_chelsea():
    from PIL import Image
    from skimage.data import chelsea

    model = create_model(LITE0, num_classes=1000, drop_rate=0.0).eval()
    transform = timm.data.create_transform(**data_config(model))
    with torch.no_grad():
        top1 = int(model(transform(Image.fromarray(chelsea()))[None]).argmax())
    assert 281 <= top1 <= 285, top1  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_offline_weights_are_cached_and_loaded():
    path = lite_offline_weights(LITE0)
    assert path.startswith(os.environ[CACHE_ENV]) and path.endswith(".safetensors")
    mtime = os.stat(path).st_mtime_ns
    model = create_model(LITE0)  # 4 classes, pretrained, no hub: the offline copy
    assert os.stat(path).st_mtime_ns == mtime  # reused, not converted again
    assert model.get_classifier().out_features == len(CLASS_NAMES)
    ref = timm.create_model(LITE0)
    ref.load_state_dict(load_file(path))
    assert _state_equal(model, ref, skip=("classifier.",))


def test_lite0_cache_rebuilds_a_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = lite_offline_weights(LITE0)
    good = {k: v.clone() for k, v in load_file(path).items()}  # load_file maps the file: copy first
    with open(path, "r+b") as f:
        f.truncate(1000)  # as left by a killed worker
    assert lite_offline_weights(LITE0) == path
    again = load_file(path)
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)


# --- pretrained without a hub ---------------------------------------------------------------------


def test_no_hub_and_no_weights_is_a_clear_error_fast():
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"--weights.*--no-pretrained"):
        create_model("resnet50")
    assert time.monotonic() - start < 5
    create_model("test_resnet", pretrained=False)  # explicit random init is fine


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at its import
    monkeypatch.setattr(_weights, "_probe_cache", {})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(ConfigError, match="127.0.0.1:9/api/models/timm/test_resnet.* is not reachable"):
        create_model("test_resnet")
    assert time.monotonic() - start < 5


def test_probe_gives_up_on_a_silent_server(monkeypatch):
    # Accepts the connection, never answers: the probe's own time limit ends the wait.
    monkeypatch.setattr(_weights, "_probe_cache", {})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        start = time.monotonic()
        assert not _weights.reachable(f"http://127.0.0.1:{server.getsockname()[1]}/x", timeout=0.5)
        assert time.monotonic() - start < 2


def test_probe_needs_a_success_status(s3_endpoint, monkeypatch):
    # An intercepting proxy answers 403/404 for every host: that is not a reachable hub.
    monkeypatch.setattr(_weights, "_probe_cache", {})
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="probe")
    assert _weights.reachable(f"{s3_endpoint}/probe", timeout=5)
    assert not _weights.reachable(f"{s3_endpoint}/no-such-bucket", timeout=5)


def test_pretrained_from_local_hub_cache(tmp_path, monkeypatch):
    # An earlier online run left timm's weights in the HF cache: they load with no network.
    src = timm.create_model("test_resnet")
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(src.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    model = create_model("test_resnet")
    assert model.get_classifier().out_features == 4
    assert _state_equal(model, src, skip=("fc.",))


# --- weights from a URI ----------------------------------------------------------------------------


@pytest.fixture
def tiny_weights(tmp_path):
    src = create_model(TINY, pretrained=False)
    path = tmp_path / "tiny.safetensors"
    save_file(src.state_dict(), str(path))
    return src, path


def test_weights_from_local_safetensors_and_state_dict(tiny_weights, tmp_path):
    src, path = tiny_weights
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert _state_equal(create_model(TINY, weights=str(path), weights_sha256=sha), src)
    pth = tmp_path / "tiny.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, pth)  # a training checkpoint
    assert _state_equal(create_model(TINY, weights=str(pth)), src)


def test_weights_from_s3(tiny_weights, s3_endpoint, s3_bucket):
    import boto3

    src, path = tiny_weights
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(path), s3_bucket, "w/tiny.safetensors")
    model = create_model(TINY, weights=f"s3://{s3_bucket}/w/tiny.safetensors", s3_endpoint_url=s3_endpoint)
    assert _state_equal(model, src)


def test_weights_sha256_mismatch(tiny_weights):
    _, path = tiny_weights
    with pytest.raises(ConfigError, match="sha256 .* was expected"):
        create_model(TINY, weights=str(path), weights_sha256="0" * 64)
    with pytest.raises(ConfigError, match="64 hex digits"):
        create_model(TINY, weights=str(path), weights_sha256="abc")


def test_weights_key_mismatch_names_the_keys(tiny_weights, tmp_path):
    src, _ = tiny_weights
    sd = dict(src.state_dict())
    del sd["blocks.1.0.conv_exp.weight"]
    sd["blocks.9.0.extra.weight"] = torch.zeros(3)
    sd["conv_head.weight"] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ConfigError) as err:
        create_model(TINY, weights=str(bad))
    msg = str(err.value)
    assert "1 missing key(s): blocks.1.0.conv_exp.weight" in msg
    assert "1 unexpected key(s): blocks.9.0.extra.weight" in msg
    assert "conv_head.weight (1, 1, 1, 1)" in msg and "Only the classifier (classifier) may differ" in msg
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(other))
    with pytest.raises(ConfigError, match=r"do not fit the backbone test_efficientnet: \d+ missing"):
        create_model(TINY, weights=str(other))


def test_weights_head_may_differ(tmp_path):
    imagenet = timm.create_model(TINY, num_classes=1000)
    path = tmp_path / "in1k.safetensors"
    save_file(imagenet.state_dict(), str(path))
    torch.manual_seed(7)
    fresh = create_model(TINY, pretrained=False)
    torch.manual_seed(7)
    model = create_model(TINY, weights=str(path))
    sd, ref = model.state_dict(), imagenet.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in sd if not k.startswith("classifier."))
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)  # new head kept its init


class _RunsCode:
    """A pickle payload that creates a folder when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "x": _RunsCode(marker)}, zipped)
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"x": _RunsCode(marker)}))
    for path in (zipped, legacy):
        with pytest.raises(ConfigError, match="refusing to load weights.*weights_only=True"):
            create_model(TINY, weights=str(path))
        assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(zipped, weights_only=False)
    assert marker.is_dir()


# --- transfer modes and learning-rate groups ------------------------------------------------------


def _numel(model, prefixes):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def test_transfer_modes_freeze_exactly_what_they_say():
    model = create_model(LITE0, pretrained=False, transfer="full")
    total = count_parameters(model)
    assert count_parameters(model, trainable=True) == total == 3_376_132

    apply_transfer(model, "feature")
    assert count_parameters(model, trainable=True) == _numel(model, ("classifier.",)) == 1280 * 4 + 4

    # Lite0's stages: stem, blocks.0 .. blocks.5, then blocks.6 with the 1x1 head conv.
    assert len(backbone_stages(model)) == 8
    apply_transfer(model, "last-2")
    expected = _numel(model, ("classifier.", "blocks.5.", "blocks.6.", "conv_head.", "bn2."))
    assert count_parameters(model, trainable=True) == expected
    assert not model.blocks[4][0].conv_pw.weight.requires_grad and model.blocks[5][0].conv_pw.weight.requires_grad

    apply_transfer(model, Transfer("last", 8))
    assert count_parameters(model, trainable=True) == total
    with pytest.raises(ConfigError, match="only 8 stages"):
        apply_transfer(model, "last-9")
    for bad in ("last-0", "partial", "last-x"):
        with pytest.raises(ConfigError):
            Transfer.parse(bad)

    resnet = create_model("test_resnet", pretrained=False, transfer="feature")
    assert count_parameters(resnet, trainable=True) == _numel(resnet, ("fc.",))


def test_frozen_batchnorm_keeps_its_statistics():
    model = create_model(LITE0, pretrained=False, transfer="last-1")
    frozen_bn, live_bn = model.bn1, model.bn2  # stem (frozen), head conv's BN (last stage)
    before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    model.train()
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(live_bn.running_mean, before[1])
    assert model.conv_stem.weight.grad is None and model.conv_head.weight.grad is not None
    apply_transfer(model, "full")  # unfreezing lets the statistics move again
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(frozen_bn.running_mean, before[0])


def test_param_groups_give_the_backbone_a_lower_lr():
    model = create_model(LITE0, pretrained=False, transfer="last-2")
    groups = param_groups(model, lr=1e-3, backbone_lr_scale=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 1e-3 and by_name["backbone"]["lr"] == pytest.approx(1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    decayed = param_groups(model, lr=1e-3, weight_decay=0.05)
    assert all(p.ndim == 1 for g in decayed if g["weight_decay"] == 0 for p in g["params"])
    assert {g["name"] for g in decayed} == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    torch.optim.AdamW(decayed)  # accepted as they are
    with pytest.raises(ConfigError):
        param_groups(model, lr=0)


# --- factory options ---------------------------------------------------------------------------------


def test_presets_build_with_our_head():
    for preset, arch in PRESETS.items():
        model = create_model(preset, pretrained=False, drop_rate=0.3)
        assert model.pretrained_cfg["architecture"] == arch
        assert model.get_classifier().out_features == len(CLASS_NAMES)
        assert model.drop_rate == 0.3
    assert data_config(create_model("xception", pretrained=False))["input_size"] == (3, 299, 299)
    assert data_config(create_model(LITE0, pretrained=False))["mean"] == (0.5, 0.5, 0.5)


def test_bad_factory_arguments():
    with pytest.raises(ConfigError, match="unknown backbone.*efficientnet_b0"):
        create_model("efficientnet_b0x")
    with pytest.raises(ConfigError, match="without weights"):
        create_model(TINY, pretrained=False, weights_sha256="0" * 64)
    with pytest.raises(ConfigError, match="drop_rate"):
        create_model(TINY, pretrained=False, drop_rate=1.0)


def test_prepare_input_repeats_grey_and_normalises():
    x = prepare_input(np.array([[0, 255]], dtype=np.uint8), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert x.shape == (1, 3, 1, 2) and x.dtype == torch.float32
    assert torch.equal(x[0, :, 0, 0], torch.full((3,), -1.0)) and torch.equal(x[0, :, 0, 1], torch.ones(3))
    assert prepare_input(np.zeros((2, 8, 8), np.uint8), mean=(0,) * 3, std=(1,) * 3, channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )
    with pytest.raises(InputError):
        prepare_input(np.zeros((8, 8), np.float32), mean=(0,) * 3, std=(1,) * 3)


# --- exported model package ---------------------------------------------------------------------------


def _trained_tiny():
    model = create_model(TINY, pretrained=False)
    model.train()
    model(torch.randn(4, 3, 48, 48))  # move BN statistics off their defaults
    return model.eval()


def _pixels(n=3, side=64):
    return np.random.default_rng(0).integers(0, 256, (n, side, side), dtype=np.uint8)


def test_package_roundtrip_is_bit_identical(tmp_path):
    model = _trained_tiny()
    pre = MRIPreprocess(image_size=64)
    meta = export_model_package(model, str(tmp_path / "pkg"), preprocess=pre, metrics={"val_acc": np.float32(0.75)})
    assert sorted(os.listdir(tmp_path / "pkg")) == ["model.json", "model.onnx", "model.safetensors"]
    on_disk = (tmp_path / "pkg" / "model.json").read_text()
    assert on_disk == meta.text and json.loads(on_disk) == meta.document()  # the JSON exactly as written
    # Typed, parsed once: the fields as model.json has them.
    assert meta.backbone == TINY and meta.class_names == CLASS_NAMES and meta.num_classes == len(CLASS_NAMES)
    assert meta.preprocess == pre and dict(meta.metrics) == {"val_acc": 0.75} and meta.has_onnx
    cfg = data_config(model)
    assert meta.mean == tuple(cfg["mean"]) and tuple(meta.data_config["input_size"]) == (3, 160, 160)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.model_id = "0" * 16  # type: ignore[misc]
    with pytest.raises(TypeError):
        meta.data_config["mean"] = [0, 0, 0]  # type: ignore[index]
    assert pickle.loads(pickle.dumps(meta)) == meta and pickle.loads(pickle.dumps(meta)).text == meta.text

    pkg = load_model_package(str(tmp_path / "pkg"))
    assert pkg.model_id == meta.model_id and pkg.preprocess == pre and pkg.class_names == CLASS_NAMES
    assert pkg.meta == meta
    x = prepare_input(_pixels(), mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        assert torch.equal(pkg.logits(_pixels()), model(x))

    # The id is a content hash: same content (model.onnx exported again included), same id; other
    # crop settings, other id (compared without ONNX: an export with it costs ~3 s here).
    again = export_model_package(model, str(tmp_path / "pkg2"), preprocess=pre)
    assert again.model_id == meta.model_id
    plain = export_model_package(model, str(tmp_path / "pkg3"), preprocess=pre, onnx=False)
    other = export_model_package(model, str(tmp_path / "pkg4"), preprocess=MRIPreprocess(image_size=96), onnx=False)
    assert plain.model_id != other.model_id


def test_a_torch_replica_parses_model_json_once(package, monkeypatch):
    """Opened once: the engine choice, the weights and the trust file all take the one
    PackageMeta (main parsed model.json for the engine, then again to load the weights)."""
    from braintumor_ray.models import PackageMeta, load_inference_model

    real = PackageMeta.parse.__func__
    seen = []
    monkeypatch.setattr(PackageMeta, "parse", classmethod(lambda cls, text, uri: seen.append(uri) or real(cls, text, uri)))
    model = load_inference_model(package, engine="torch")
    assert model.engine == "torch" and len(seen) == 1, seen


def test_package_channels_last_roundtrip(tmp_path):
    model = _trained_tiny().to(memory_format=torch.channels_last)
    export_model_package(model, str(tmp_path / "pkg"), preprocess=MRIPreprocess())
    pkg = load_model_package(str(tmp_path / "pkg"), channels_last=True)
    cfg = pkg.data_config
    x = prepare_input(_pixels(), mean=cfg["mean"], std=cfg["std"], channels_last=True)
    with torch.no_grad():
        assert torch.equal(pkg.logits(_pixels()), model(x))


def test_package_on_s3(tmp_path, s3_endpoint, s3_bucket):
    model = _trained_tiny()
    uri = f"s3://{s3_bucket}/models/run1"
    # Without model.onnx: its export costs ~3 s, and every file goes through the same storage writer.
    meta = export_model_package(model, uri, preprocess=MRIPreprocess(), s3_endpoint_url=s3_endpoint, onnx=False)
    pkg = load_model_package(uri, s3_endpoint_url=s3_endpoint)
    assert pkg.model_id == meta.model_id and pkg.uri == uri
    cfg = pkg.data_config
    with torch.no_grad():
        assert torch.equal(pkg.logits(_pixels()), model(prepare_input(_pixels(), mean=cfg["mean"], std=cfg["std"])))


def test_package_tampering_is_detected(tmp_path):
    # No model.onnx: this is about model.json and the weights (tests/models/test_onnx.py tampers with the ONNX file).
    folder = tmp_path / "pkg"
    export_model_package(_trained_tiny(), str(folder), preprocess=MRIPreprocess(), onnx=False)
    meta = json.loads((folder / "model.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="edited after export"):
        load_model_package(str(folder))
    export_model_package(_trained_tiny(), str(folder), preprocess=MRIPreprocess(), onnx=False)
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="does not match the sha256"):
        load_model_package(str(folder))
