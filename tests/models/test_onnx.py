"""The ONNX half of a model package and scoring's engine choice (--engine auto|onnxruntime|torch)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from braintumor_ray import CLASS_NAMES, ConfigError, make_sample_dataset
from braintumor_ray.core import PackageIntegrityError, cli_options
from braintumor_ray.models import (
    ENGINES,
    ONNX_FILE,
    ONNX_TOLERANCE,
    choose_engine,
    create_model,
    export_model_package,
    load_inference_model,
    load_model_package,
    verify_onnx,
)
from braintumor_ray.score import PROB_PREFIX, Predictor, ScoreConfig, run_scoring


def _pixels(n: int, side: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8)


def _old_package(package: str, dst: str) -> str:
    """The fixture package as today's code wrote it before ONNX: no model.onnx, no onnx keys."""
    shutil.copytree(package, dst)
    os.remove(os.path.join(dst, ONNX_FILE))
    meta = json.loads(open(os.path.join(dst, "model.json")).read())
    for k in [k for k in meta if k.startswith("onnx_")]:
        del meta[k]
    meta["versions"].pop("onnxruntime", None)
    from braintumor_ray.models import package_model_id as _identity

    meta["model_id"] = _identity(meta)  # without model.onnx, the id of an onnx=False export
    open(os.path.join(dst, "model.json"), "w").write(json.dumps(meta, indent=2, sort_keys=True))
    return dst


