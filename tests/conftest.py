"""Shared fixtures: one local Ray session per test module, a real S3 server on loopback."""

from __future__ import annotations

import os
import uuid

import pytest

# Fake credentials for the moto server. Set before any Ray worker starts, because workers
# inherit the environment and build their own S3 clients. Instance-metadata lookups are
# switched off so botocore never reaches for a link-local address.
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ[_k] = _v
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# No test may reach a model hub; the tests that probe one point it at loopback themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Fixtures that start Ray: a test that uses one (directly or through another fixture) is marked
# `ray`, so that `pytest -m "not ray"` is the fast subset. Tests that start Ray some other way (a
# job in a subprocess) carry @pytest.mark.ray themselves; modules where every test needs Ray say
# so with pytestmark.
RAY_FIXTURES = {"ray_session", "cluster", "ray_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def start_ray(**kwargs):
    """A local Ray for one test module (2 CPUs, quiet); ``kwargs`` go to ``ray.init``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False, **kwargs)
    return ray


@pytest.fixture(scope="module")
def ray_session():
    ray = start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A small randomly initialised model (64 px), exported as users' packages are."""
    import torch

    from braintumor_ray import MRIPreprocess, create_model, export_model_package

    torch.manual_seed(0)
    model = create_model("resnet10t", pretrained=False, drop_rate=0.0)
    uri = str(tmp_path_factory.mktemp("pkg") / "model")
    export_model_package(model, uri, preprocess=MRIPreprocess(image_size=64))
    return uri


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"bt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def upload_tree(local_dir: str, endpoint: str, bucket: str, prefix: str) -> None:
    """Copy a local folder to s3://bucket/prefix with boto3 (not our own code under test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            key = f"{prefix}/{os.path.relpath(path, local_dir)}".replace(os.sep, "/")
            client.upload_file(path, bucket, key)


def mri_like(n: int, seed: int, size: int = 64):
    """``n`` generated MRI-like slices (uint8, size x size), labels cycling through the classes."""
    import numpy as np

    from braintumor_ray import CLASS_NAMES
    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(seed)
    return [render_mri(CLASS_NAMES[i % len(CLASS_NAMES)], rng, size=size)[0] for i in range(n)]


@pytest.fixture(scope="module")
def trusted_package(tmp_path_factory):
    """The ``package`` model (random init, 64 px) with a fitted trust: the OOD reference on the
    features of generated MRI-like images, calibration and thresholds on another set of them."""
    import numpy as np
    import torch

    from braintumor_ray import MRIPreprocess, create_model, export_model_package
    from braintumor_ray.imaging import encode_png
    from braintumor_ray.models import WithFeatures, data_config, prepare_input
    from braintumor_ray.trust import TrustConfig, fit_trust

    torch.manual_seed(0)
    model = create_model("resnet10t", pretrained=False, drop_rate=0.0).eval()
    pre = MRIPreprocess(image_size=64)
    dcfg = data_config(model)

    def outputs(images):
        px = np.stack([pre(encode_png(im)).pixels for im in images])
        with torch.inference_mode():
            lo, fe = WithFeatures(model)(prepare_input(px, mean=dcfg["mean"], std=dcfg["std"]))
        return lo.numpy(), fe.numpy()

    tr_lo, tr_fe = outputs(mri_like(160, seed=1))
    va_lo, va_fe = outputs(mri_like(120, seed=2))
    labels = np.arange(160) % 4
    trust = fit_trust(TrustConfig(ood_pass_rate=1.0), train_features=tr_fe, train_labels=labels,
                      val_logits=va_lo, val_features=va_fe, val_labels=np.arange(120) % 4)
    uri = str(tmp_path_factory.mktemp("trusted") / "model")
    export_model_package(model, uri, preprocess=pre, trust=trust)
    return uri
