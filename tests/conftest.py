"""Shared fixtures: one local Ray session per test module, a real S3 server on loopback."""

from __future__ import annotations

import contextlib
import json
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
RAY_FIXTURES = {"ray_session", "cluster", "ray_head", "train_data_dir"}


# Modules that connect the test process to a Ray of their own (a Cluster) run last, after the
# session's Ray is shut down for them.
OWN_RAY_MODULES = ("test_multinode.py",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: item.path.name in OWN_RAY_MODULES)  # stable: the rest keep their order


def start_ray(**kwargs):
    """A local Ray (2 CPUs, quiet); ``kwargs`` go to ``ray.init``."""
    import ray

    ray.init(**{"num_cpus": 2, "include_dashboard": False, "configure_logging": False, "log_to_driver": False, **kwargs})
    return ray


# The test hooks that the session's Ray hands to every worker (Ray Train's and Ray Data's included).
# Each is armed for one name only, so it is inert for every other test: the training failure for the
# run named TRAIN_FAILING_RUN (tests/test_train.py), the decode kill for files named KILL_DECODE_FILE
# (tests/test_hostile.py).
INJECT_FAILURE_ENV = "BRAINTUMOR_TEST_INJECT_FAILURE"  # read by braintumor_ray.train's worker
TRAIN_FAILING_RUN = "t"
KILL_DECODE_FILE = "killme.png"


@pytest.fixture(scope="session")
def failure_marker(tmp_path_factory):
    """The file the training failure hook writes when it fires (it fires once per session)."""
    return str(tmp_path_factory.mktemp("hook") / "failed-once")


@pytest.fixture(scope="session")
def ray_session(failure_marker):
    """One local Ray for the whole session (a start costs 10-20 s here, and 13 modules used to
    start their own). With the dashboard: Ray Train's placement-group cleaner asks the State API
    (served by the dashboard) whether a trial's Train controller is gone, and without it the worker
    groups of finished trials keep their CPUs for the rest of the session. The armed test hooks
    ride in every worker's environment. tests/test_multinode.py shuts it down for its own Cluster
    (it runs last, see pytest_collection_modifyitems)."""
    import ray

    from braintumor_ray.score._decode import KILL_DECODE_ENV

    if ray.is_initialized():  # something ran ray.init() itself: make it the session's Ray
        ray.shutdown()
    hook = {"marker": failure_marker, "epoch": 2, "rank": 1, "step": 1, "name": TRAIN_FAILING_RUN}
    start_ray(include_dashboard=True,
              runtime_env={"env_vars": {INJECT_FAILURE_ENV: json.dumps(hook), KILL_DECODE_ENV: KILL_DECODE_FILE}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    """A small randomly initialised model (64 px), exported as users' packages are (with
    model.onnx: 6-60 s here, once per session). Shared: a test that tampers with it copies it first."""
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


def load_job(name: str):
    """jobs/NAME.py as a module, imported as users run it (its ``main(args)`` returns the exit
    code): the in-process way to run a job's error paths and reruns."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mri_like(n: int, seed: int, size: int = 64):
    """``n`` generated MRI-like slices (uint8, size x size), labels cycling through the classes."""
    import numpy as np

    from braintumor_ray import CLASS_NAMES
    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(seed)
    return [render_mri(CLASS_NAMES[i % len(CLASS_NAMES)], rng, size=size)[0] for i in range(n)]


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory, request):
    """One generated sample, ingested once for the session's training, search and tracking tests
    (each module used to ingest its own: ~20 s apiece). Read only: a test writes its runs elsewhere."""
    import ray

    from braintumor_ray import MRIPreprocess, make_sample_dataset
    from braintumor_ray.ingest import IngestConfig, run_ingest

    if not ray.is_initialized():  # the session's Ray, unless a module's own Cluster is connected
        request.getfixturevalue("ray_session")
    root = tmp_path_factory.mktemp("train-data")
    make_sample_dataset(str(root / "sample"), per_class=30, test_per_class=8, size=96, leaks=2, seed=1)
    out = str(root / "pre")
    run_ingest(IngestConfig(input=str(root / "sample"), output=out, preprocess=MRIPreprocess(image_size=64)))
    return out


@contextlib.contextmanager
def serve(cmd: list[str], *, ready: str, log_path, what: str, timeout: float, poll: float, cwd, env=None):
    """A server in a process group of its own, up once ``ready`` answers 200; stopped with its
    children (mlflow's uvicorn and huey workers outlived a kill of the parent alone)."""
    import signal
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)

    def stop(sig) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    try:
        deadline = time.time() + timeout
        while True:
            try:
                if urllib.request.urlopen(ready, timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                stop(signal.SIGKILL)
                pytest.fail(f"{what} did not start: " + open(log_path, errors="replace").read()[-2000:])
            time.sleep(poll)
        yield proc
    finally:
        stop(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            stop(signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1: SQLite in tmp, artifacts proxied to a local folder; yields
    (tracking URI, artifact folder). One for the session: tests/test_mlflow.py and the search in
    tests/test_tune.py log to it, each into experiments of its own."""
    import sys

    from _net import free_port

    root = tmp_path_factory.mktemp("mlflow")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(artifacts)]
    with serve(cmd, ready=f"{uri}/health", log_path=root / "server.log", what="mlflow server", timeout=90, poll=0.5,
               cwd=root, env=env):
        yield uri, artifacts


@pytest.fixture(scope="session")
def mlflow_client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server[0], registry_uri=mlflow_server[0])


@pytest.fixture
def old_package(package, tmp_path):
    """The ``package`` as exported before its model.onnx was bound to its id (same files, the
    older model.json): another model id."""
    import json
    import shutil

    from braintumor_ray.models import package_model_id as _identity

    old = str(tmp_path / "old")
    shutil.copytree(package, old)
    meta = json.load(open(os.path.join(old, "model.json")))
    meta.pop("onnx_in_id")
    meta["model_id"] = _identity(meta)
    open(os.path.join(old, "model.json"), "w").write(json.dumps(meta))
    return old


ORTHANC = "/usr/sbin/Orthanc"  # Debian's orthanc package (scripts/setup.sh --dev installs it)
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
PACS_AET, SCORER_AET = "TESTPACS", "BRAINTUMOR"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real PACS on loopback: Debian's Orthanc with its DICOMweb plugin, storage and index in tmp,
    on free ports. It takes C-STOREs only from SCORER_AET at 127.0.0.1 (the configuration
    docs/scoring.md gives PACS administrators). Yields {"dicom": dicom://..., "web": REST root,
    "stow": DICOMweb root}. Starts in ~1 s."""
    from _net import free_port

    root = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "braintumor-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "DicomAet": PACS_AET, "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True, "DicomModalities": {"scorer": [SCORER_AET, "127.0.0.1", 104]},
        "Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    web = f"http://127.0.0.1:{http_port}"
    with serve([ORTHANC, str(root / "orthanc.json")], ready=f"{web}/system", log_path=root / "orthanc.log",
               what="Orthanc", timeout=60, poll=0.2, cwd=root):
        yield {"dicom": f"dicom://{PACS_AET}@127.0.0.1:{dicom_port}", "web": web, "stow": f"{web}/dicom-web",
               "log": root / "orthanc.log"}
