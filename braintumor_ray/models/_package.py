"""The exported model package: one folder, ``model.safetensors`` + ``model.onnx`` + ``model.json``.

The JSON carries everything scoring needs to see pixels exactly as training did: backbone,
class names in output order, the model's input size and normalisation, the MRI crop settings,
plus training metrics. The model id is a content hash of what decides the predictions
(weights and those settings), so the same model exported twice has the same id.

``model.onnx`` is the same network for ONNX Runtime (scoring's fast CPU engine), written only
after its outputs matched PyTorch's on a probe batch. Its sha256 is one of the id's inputs
(``onnx_in_id``): a probe batch cannot prove two files are the same network, so the id names
the exact file, and a package only ever runs an ONNX file its id covers. Packages exported
before that (``model.onnx`` present, ``onnx_in_id`` absent) keep their id and score with
PyTorch, with a note; export them again to use ONNX Runtime. Packages without the file load
and score with PyTorch.

Scoring verifies a package once in the driver and hands every model replica a
:class:`PackagePin` (the id and the sha256 of each file); the replica recomputes them over
the bytes it loads, and refuses a package folder rewritten since.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import CLASS_NAMES, ConfigError, InputError, Location, resolve
from ..imaging import MRIPreprocess
from ..trust import Trust

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and timm are imported where a function needs them, not here: a model replica that runs
# ONNX Runtime reads the package (JSON, ONNX file, trust arrays) without them (~1 GB of RSS and
# seconds of start-up; docs/benchmarks.md).

logger = logging.getLogger(__name__)

PACKAGE_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
TRUST_FILE = "trust.safetensors"
FORMAT_VERSION = 1
# Opset 18 (ONNX 1.13, 2022): what torch.onnx's exporter writes natively, run by every
# onnxruntime since 1.14, so a package also loads on a cluster with an older runtime.
ONNX_OPSET = 18
#: Largest max-abs difference between ONNX Runtime's and PyTorch's probabilities on the probe
#: batch that export accepts.
ONNX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ModelPackage:
    """A loaded package: the model in eval mode and the settings that travel with it."""

    model: nn.Module = field(repr=False)
    model_id: str
    backbone: str
    class_names: tuple[str, ...]
    preprocess: MRIPreprocess
    data_config: dict[str, Any]
    metrics: dict[str, Any]
    uri: str
    channels_last: bool = False
    trust: Trust | None = None  # calibration and review flags (None: a package from before them)

    def prepare(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocessed greyscale uint8 images -> the model's normalised 3-channel input."""
        cfg = self.data_config
        return prepare_input(pixels, mean=cfg["mean"], std=cfg["std"], channels_last=self.channels_last)

    def logits(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.model(self.prepare(pixels))


def prepare_input(
    pixels: np.ndarray | torch.Tensor, *, mean: Sequence[float], std: Sequence[float], channels_last: bool = False
) -> torch.Tensor:
    """uint8 greyscale, (H, W) or (N, H, W), to float32 (N, 3, H, W) normalised with ``mean``/``std``.

    The grey channel is repeated three times so that ImageNet weights apply unchanged.
    Training and scoring both call this, so the model never sees pixels prepared differently.
    """
    import torch

    t = torch.as_tensor(pixels)
    if t.dtype != torch.uint8 or t.ndim not in (2, 3):
        raise InputError(
            f"expected uint8 greyscale images shaped (H, W) or (N, H, W), got {t.dtype} {tuple(t.shape)}: "
            "pass MRIPreprocess output"
        )
    x = (t[None] if t.ndim == 2 else t)[:, None].to(torch.float32).div_(255.0).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _unwrap(model: nn.Module) -> nn.Module:
    from torch import nn

    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _identity(meta: Mapping[str, Any]) -> str:
    keys = ("backbone", "num_classes", "global_pool", "class_names", "data_config", "preprocess", "weights_sha256")
    ident = {k: meta[k] for k in keys}
    # Calibration and the review flags change what scoring writes, so they are part of the id;
    # a package from before them keeps its id (the keys are absent, not null).
    for k in ("trust", "trust_sha256"):
        if k in meta:
            ident[k] = meta[k]
    # An ensemble's members (backbones, heads, normalisation; their weights are in weights_sha256),
    # not where each came from: the same members copied elsewhere are the same model.
    if "members" in meta:
        ident["members"] = [{k: v for k, v in m.items() if k != "source"} for m in meta["members"]]
    # model.onnx bound to the id (issue 25); packages from before keep their id (the key is absent).
    if meta.get("onnx_in_id"):
        ident["onnx_in_id"], ident["onnx_sha256"] = True, meta.get("onnx_sha256")
    canon = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    import torch

    if isinstance(x, (np.generic, torch.Tensor)) and getattr(x, "ndim", 0) == 0:
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def onnx_session(blob: bytes, *, threads: int = 1, use_gpu: bool = False) -> Any:
    """An ONNX Runtime session on ``threads`` intra-op threads (one inter-op thread).

    Full graph optimisation: ORT's NCHWc layout transforms are what make depthwise-conv
    backbones fast on CPU (Lite0: ~3x eager PyTorch on one thread; without them, no gain).
    Spinning is off, so that a thread pool that waits for work leaves its CPU to the decode
    tasks on the same node.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if use_gpu:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(
                f"engine onnxruntime on a GPU needs onnxruntime-gpu, and this onnxruntime {ort.__version__} has "
                f"only {', '.join(ort.get_available_providers())}: use --engine torch (or auto) on GPUs"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(blob, so, providers=providers)


def _probe_pixels(side: int) -> np.ndarray:
    """A fixed probe batch: noise (every value, sharp edges), black and white images."""
    noise = np.random.default_rng(0).integers(0, 256, (6, side, side), dtype=np.uint8)
    flat = np.stack([np.zeros((side, side), np.uint8), np.full((side, side), 255, np.uint8)])
    return np.concatenate([noise, flat])


def _probe_diff(m: nn.Module, session: Any, probe: torch.Tensor) -> float:
    """Max abs difference of ONNX Runtime's probabilities from PyTorch's (``m``: a WithFeatures
    model in eval mode) on the prepared probe batch."""
    import torch

    with torch.inference_mode():
        ref = torch.softmax(m(probe)[0].float(), dim=1)
    got = torch.softmax(torch.from_numpy(session.run(None, {"input": probe.numpy()})[0]).float(), dim=1)
    return float((got - ref).abs().max())


def export_onnx(
    model: nn.Module, *, side: int, mean: Sequence[float], std: Sequence[float], name: str = "model"
) -> tuple[bytes, float]:
    """``model`` as ONNX bytes (outputs ``logits`` and the penultimate ``features``, and for a
    global-pool + linear head ``cam``, the class-activation maps, see :class:`WithFeatures`;
    dynamic batch, ``side`` x ``side`` input, opset :data:`ONNX_OPSET`) and the max abs
    difference of ONNX Runtime's probabilities from PyTorch's on a probe batch; a ConfigError if
    it exceeds :data:`ONNX_TOLERANCE` (or if the maps differ by more than that, relative to their
    largest value)."""
    import copy
    import warnings

    import torch

    from ._factory import WithFeatures, has_cam

    net = copy.deepcopy(_unwrap(model)).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    maps = has_cam(net)
    m = WithFeatures(net, maps=maps)
    probe = prepare_input(_probe_pixels(side), mean=mean, std=std)
    # Traced at batch 2 and checked at batch 8: the batch axis must really be free.
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                m,
                (probe[:2],),
                None,
                input_names=["input"],
                output_names=["logits", "features", *(["cam"] if maps else [])],
                opset_version=ONNX_OPSET,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
        blob = program.model_proto.SerializeToString()
    except Exception as e:  # the exporter raises many types
        raise ConfigError(
            f"exporting {name} to ONNX failed ({type(e).__name__}: {str(e)[:500]}): export the package with "
            "onnx=False (scoring then runs it with PyTorch)"
        ) from e
    session = onnx_session(blob, threads=torch.get_num_threads())
    diff = _probe_diff(m, session, probe)
    if maps and diff <= ONNX_TOLERANCE:
        with torch.inference_mode():
            want = m(probe)[2].numpy()
        got = session.run(["cam"], {"input": probe.numpy()})[0]
        diff = max(diff, float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12)))
    if not diff <= ONNX_TOLERANCE:  # NaN fails too
        raise ConfigError(
            f"{ONNX_FILE} for {name} disagrees with PyTorch: max abs difference of probabilities (or maps) {diff:.3g} on "
            f"the probe batch, above {ONNX_TOLERANCE:g}; nothing was written. Export with onnx=False to score "
            "it with PyTorch."
        )
    return blob, diff


def _package_meta(
    model: nn.Module,
    build: Mapping[str, Any],
    class_names: Sequence[str],
    preprocess: MRIPreprocess,
    weights: bytes,
    metrics: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``model.json`` before its ONNX, trust and id entries: what scoring needs to see pixels as
    training did, and the weights' hash."""
    import timm
    import torch

    from ._factory import data_config

    cfg = data_config(model)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **build,
        "class_names": list(class_names),
        "data_config": {
            "input_size": list(cfg["input_size"]),
            "interpolation": cfg["interpolation"],
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "crop_pct": cfg.get("crop_pct"),
            "crop_mode": cfg.get("crop_mode"),
        },
        "preprocess": preprocess.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "metrics": dict(metrics or {}),
        "created_unix": round(time.time(), 3),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    return meta


def _export_onnx_into(meta: dict[str, Any], model: nn.Module, preprocess: MRIPreprocess, *, name: str) -> bytes | None:
    """``model.onnx`` checked against PyTorch, its facts added to ``meta``; None (a warning) where
    the ONNX packages are not installed."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:  # e.g. a GPU image with torch and timm only: the package is still whole, for PyTorch
        logger.warning(
            "%s not written: %s not installed (pip install onnx onnxscript onnxruntime); scoring will "
            "run this package with PyTorch",
            ONNX_FILE,
            ", ".join(missing),
        )
        return None
    onnx_blob, diff = export_onnx(
        model, side=preprocess.image_size, mean=meta["data_config"]["mean"], std=meta["data_config"]["std"], name=name
    )
    import onnxruntime

    meta.update(
        onnx_file=ONNX_FILE,
        onnx_sha256=hashlib.sha256(onnx_blob).hexdigest(),
        onnx_in_id=True,
        onnx_opset=ONNX_OPSET,
        onnx_input_side=preprocess.image_size,
        onnx_probe_max_abs_diff=diff,
    )
    meta["versions"]["onnxruntime"] = onnxruntime.__version__
    return onnx_blob


def _write_package(loc: Location, text: str, weights: bytes, trust_blob: bytes | None, onnx_blob: bytes | None) -> None:
    """Weights first, JSON last: a reader that finds the JSON finds the files it names."""
    loc.join(WEIGHTS_FILE).write_bytes(weights)
    if trust_blob is not None:
        loc.join(TRUST_FILE).write_bytes(trust_blob)
    if onnx_blob is not None:
        loc.join(ONNX_FILE).write_bytes(onnx_blob)
    elif loc.join(ONNX_FILE).exists():
        loc.join(ONNX_FILE).remove()  # an older export's file, for other weights
    loc.join(PACKAGE_JSON).write_bytes(text.encode())


def export_model_package(
    model: nn.Module,
    uri: str,
    *,
    preprocess: MRIPreprocess,
    class_names: Sequence[str] = CLASS_NAMES,
    metrics: Mapping[str, Any] | None = None,
    s3_endpoint_url: str | None = None,
    onnx: bool = True,
    trust: Trust | None = None,
) -> dict[str, Any]:
    """Write the package folder at ``uri`` (local or ``s3://``); returns its JSON, ``model_id`` included.

    With ``onnx`` (the default) the package also holds ``model.onnx`` for ONNX Runtime, written
    only if its probabilities agree with PyTorch's within :data:`ONNX_TOLERANCE` on a probe
    batch; otherwise nothing is written and a ConfigError gives the difference. Where onnx,
    onnxscript or onnxruntime is not installed, the file is left out with a warning.
    ``onnx=False`` writes the PyTorch-only package of earlier versions. ``trust`` (fitted after
    training) adds the calibration, the OOD reference (``trust.safetensors``) and the thresholds.
    """
    from safetensors.torch import save

    model = _unwrap(model)
    build = getattr(model, "braintumor_build", None) or {
        "backbone": model.pretrained_cfg["architecture"],
        "num_classes": model.num_classes,
        "global_pool": "avg",
    }
    if len(class_names) != build["num_classes"]:
        raise ConfigError(f"{len(class_names)} class names for a model with {build['num_classes']} outputs")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt"})
    meta = _package_meta(model, build, class_names, preprocess, blob, metrics)
    if getattr(model, "braintumor_members", None):  # an ensemble (models/_ensemble.py)
        meta["members"] = model.braintumor_members
    onnx_blob = _export_onnx_into(meta, model, preprocess, name=build["backbone"]) if onnx else None
    trust_blob = None
    if trust is not None:
        from safetensors.numpy import save as save_np

        trust_blob = save_np(trust.arrays()) if trust.arrays() else b""
        meta.update(trust=trust.to_meta(), trust_file=TRUST_FILE, trust_sha256=hashlib.sha256(trust_blob).hexdigest())
    meta["model_id"] = _identity(meta)
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metrics cannot be written as JSON ({e}): give numbers and strings") from e
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    _write_package(loc, text, blob, trust_blob, onnx_blob)
    logger.info("exported model %s (%s) to %s", meta["model_id"], build["backbone"], loc.uri)
    return json.loads(text)


@dataclass(frozen=True)
class PackagePin:
    """What the driver verified of a package: its URI, model id and the sha256 of each file a
    replica may load (``model.json`` included). Loading with a pin recomputes each hash over
    the bytes actually loaded and refuses any other (a folder re-exported, synced or edited
    between the driver's checks and a replica's start, hours later for a restarted actor)."""

    uri: str
    model_id: str
    files: tuple[tuple[str, str], ...]  # (file name, sha256), sorted

    def sha256(self, name: str) -> str | None:
        return dict(self.files).get(name)


def _read_file(loc: Location, name: str, pin: PackagePin | None) -> bytes:
    """One file of the package; with a pin, refused unless its bytes are the ones verified."""
    blob = loc.join(name).read_bytes()
    if pin is not None:
        got, want = hashlib.sha256(blob).hexdigest(), pin.sha256(name)
        if got != want:
            raise ConfigError(
                f"{loc.uri}/{name} is not the file verified for model {pin.model_id} (sha256 {got[:12]}, verified "
                f"{(want or 'none')[:12]}): the package folder changed after the job checked it, and this replica "
                "refuses to load it, so nothing is scored with it. Keep the package folder unchanged while a job "
                "scores with it (export a new model to a new folder), then rerun."
            )
    return blob


def pin_package(loc: Location, meta: Mapping[str, Any], *, with_onnx: bool) -> PackagePin:
    """The pin of a package whose ``model.json`` (``meta``) and files were just verified."""
    files = {
        PACKAGE_JSON: hashlib.sha256(loc.join(PACKAGE_JSON).read_bytes()).hexdigest(),
        meta["weights_file"]: meta["weights_sha256"],
    }
    if "trust" in meta:
        files[meta.get("trust_file", TRUST_FILE)] = meta["trust_sha256"]
    if with_onnx:
        files[meta["onnx_file"]] = meta["onnx_sha256"]
    pin = PackagePin(uri=loc.uri, model_id=meta["model_id"], files=tuple(sorted(files.items())))
    # The JSON read for the hash must be the one verified: a rewrite in between is caught here.
    if read_package_meta(loc, pin=pin) != dict(meta):
        raise ConfigError(
            f"{loc.uri}/{PACKAGE_JSON} changed while the job checked it: rerun once the package is unchanged"
        )
    return pin


def read_package_meta(loc: Location, *, pin: PackagePin | None = None) -> dict[str, Any]:
    """A package's ``model.json``, checked: readable, this format, its model id intact (and,
    with ``pin``, the very bytes the driver verified)."""
    try:
        meta = json.loads(_read_file(loc, PACKAGE_JSON, pin))
        version = meta["format_version"]
        meta["backbone"], meta["class_names"], meta["weights_file"]  # noqa: B018 (must be there)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{loc.uri}/{PACKAGE_JSON} is not a model package description ({e}): re-export the model"
        ) from e
    if version != FORMAT_VERSION:
        raise ConfigError(f"model package {loc.uri} has format {version}; this version reads {FORMAT_VERSION}")
    if _identity(meta) != meta.get("model_id"):
        raise ConfigError(
            f"{loc.uri}/{PACKAGE_JSON} was edited after export (its model_id no longer matches): export again"
        )
    return meta


def onnx_unbound_note(meta: Mapping[str, Any]) -> str | None:
    """The note for a package whose ``model.onnx`` its id does not cover (exported before
    issue 25): the file could be any network, so it is never run."""
    if meta.get("onnx_file") and not meta.get("onnx_in_id"):
        return (
            f"model {meta['model_id']}: its {meta['onnx_file']} is not covered by its model id (exported before "
            "the id named the ONNX file), so it is not used: scored with PyTorch. Export the package again to "
            "score with ONNX Runtime"
        )
    return None


def package_preprocess(meta: Mapping[str, Any], uri: str) -> MRIPreprocess:
    """A package's preprocessing settings; an unknown or bad one is a ConfigError naming its ``model.json``."""
    try:
        return MRIPreprocess.from_dict(meta["preprocess"], where="preprocess")
    except ConfigError as e:
        raise ConfigError(
            f"{uri.rstrip('/')}/{PACKAGE_JSON}: {e}. Was the package exported by another version "
            "of braintumor_ray? Export it again with this one."
        ) from e


def read_onnx(loc: Location, meta: Mapping[str, Any], *, pin: PackagePin | None = None) -> bytes:
    """The package's ``model.onnx``, its sha256 checked against ``model.json`` (and ``pin``);
    only a file the model id covers (``onnx_in_id``)."""
    name = meta.get("onnx_file")
    if not name:
        raise ConfigError(
            f"model package {loc.uri} has no {ONNX_FILE} (exported before ONNX support, or with "
            "onnx=False): score it with the torch engine, or export it again"
        )
    if not meta.get("onnx_in_id"):
        raise ConfigError(f"{loc.uri}/{name}: {onnx_unbound_note(meta)} (or use --engine torch or auto)")
    if not loc.join(name).exists():
        raise ConfigError(
            f"{loc.uri}/{name} is missing though {PACKAGE_JSON} names it: the package is "
            "half-copied. Copy or export it again (or score with --engine torch)."
        )
    blob = _read_file(loc, name, pin)
    if hashlib.sha256(blob).hexdigest() != meta.get("onnx_sha256"):
        raise ConfigError(
            f"{loc.uri}/{name} does not match the sha256 in {PACKAGE_JSON}: the file was changed or is "
            "half-written. Export the package again (or score with --engine torch, which does not read it)."
        )
    return blob


def read_trust(loc: Location, meta: Mapping[str, Any], *, pin: PackagePin | None = None) -> Trust | None:
    """The package's calibration and review flags (None for a package from before them), the
    arrays' sha256 checked against ``model.json``; an unknown key is an error naming the file."""
    if "trust" not in meta:
        return None
    name = meta.get("trust_file", TRUST_FILE)
    blob = _read_file(loc, name, pin) if loc.join(name).exists() else None
    if blob is None or hashlib.sha256(blob).hexdigest() != meta.get("trust_sha256"):
        raise ConfigError(
            f"{loc.uri}/{name} is missing or does not match the sha256 in {PACKAGE_JSON}: the package "
            "was changed or is half-copied. Export it again."
        )
    from safetensors.numpy import load as load_np

    try:
        return Trust.from_meta(meta["trust"], load_np(blob) if blob else {}, num_classes=len(meta["class_names"]))
    except ConfigError as e:
        raise ConfigError(f"{loc.uri}/{PACKAGE_JSON}: {e}") from e


def verify_onnx(uri: str, *, s3_endpoint_url: str | None = None, against_weights: bool = False) -> None:
    """Check a package's ``model.onnx`` against its ``model.json`` (a ConfigError naming the file
    if it is missing or changed); scoring calls it before it starts any work.

    ``against_weights``: also run the probe batch through it and through the package's weights
    (checked against their sha256), as export did: a diagnostic only. What ties the file to the
    model is its hash inside the model id (``onnx_in_id``): a probe batch cannot prove two files
    are the same network, so scoring no longer relies on it.
    """
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = read_package_meta(loc)
    blob = read_onnx(loc, meta)
    if not against_weights:
        return
    import torch

    from ._factory import WithFeatures

    pkg = load_model_package(uri, s3_endpoint_url=s3_endpoint_url)
    side = int(meta.get("onnx_input_side") or pkg.preprocess.image_size)
    probe = prepare_input(_probe_pixels(side), mean=pkg.data_config["mean"], std=pkg.data_config["std"])
    diff = _probe_diff(WithFeatures(pkg.model).eval(), onnx_session(blob, threads=torch.get_num_threads()), probe)
    if not diff <= ONNX_TOLERANCE:  # NaN fails too
        raise ConfigError(
            f"{loc.uri}/{meta['onnx_file']} is not the network of {loc.uri}/{meta['weights_file']} (model {meta['model_id']}): "
            f"their probabilities differ by up to {diff:.3g} on the probe batch (export allows {ONNX_TOLERANCE:g}). "
            "The file was replaced after export: export the package again, or score with --engine torch."
        )


def _read_weights(loc: Location, meta: Mapping[str, Any], pin: PackagePin | None = None) -> bytes:
    """The package's weights file, its sha256 (one of the model id's inputs) checked."""
    blob = _read_file(loc, meta["weights_file"], pin)
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ConfigError(
            f"{loc.uri}/{meta['weights_file']} does not match the sha256 in {PACKAGE_JSON}: the package was changed "
            "or is half-written. Export it again."
        )
    return blob


def verify_package(
    uri: str, *, s3_endpoint_url: str | None = None, expect_model_id: str | None = None
) -> dict[str, Any]:
    """Check a package before any work and return its ``model.json``: the JSON unedited (the id
    recomputed from it), the id the one expected (``expect_model_id``), the weights and the
    trust file matching the sha256s the id is made of. ``model.onnx`` is checked by
    :func:`verify_onnx` where the engine reads it."""
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = read_package_meta(loc)
    if expect_model_id is not None and meta["model_id"] != expect_model_id.strip().lower():
        raise ConfigError(
            f"model package {loc.uri} is model {meta['model_id']}, not the expected {expect_model_id} "
            "(--expect-model-id): nothing was scored. Point --model at the package of that model, or change "
            "--expect-model-id if the new model is meant."
        )
    _read_weights(loc, meta)
    read_trust(loc, meta)
    return meta


def load_model_package(
    uri: str, *, s3_endpoint_url: str | None = None, channels_last: bool = False, pin: PackagePin | None = None
) -> ModelPackage:
    """Load a package written by :func:`export_model_package`; the weights' sha256 is checked
    (and every file against ``pin``, when given)."""
    import timm
    import torch
    from safetensors.torch import load

    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = read_package_meta(loc, pin=pin)
    backbone, class_names = meta["backbone"], tuple(meta["class_names"])
    blob = _read_weights(loc, meta, pin)
    if meta.get("members"):
        from ._ensemble import ensemble_from_meta

        model = ensemble_from_meta(meta)
    else:
        model = timm.create_model(
            backbone, pretrained=False, num_classes=len(class_names), global_pool=meta["global_pool"]
        )
    model.load_state_dict(load(blob), strict=True)
    model.braintumor_build = {k: meta[k] for k in ("backbone", "num_classes", "global_pool")}
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ModelPackage(
        model=model,
        model_id=meta["model_id"],
        backbone=backbone,
        class_names=class_names,
        preprocess=package_preprocess(meta, loc.uri),
        data_config=meta["data_config"],
        metrics=meta.get("metrics", {}),
        uri=loc.uri,
        channels_last=channels_last,
        trust=read_trust(loc, meta, pin=pin),
    )
