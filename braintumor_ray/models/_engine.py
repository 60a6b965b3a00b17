"""Inference on one engine: a model package -> probabilities, with PyTorch or ONNX Runtime.

    model = load_inference_model("s3://bucket/runs/r1/model", engine="auto", threads=2)
    probs = model.probabilities(pixels)      # (N, H, W) uint8 from MRIPreprocess -> (N, classes)

``auto`` picks ONNX Runtime on CPU when the package has ``model.onnx`` (Lite0: ~3x eager
PyTorch's images/s per thread, same labels), PyTorch otherwise and on GPU (this project's
onnxruntime has no CUDA provider, and nothing measured says ORT-CUDA would beat PyTorch with
AMP there). Both engines take the same input (:func:`prepare_input`) and give float32
probabilities from the same softmax, so callers see one output whichever engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..core import ConfigError, resolve
from ..imaging import MRIPreprocess
from ..trust import Trust
from ._factory import WithFeatures
from ._package import (
    PackagePin,
    load_model_package,
    onnx_session,
    onnx_unbound_note,
    package_preprocess,
    prepare_input,
    read_onnx,
    read_package_meta,
    read_trust,
)

Engine = Literal["auto", "onnxruntime", "torch"]
ENGINES: tuple[str, ...] = ("auto", "onnxruntime", "torch")


def choose_engine(engine: str, *, has_onnx: bool, use_gpu: bool) -> str:
    """The concrete engine (``onnxruntime`` or ``torch``) for a setting and a package."""
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is unknown: use one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "onnxruntime" if has_onnx and not use_gpu else "torch"
    if engine == "onnxruntime" and not has_onnx:
        raise ConfigError(
            "engine onnxruntime needs a package with model.onnx, and this one has none (exported before ONNX "
            "support, or with onnx=False): use --engine auto or torch, or export the package again"
        )
    return engine


def package_has_onnx(meta: dict[str, Any]) -> bool:
    """A ``model.onnx`` the package may run: one its model id covers (see :func:`onnx_unbound_note`)."""
    return bool(meta.get("onnx_file")) and bool(meta.get("onnx_in_id"))


@dataclass
class InferenceModel:
    """A package loaded for inference on one engine."""

    engine: str
    model_id: str
    class_names: tuple[str, ...]
    preprocess: MRIPreprocess
    data_config: dict[str, Any]
    uri: str
    threads: int | None
    device: str
    _run: Any = field(repr=False)  # the torch module (WithFeatures) or the ORT session
    _channels_last: bool = False
    trust: Trust | None = None  # calibration and review flags (None: a package from before them)

    def prepare(self, pixels: "np.ndarray | torch.Tensor") -> torch.Tensor:
        cfg = self.data_config
        return prepare_input(pixels, mean=cfg["mean"], std=cfg["std"], channels_last=self._channels_last)

    def outputs(self, pixels: "np.ndarray | torch.Tensor") -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 greyscale (N, H, W) -> float32 logits (N, classes) and penultimate features (N, D),
        in one forward pass (features None for an ONNX file exported before they were)."""
        if self.engine == "onnxruntime":
            out = self._run.run(None, {"input": self.prepare(pixels).numpy()})
            return out[0].astype(np.float32), (out[1].astype(np.float32) if len(out) > 1 else None)
        dev = torch.device(self.device)
        if dev.type == "cuda":  # uint8 over the bus (a quarter of float32's bytes), normalised on the GPU
            x = self.prepare(torch.as_tensor(pixels).pin_memory().to(dev, non_blocking=True))
        else:
            x = self.prepare(pixels)
        with torch.inference_mode(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
            logits, feats = self._run(x)
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()

    def probabilities(self, pixels: "np.ndarray | torch.Tensor") -> np.ndarray:
        """uint8 greyscale (N, H, W) -> float32 (N, classes) softmax probabilities (uncalibrated)."""
        logits, _ = self.outputs(pixels)
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def load_inference_model(
    uri: str,
    *,
    engine: str = "auto",
    use_gpu: bool = False,
    threads: int | None = None,
    s3_endpoint_url: str | None = None,
    pin: PackagePin | None = None,
) -> InferenceModel:
    """Load a package for inference on ``engine`` (see :func:`choose_engine`).

    ``threads``: intra-op threads for the engine (``torch.set_num_threads`` for PyTorch, which
    is per process; ORT's ``intra_op_num_threads``); None leaves PyTorch's setting and gives
    ORT as many as PyTorch has. The ONNX file's sha256 is checked when it is used. ``pin``:
    what the driver verified; every file loaded must hash to it (:class:`PackagePin`).
    """
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = read_package_meta(loc, pin=pin)
    if engine == "onnxruntime" and (note := onnx_unbound_note(meta)):
        raise ConfigError(f"{loc.uri}: {note} (or use engine torch or auto)")
    chosen = choose_engine(engine, has_onnx=package_has_onnx(meta), use_gpu=use_gpu)
    device = "cuda" if use_gpu else "cpu"
    if threads is not None:
        threads = max(1, int(threads))
        torch.set_num_threads(threads)
    common = dict(
        model_id=meta["model_id"],
        class_names=tuple(meta["class_names"]),
        preprocess=package_preprocess(meta, loc.uri),
        data_config=meta["data_config"],
        uri=loc.uri,
        threads=threads,
        device=device,
        trust=read_trust(loc, meta, pin=pin),
    )
    if chosen == "onnxruntime":
        session = onnx_session(read_onnx(loc, meta, pin=pin), threads=threads or torch.get_num_threads(), use_gpu=use_gpu)
        return InferenceModel(engine=chosen, _run=session, **common)
    # NHWC is what depthwise-conv backbones run fastest in on CPU.
    pkg = load_model_package(uri, s3_endpoint_url=s3_endpoint_url, channels_last=not use_gpu, pin=pin)
    return InferenceModel(engine=chosen, _run=WithFeatures(pkg.model.to(device)).eval(), _channels_last=not use_gpu,
                          **common)
