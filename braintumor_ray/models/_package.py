"""The exported model package: one folder, ``model.safetensors`` + ``model.json``.

The JSON carries everything scoring needs to see pixels exactly as training did: backbone,
class names in output order, the model's input size and normalisation, the MRI crop settings,
plus training metrics. The model id is a content hash of what decides the predictions
(weights and those settings), so the same model exported twice has the same id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import timm
import torch
from torch import nn

from ..core import CLASS_NAMES, ConfigError, InputError, resolve
from ..imaging import MRIPreprocess
from ._factory import data_config

logger = logging.getLogger(__name__)

PACKAGE_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


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

    def prepare(self, pixels: "np.ndarray | torch.Tensor") -> torch.Tensor:
        """Preprocessed greyscale uint8 images -> the model's normalised 3-channel input."""
        cfg = self.data_config
        return prepare_input(pixels, mean=cfg["mean"], std=cfg["std"], channels_last=self.channels_last)

    @torch.inference_mode()
    def logits(self, pixels: "np.ndarray | torch.Tensor") -> torch.Tensor:
        return self.model(self.prepare(pixels))


def prepare_input(
    pixels: "np.ndarray | torch.Tensor", *, mean: Sequence[float], std: Sequence[float], channels_last: bool = False
) -> torch.Tensor:
    """uint8 greyscale, (H, W) or (N, H, W), to float32 (N, 3, H, W) normalised with ``mean``/``std``.

    The grey channel is repeated three times so that ImageNet weights apply unchanged.
    Training and scoring both call this, so the model never sees pixels prepared differently.
    """
    t = torch.as_tensor(pixels)
    if t.dtype != torch.uint8 or t.ndim not in (2, 3):
        raise InputError(
            f"expected uint8 greyscale images shaped (H, W) or (N, H, W), got {t.dtype} {tuple(t.shape)}: "
            "pass MRIPreprocess output"
        )
    x = (t[None] if t.ndim == 2 else t)[:, None].to(torch.float32).div_(255.0).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _identity(meta: Mapping[str, Any]) -> str:
    keys = ("backbone", "num_classes", "global_pool", "class_names", "data_config", "preprocess", "weights_sha256")
    canon = json.dumps({k: meta[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, torch.Tensor)) and getattr(x, "ndim", 0) == 0:
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def export_model_package(
    model: nn.Module,
    uri: str,
    *,
    preprocess: MRIPreprocess,
    class_names: Sequence[str] = CLASS_NAMES,
    metrics: Mapping[str, Any] | None = None,
    s3_endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Write the package folder at ``uri`` (local or ``s3://``); returns its JSON, ``model_id`` included."""
    from safetensors.torch import save

    model = _unwrap(model)
    build = getattr(model, "braintumor_build", None) or {
        "backbone": model.pretrained_cfg["architecture"],
        "num_classes": model.num_classes,
        "global_pool": "avg",
    }
    if len(class_names) != build["num_classes"]:
        raise ConfigError(f"{len(class_names)} class names for a model with {build['num_classes']} outputs")
    cfg = data_config(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt"})
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
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "metrics": dict(metrics or {}),
        "created_unix": round(time.time(), 3),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    meta["model_id"] = _identity(meta)
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metrics cannot be written as JSON ({e}): give numbers and strings") from e
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    # Weights first, JSON last: a reader that finds the JSON finds the weights it names.
    loc.join(WEIGHTS_FILE).write_bytes(blob)
    loc.join(PACKAGE_JSON).write_bytes(text.encode())
    logger.info("exported model %s (%s) to %s", meta["model_id"], build["backbone"], loc.uri)
    return json.loads(text)


def load_model_package(uri: str, *, s3_endpoint_url: str | None = None, channels_last: bool = False) -> ModelPackage:
    """Load a package written by :func:`export_model_package`; the weights' sha256 is checked."""
    from safetensors.torch import load

    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    try:
        meta = json.loads(loc.join(PACKAGE_JSON).read_bytes())
        version = meta["format_version"]
        backbone, class_names, weights_file = meta["backbone"], tuple(meta["class_names"]), meta["weights_file"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{loc.uri}/{PACKAGE_JSON} is not a model package description ({e}): re-export the model") from e
    if version != FORMAT_VERSION:
        raise ConfigError(f"model package {loc.uri} has format {version}; this version reads {FORMAT_VERSION}")
    if _identity(meta) != meta.get("model_id"):
        raise ConfigError(f"{loc.uri}/{PACKAGE_JSON} was edited after export (its model_id no longer matches): export again")
    blob = loc.join(weights_file).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ConfigError(
            f"{loc.uri}/{weights_file} does not match the sha256 in {PACKAGE_JSON}: the package was changed "
            "or is half-written. Export it again."
        )
    model = timm.create_model(backbone, pretrained=False, num_classes=len(class_names), global_pool=meta["global_pool"])
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
        preprocess=MRIPreprocess.from_dict(meta["preprocess"]),
        data_config=meta["data_config"],
        metrics=meta.get("metrics", {}),
        uri=loc.uri,
        channels_last=channels_last,
    )