def _tampered(package: str, dst: str) -> str:
    shutil.copytree(package, dst)
    blob = bytearray(open(os.path.join(dst, ONNX_FILE), "rb").read())
    blob[len(blob) // 2] ^= 0x01  # one bit of one weight
    open(os.path.join(dst, ONNX_FILE), "wb").write(bytes(blob))
    return dst


def test_exported_onnx_agrees_with_pytorch(package):
    meta = json.loads(open(os.path.join(package, "model.json")).read())
    assert meta["onnx_file"] == ONNX_FILE and len(meta["onnx_sha256"]) == 64 and meta["onnx_opset"] >= 17
    assert 0 <= meta["onnx_probe_max_abs_diff"] <= ONNX_TOLERANCE
    ort = load_inference_model(package, engine="onnxruntime", threads=1)
    pt = load_inference_model(package, engine="torch")
    assert (ort.engine, pt.engine) == ("onnxruntime", "torch") and ort.model_id == pt.model_id == meta["model_id"]
    for n in (1, 5, 33):  # the batch axis is dynamic
        a, b = ort.probabilities(_pixels(n)), pt.probabilities(_pixels(n))
        assert a.shape == b.shape == (n, len(CLASS_NAMES)) and a.dtype == np.float32
        assert np.abs(a - b).max() <= ONNX_TOLERANCE
        assert (a.argmax(1) == b.argmax(1)).all()
    # And against the package's own eager model, as training evaluates it.
    pkg = load_model_package(package)
    with torch.inference_mode():
        ref = torch.softmax(pkg.logits(_pixels(4)), 1).numpy()
    assert np.abs(ort.probabilities(_pixels(4)) - ref).max() <= ONNX_TOLERANCE


def test_onnx_is_part_of_the_model_id(package, tmp_path):
    """model.onnx's hash is one of the id's inputs (issue 25): the id names the exact file. The
    export with ONNX is the session's package (an export of its own cost this test an ONNX export,
    the slowest step of the fast subset's package tests); the one without is its model again."""
    pkg = load_model_package(package)
    with_onnx = pkg.meta
    without = export_model_package(pkg.model, str(tmp_path / "b"), preprocess=pkg.preprocess, onnx=False)
    assert without.document()["weights_sha256"] == with_onnx.document()["weights_sha256"]  # the same weights
    assert with_onnx.model_id != without.model_id and with_onnx.onnx_in_id and "onnx_in_id" not in without.document()
    assert sorted(os.listdir(package)) == ["model.json", "model.onnx", "model.safetensors"]
    assert sorted(os.listdir(tmp_path / "b")) == ["model.json", "model.safetensors"]
    # Re-exporting without ONNX over a package with it leaves no stale model.onnx behind.
    shutil.copytree(package, tmp_path / "a")
    export_model_package(pkg.model, str(tmp_path / "a"), preprocess=pkg.preprocess, onnx=False)
    assert not (tmp_path / "a" / ONNX_FILE).exists()


def test_export_fails_with_the_figure_when_onnx_disagrees(tmp_path, monkeypatch):
    from braintumor_ray import MRIPreprocess
    from braintumor_ray.models import _onnx

    monkeypatch.setattr(_onnx, "ONNX_TOLERANCE", -1.0)  # any difference, even 0, is too much
    model = create_model("resnet10t", pretrained=False, drop_rate=0.0)
    with pytest.raises(ConfigError, match=r"max abs difference of probabilities .* above -1"):
        export_model_package(model, str(tmp_path / "p"), preprocess=MRIPreprocess(image_size=32))
    assert not (tmp_path / "p").exists()  # nothing written


def test_engine_choice():
    assert choose_engine("auto", has_onnx=True, use_gpu=False) == "onnxruntime"
    assert choose_engine("auto", has_onnx=True, use_gpu=True) == "torch"
    assert choose_engine("auto", has_onnx=False, use_gpu=False) == "torch"
    assert choose_engine("torch", has_onnx=True, use_gpu=False) == "torch"
    with pytest.raises(ConfigError, match="needs a package with model.onnx"):
        choose_engine("onnxruntime", has_onnx=False, use_gpu=False)
    # One list of engines: the setting's choices are the models' list, and the option is generated.
    opt = next(o for o in cli_options(ScoreConfig) if o.key == "engine")
    assert opt.flags == ("--engine",) and opt.choices == ENGINES and opt.default == "auto" and "onnxruntime" in opt.help
    with pytest.raises(ConfigError, match="engine='tensorrt' is unknown"):
        ScoreConfig(model="m", input="i", output="o", engine="tensorrt")


def test_tampered_or_missing_onnx_is_refused(package, archive, tmp_path):
    bad = _tampered(package, str(tmp_path / "tampered"))
    with pytest.raises(ConfigError, match=r"tampered/model\.onnx does not match the sha256 in model.json") as e:
        load_inference_model(bad, engine="onnxruntime")
    # The file and both hashes as fields (PackageIntegrityError is a ConfigError: the same exit).
    want = json.load(open(os.path.join(bad, "model.json")))["onnx_sha256"]
    got = hashlib.sha256(open(os.path.join(bad, ONNX_FILE), "rb").read()).hexdigest()
    assert isinstance(e.value, PackageIntegrityError) and e.value.file == os.path.join(bad, ONNX_FILE)
    assert (e.value.expected, e.value.actual) == (want, got) and want != got
    with pytest.raises(PackageIntegrityError, match=r"model\.onnx does not match"):
        verify_onnx(bad)
    # Scoring refuses it before any work: the output is never touched.
    with pytest.raises(ConfigError, match=r"tampered/model\.onnx does not match the sha256"):
        run_scoring(ScoreConfig(model=bad, input=archive, output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    # The torch engine does not read the file, and still loads (and scores it through the job:
    # test_engines_agree_through_run_scoring's torch run).
    assert load_inference_model(bad, engine="torch").engine == "torch"
    gone = str(tmp_path / "half-copied")
    shutil.copytree(package, gone)
    os.remove(os.path.join(gone, ONNX_FILE))
    with pytest.raises(PackageIntegrityError, match=r"half-copied/model\.onnx is missing") as e:
        load_inference_model(gone, engine="auto")
    assert e.value.actual is None and e.value.expected == want


def _rows(out: str) -> dict[str, dict]:
    return {r["path"]: r for r in pads.dataset(out, format="parquet").to_table().to_pylist()}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("onnx") / "archive")
    make_sample_dataset(root, per_class=3, test_per_class=0, leaks=0, size=96, seed=3)
    open(os.path.join(root, "notes.txt"), "w").write("not an image")
    return root


def test_engines_agree_through_run_scoring(ray_session, package, archive, tmp_path):
    """Both engines through the job give the same rows and schema; auto picks onnxruntime for a
    package with model.onnx, and a package from before ONNX scores with torch (was
    test_package_without_onnx_still_scores, whose second run was this test's auto run). The torch
    run scores a copy whose model.onnx is tampered with: a file that engine does not read is not
    its concern (the other engines refuse it: test_tampered_or_missing_onnx_is_refused), and its
    rows are the intact package's. The auto run is the onnxruntime side (an explicit
    ``engine="onnxruntime"`` run scored the same rows a third time; the explicit choice through the
    job: tests/models/test_ensemble.py::test_scoring_an_ensemble_gives_the_members_mean)."""
    outs, summaries = {}, {}
    tampered = _tampered(package, str(tmp_path / "tampered"))
    for engine in ("torch", "auto"):
        outs[engine] = str(tmp_path / engine)
        model = tampered if engine == "torch" else package
        summaries[engine] = run_scoring(ScoreConfig(model=model, input=archive, output=outs[engine], batch_size=4, engine=engine))
    assert [summaries[e]["engine"] for e in ("torch", "auto")] == ["torch", "onnxruntime"]
    assert summaries["torch"]["scored"] == 12
    t, o = _rows(outs["torch"]), _rows(outs["auto"])
    assert t.keys() == o.keys() and len(t) == summaries["torch"]["files_seen"] == 13
    ok = [p for p in t if t[p]["status"] == "ok"]
    assert len(ok) == 12 and o[os.path.join(archive, "notes.txt")]["status"] == "error"
    for p in t:
        a, b = t[p], o[p]
        assert (a["predicted_label"], a["status"], a["model_id"]) == (b["predicted_label"], b["status"], b["model_id"])
    pa = np.array([[t[p][PROB_PREFIX + c] for c in CLASS_NAMES] for p in ok])
    pb = np.array([[o[p][PROB_PREFIX + c] for c in CLASS_NAMES] for p in ok])
    assert np.abs(pa - pb).max() <= ONNX_TOLERANCE
    # The heat maps (--explain flagged) come from each engine's own forward pass: the same peaks.
    mapped = [p for p in ok if t[p]["heatmap_path"] is not None]
    assert mapped and [o[p]["heatmap_path"] is not None for p in mapped] == [True] * len(mapped)
    for p in mapped:
        assert abs(t[p]["heatmap_peak_x"] - o[p]["heatmap_peak_x"]) <= 1, p
        assert abs(t[p]["heatmap_peak_y"] - o[p]["heatmap_peak_y"]) <= 1, p
    # Identical schema whichever engine ran.
    schemas = {e: pads.dataset(outs[e], format="parquet").schema for e in outs}
    assert schemas["torch"] == schemas["auto"]

    # A package as exported before ONNX: auto scores it with torch, the same labels under another id.
    old = _old_package(package, str(tmp_path / "old-package"))
    summary = run_scoring(ScoreConfig(model=old, input=archive, output=str(tmp_path / "old-out")))
    assert summary["engine"] == "torch" and summary["scored"] == 12
    new = summaries["auto"]  # the package with model.onnx, default engine
    # model.onnx is one of the id's inputs (issue 25): the package with it is another id.
    assert summary["model_id"] != new["model_id"]
    a, b = _rows(str(tmp_path / "old-out")), _rows(outs["auto"])
    assert {p: r["predicted_label"] for p, r in a.items()} == {p: r["predicted_label"] for p, r in b.items()}


def test_a_package_without_onnx_refuses_engine_onnxruntime(ray_session, package, archive, tmp_path):
    old = _old_package(package, str(tmp_path / "old-package"))
    with pytest.raises(ConfigError, match="needs a package with model.onnx"):
        run_scoring(ScoreConfig(model=old, input=archive, output=str(tmp_path / "x"), engine="onnxruntime"))


def test_model_actor_threads_follow_its_cpus(ray_session, package):
    """Each replica runs as many intra-op threads as the CPUs Ray gave it, in either engine."""
    from braintumor_ray.score import actor_threads

    assert actor_threads() == 1  # the driver is no actor: one thread

    @ray_session.remote
    class Probe:
        def __init__(self, plan):
            self.p = Predictor(plan)

        def threads(self):
            import onnxruntime  # noqa: F401

            s = self.p.model._run
            ort_threads = int(s.get_session_options().intra_op_num_threads) if self.p.model.engine == "onnxruntime" else None
            return self.p.threads, torch.get_num_threads(), ort_threads

    for engine in ("onnxruntime", "torch"):
        a = Probe.options(num_cpus=2).remote(_plan_for(package, engine))
        threads, torch_threads, ort_threads = ray_session.get(a.threads.remote())
        assert threads == torch_threads == 2 and ort_threads in (2, None)
        ray_session.kill(a)


def _plan_for(package: str, engine: str, *, files: dict | None = None, explain: str = "none", explain_stage_uri: str = ""):
    """A scoring plan for ``package`` on ``engine`` (a replica's own arguments): nothing to score,
    or ``files`` (path -> (size, version)) with their maps (``explain``) staged at ``explain_stage_uri``."""
    from datetime import datetime, timezone

    from braintumor_ray.core import Identifiers, resolve
    from braintumor_ray.models import pin_package, verify_package
    from braintumor_ray.score import plan_scoring, rerun_diff

    meta = verify_package(package)
    pin = pin_package(resolve(package), meta, with_onnx=engine == "onnxruntime")
    cfg = ScoreConfig(model=package, input="/nonexistent/in", output="/nonexistent/out", explain=explain)
    files = files or {}
    diff = rerun_diff(files, {p: p for p in files}, {}, model_id=meta.model_id, selection="", retry_errors=0)
    return plan_scoring(config=cfg, run_id="r", input_uri=cfg.input, output_uri=cfg.output, uri_prefix="", pin=pin,
                        engine=engine, meta=meta, preprocess=meta.preprocess, identifiers=Identifiers(),
                        diff=diff, refused={}, explain_stage_uri=explain_stage_uri, explain_final_uri="/final", cluster=None,
                        scored_at=datetime.now(timezone.utc))


def test_replica_layout_leaves_cpus_to_decode():
    """On CPUs the model gets 3/4 of the cluster in replicas of ~2 threads, decode the rest;
    a layout that would leave decoding (and reading, writing) no CPU is refused, not hung."""
    from braintumor_ray.score import plan_replicas

    def plan(cpus, gpus=0, nodes=None, **kw):
        return plan_replicas(ScoreConfig(model="m", input="i", output="o", **kw), cpus=cpus, gpus=gpus, node_cpus=nodes)

    assert plan(2) == (1, 1.5)  # the fastest layout measured on 2 vCPUs: 2 threads + 0.5 CPU decoding
    assert plan(1) == (1, 0.49)  # not 0.5: equal to the decode stage's, Ray Data would fuse the two
    assert plan(16) == (6, 2.0)
    assert plan(2, concurrency=2) == (2, 0.75) and plan(2, concurrency=3) == (3, 0.49)
    assert plan(8, cpus_per_replica=1) == (6, 1)
    assert plan(2, 1, use_gpu=True) == (1, 1.0) and plan(8, 2, use_gpu=True) == (2, 1.0)
    # Replicas must fit a node: three 1-CPU workers (and a 0-CPU head) get half-CPU replicas.
    assert plan(3, nodes=[0, 1, 1, 1]) == (3, 0.49) and plan(3, nodes=[0, 1, 1, 1], concurrency=2) == (2, 0.49)
    assert plan(32, nodes=[16, 16]) == (12, 2.0)
    with pytest.raises(ConfigError, match="would wait forever"):
        plan(2, cpus_per_replica=2)
    with pytest.raises(ConfigError, match="would wait forever"):
        plan(4, concurrency=4, cpus_per_replica=1)


def test_layout_tasks_on_cpus_with_onnxruntime_and_a_task_per_cpu():
    """Issue 37: auto is tasks on CPUs with ONNX Runtime (no actor to start, no pixels between
    processes), replicas on GPUs and with PyTorch; tasks are one CPU each, one per CPU by default,
    and a task larger than any node is refused, not left waiting."""
    from braintumor_ray.score import plan_layout, plan_tasks

    def cfg(**kw):
        return ScoreConfig(model="m", input="i", output="o", **kw)

    assert plan_layout(cfg(), engine="onnxruntime") == "tasks"
    assert plan_layout(cfg(), engine="torch") == "replicas"
    assert plan_layout(cfg(use_gpu=True), engine="torch") == "replicas"
    assert plan_layout(cfg(layout="replicas"), engine="onnxruntime") == "replicas"
    assert plan_layout(cfg(layout="tasks"), engine="torch") == "tasks"
    with pytest.raises(ConfigError, match="CPUs only"):
        cfg(layout="tasks", use_gpu=True)
    with pytest.raises(ConfigError, match="layout='fused' is unknown"):
        cfg(layout="fused")
    assert plan_tasks(cfg(), cpus=2) == (2, 1.0)
    assert plan_tasks(cfg(), cpus=3, node_cpus=[0, 1, 1, 1]) == (3, 1.0)
    assert plan_tasks(cfg(cpus_per_replica=2), cpus=32, node_cpus=[16, 16]) == (16, 2.0)
    assert plan_tasks(cfg(cpus_per_replica=2), cpus=3, node_cpus=[1, 2]) == (1, 2.0)
    assert plan_tasks(cfg(concurrency=3), cpus=8) == (3, 1.0)
    with pytest.raises(ConfigError, match="wait forever"):
        plan_tasks(cfg(cpus_per_replica=4), cpus=6, node_cpus=[2, 2, 2])


def test_onnx_gives_the_class_maps_of_the_same_forward_pass(package):
    """A global-pool + linear head (resnet10t here, Lite0 in production) exports its class-activation
    maps as model.onnx's third output; both engines give the same maps, and they are the logits
    spread over the final feature map (mean over positions + bias = the logit: nothing else)."""
    import onnxruntime as ort

    session = ort.InferenceSession(open(os.path.join(package, ONNX_FILE), "rb").read())
    assert [o.name for o in session.get_outputs()] == ["logits", "features", "cam"]
    px = _pixels(5)
    onnx = load_inference_model(package, engine="onnxruntime", threads=1)
    eager = load_inference_model(package, engine="torch", threads=1)
    assert onnx.has_maps and eager.has_maps
    lo, fo, co = onnx.forward(px)
    lt, ft, ct = eager.forward(px)
    assert co.shape == ct.shape == (5, len(CLASS_NAMES), 2, 2)  # 64 px at stride 32
    assert np.abs(co - ct).max() <= ONNX_TOLERANCE * np.abs(ct).max()
    bias = load_model_package(package).model.get_classifier().bias.detach().numpy()
    assert np.abs(co.mean(axis=(2, 3)) + bias - lo).max() < 1e-4
    # The two-output call is unchanged, and asking for no maps computes none.
    assert np.abs(onnx.outputs(px)[0] - lo).max() == 0 and onnx.forward(px, maps=False)[2] is None


def _package_without_maps(package: str, dst: str) -> str:
    """The fixture package as exported before the maps: model.onnx with logits and features only."""
    import onnx

    from braintumor_ray.models import package_model_id as _identity

    shutil.copytree(package, dst)
    proto = onnx.load(os.path.join(dst, ONNX_FILE))
    keep = [o for o in proto.graph.output if o.name != "cam"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    blob = proto.SerializeToString()
    open(os.path.join(dst, ONNX_FILE), "wb").write(blob)
    meta = json.loads(open(os.path.join(dst, "model.json")).read())
    import hashlib

    meta["onnx_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["model_id"] = _identity(meta)
    open(os.path.join(dst, "model.json"), "w").write(json.dumps(meta, indent=2, sort_keys=True))
    return dst


def test_a_package_without_maps_scores_and_draws_them_by_grad_cam(package, tmp_path):
    """An ONNX file from before the maps: the same predictions on ONNX Runtime, no maps from the
    forward pass, and the heat-map writer falls back to Grad-CAM on the PyTorch weights, which at
    resnet's last stage (its final feature map) is the same map: the same PNGs and peaks."""
    import pyarrow as pa

    from braintumor_ray.imaging import encode_png
    from braintumor_ray.score._explain import HeatmapWriter
    from braintumor_ray.score import decode_batch
    from conftest import mri_like

    old = _package_without_maps(package, str(tmp_path / "old"))
    model = load_inference_model(old, engine="onnxruntime", threads=1)
    new = load_inference_model(package, engine="onnxruntime", threads=1)
    assert not model.has_maps
    images = mri_like(4, seed=5)
    batch = decode_batch(pa.table({"path": [f"f{i}.png" for i in range(4)], "bytes": [encode_png(p) for p in images]}),
                         preprocess=new.preprocess)
    px = np.stack([np.frombuffer(b, np.uint8).reshape(64, 64) for b in batch.column("pixels").to_pylist()])
    logits, _, cam = model.forward(px)
    want, _, cam_new = new.forward(px)
    assert cam is None and np.abs(logits - want).max() == 0
    predicted = [CLASS_NAMES[int(i)] for i in want.argmax(1)]
    out = {}
    for name, maps in (("gradcam", None), ("cam", cam_new)):
        stage = tmp_path / name
        stage.mkdir()
        writer = HeatmapWriter("all", model_uri=old, s3_endpoint_url=None, use_gpu=False, stage_uri=str(stage),
                               final_uri="/final", model_id="m")
        paths, xs, ys = writer(batch, [0, 1, 2, 3], px, predicted, [None] * 4, CLASS_NAMES, maps)
        assert writer._explainer is not None if maps is None else writer._explainer is None
        out[name] = (paths, xs, ys, {p.name: p.read_bytes() for p in stage.iterdir()})
    assert out["gradcam"][:3] == out["cam"][:3] and len(out["cam"][3]) == 4
    from PIL import Image
    import io

    for n, png in out["cam"][3].items():
        a = np.asarray(Image.open(io.BytesIO(png))).astype(int)
        b = np.asarray(Image.open(io.BytesIO(out["gradcam"][3][n]))).astype(int)
        assert np.abs(a - b).max() <= 1, n


def test_an_onnx_replica_imports_no_pytorch(ray_session, package, tmp_path):
    """Issue 37: a model replica on ONNX Runtime (a fresh Ray worker) scores and draws its heat
    maps without PyTorch, timm, scikit-learn, matplotlib or grad-cam in its process."""
    import pyarrow as pa

    from braintumor_ray.imaging import encode_png
    from braintumor_ray.score import decode_batch
    from conftest import mri_like

    names = [f"f{i}.png" for i in range(4)]
    data = [encode_png(p) for p in mri_like(4, seed=6)]
    stage = tmp_path / "stage"
    stage.mkdir()  # the driver makes it: a replica only writes into it
    plan = _plan_for(package, "onnxruntime", files={n: (len(d), "v1") for n, d in zip(names, data)}, explain="all",
                     explain_stage_uri=str(stage))
    batch = decode_batch(pa.table({"path": names, "bytes": data}), preprocess=plan.preprocess)

    # Defined here (pickled by value): nothing of this test module's imports (torch) goes along.
    class Replica:
        def score(self, plan, batch):
            import sys

            from braintumor_ray.score import Predictor

            rows = Predictor(plan)(batch)
            heavy = ("torch", "timm", "sklearn", "matplotlib", "pytorch_grad_cam")
            return rows.column("heatmap_path").to_pylist(), sorted(m for m in heavy if m in sys.modules)

    # Its own runtime environment: a new worker process, not one that ran another test's tasks.
    actor = ray_session.remote(Replica).options(num_cpus=1, runtime_env={"env_vars": {"BRAINTUMOR_FRESH_WORKER": "1"}}).remote()
    paths, heavy = ray_session.get(actor.score.remote(plan, batch))
    ray_session.kill(actor)
    assert heavy == []
    assert len(paths) == 4 and all(paths) and len(list(stage.iterdir())) == 4
