"""The package writer: a trained network -> ``model.safetensors`` + ``model.onnx`` + ``model.json``
(+ ``trust.safetensors``), the JSON last, its model id made of what decides the predictions."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import CLASS_NAMES, ConfigError, Location, resolve
from ..imaging import MRIPreprocess
from ..trust import Trust
from ._format import FORMAT_VERSION, ONNX_FILE, PACKAGE_JSON, TRUST_FILE, WEIGHTS_FILE, PackageMeta, package_model_id
from ._onnx import ONNX_OPSET, export_onnx, unwrap

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)


def _jsonable(x: Any) -> Any:
    import torch

    if isinstance(x, (np.generic, torch.Tensor)) and getattr(x, "ndim", 0) == 0:
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _package_document(
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
    doc: dict[str, Any] = {
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
    return doc


def _export_onnx_into(doc: dict[str, Any], model: nn.Module, preprocess: MRIPreprocess, *, name: str) -> bytes | None:
    """``model.onnx`` checked against PyTorch, its facts added to ``doc``; None (a warning) where
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
        model, side=preprocess.image_size, mean=doc["data_config"]["mean"], std=doc["data_config"]["std"], name=name
    )
    import onnxruntime

    doc.update(
        onnx_file=ONNX_FILE,
        onnx_sha256=hashlib.sha256(onnx_blob).hexdigest(),
        onnx_in_id=True,
        onnx_opset=ONNX_OPSET,
        onnx_input_side=preprocess.image_size,
        onnx_probe_max_abs_diff=diff,
    )
    doc["versions"]["onnxruntime"] = onnxruntime.__version__
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
) -> PackageMeta:
    """Write the package folder at ``uri`` (local or ``s3://``); returns its ``model.json`` as
    written (:class:`PackageMeta`, the model id included).

    With ``onnx`` (the default) the package also holds ``model.onnx`` for ONNX Runtime, written
    only if its probabilities agree with PyTorch's within :data:`ONNX_TOLERANCE` on a probe
    batch; otherwise nothing is written and a ConfigError gives the difference. Where onnx,
    onnxscript or onnxruntime is not installed, the file is left out with a warning.
    ``onnx=False`` writes the PyTorch-only package of earlier versions. ``trust`` (fitted after
    training) adds the calibration, the OOD reference (``trust.safetensors``) and the thresholds.
    """
    from safetensors.torch import save

    model = unwrap(model)
    build = getattr(model, "braintumor_build", None) or {
        "backbone": model.pretrained_cfg["architecture"],
        "num_classes": model.num_classes,
        "global_pool": "avg",
    }
    if len(class_names) != build["num_classes"]:
        raise ConfigError(f"{len(class_names)} class names for a model with {build['num_classes']} outputs")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt"})
    doc = _package_document(model, build, class_names, preprocess, blob, metrics)
    if getattr(model, "braintumor_members", None):  # an ensemble (models/_ensemble.py)
        doc["members"] = model.braintumor_members
    onnx_blob = _export_onnx_into(doc, model, preprocess, name=build["backbone"]) if onnx else None
    trust_blob = None
    if trust is not None:
        from safetensors.numpy import save as save_np

        trust_blob = save_np(trust.arrays()) if trust.arrays() else b""
        doc.update(trust=trust.to_meta(), trust_file=TRUST_FILE, trust_sha256=hashlib.sha256(trust_blob).hexdigest())
    doc["model_id"] = package_model_id(doc)
    try:
        text = json.dumps(doc, indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metrics cannot be written as JSON ({e}): give numbers and strings") from e
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    # As written (the preprocessing object given, not parsed back: a writer's own keys are its own).
    meta = PackageMeta.from_written(text, loc.uri, preprocess)
    _write_package(loc, text, blob, trust_blob, onnx_blob)
    logger.info("exported model %s (%s) to %s", meta.model_id, build["backbone"], loc.uri)
    return meta
