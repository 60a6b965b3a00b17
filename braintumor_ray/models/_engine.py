"""Inference on one engine: a model package -> probabilities, with PyTorch or ONNX Runtime.

    model = load_inference_model("s3://bucket/runs/r1/model", engine="auto", threads=2)
    probs = model.probabilities(pixels)      # (N, H, W) uint8 from MRIPreprocess -> (N, classes)

``auto`` picks ONNX Runtime on CPU when the package has ``model.onnx`` (Lite0: ~3x eager
PyTorch's images/s per thread, same labels), PyTorch otherwise and on GPU (this project's
onnxruntime has no CUDA provider, and nothing measured says ORT-CUDA would beat PyTorch with
AMP there). Both engines take the same input (:func:`prepare_input`) and give float32
probabilities from the same softmax, so callers see one output whichever engine runs.

The ONNX Runtime path imports no PyTorch (nor timm): its input is prepared with numpy
(:func:`prepare_input_np`, the same float32 operations as :func:`prepare_input`), so a model
replica that runs it starts in a fraction of the time and memory (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..core import ConfigError, InputError, resolve
from ..imaging import MRIPreprocess
from ..trust import Trust, softmax
from ._format import PackageMeta
from ._onnx import onnx_session
from ._package import PackagePin, load_model_package, prepare_input, read_onnx, read_package_meta, read_trust

if TYPE_CHECKING:
    import torch

Engine = Literal["auto", "onnxruntime", "torch"]
#: Images per ONNX Runtime call: a scoring batch runs in chunks of this many. ORT holds a call's
#: activations at once: Lite0 at 224 px peaked at 461 MB RSS for 32 images, 285-293 MB for 16
#: (115-122 MB before the first call; 2 vCPUs, docs/benchmarks.md), and per-image time on the
#: CPU does not improve past a few images a call.
ORT_CHUNK = 16
ENGINES: tuple[str, ...] = ("auto", "onnxruntime", "torch")
#: Test-time augmentation: ``flip`` also runs each image's horizontal mirror and averages (see
#: :meth:`InferenceModel.forward`).
TTA_MODES: tuple[str, ...] = ("none", "flip")


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


def package_has_onnx(meta: PackageMeta) -> bool:
    """A ``model.onnx`` the package may run: one its model id covers (:attr:`PackageMeta.has_onnx`)."""
    return meta.has_onnx


@dataclass
class InferenceModel:
    """A package loaded for inference on one engine."""

    engine: str
    model_id: str
    class_names: tuple[str, ...]
    preprocess: MRIPreprocess
    data_config: Mapping[str, Any]
    uri: str
    threads: int | None
    device: str
    _run: Any = field(repr=False)  # the torch module (WithFeatures) or the ORT session
    _channels_last: bool = False
    trust: Trust | None = None  # calibration and review flags (None: a package from before them)
    #: Whether :meth:`forward` gives the class-activation maps (a global-pool + linear head; for
    #: ONNX, a ``model.onnx`` exported with its ``cam`` output).
    has_maps: bool = False
    #: ``flip``: every image also runs mirrored left-right, in the same engine call (a batch of
    #: 2N), and the outputs are the means of the two passes (maps: the mirror's map flipped back).
    tta: str = "none"

    def prepare(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        cfg = self.data_config
        return prepare_input(pixels, mean=cfg["mean"], std=cfg["std"], channels_last=self._channels_last)

    def outputs(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 greyscale (N, H, W) -> float32 logits (N, classes) and penultimate features (N, D),
        in one forward pass (features None for an ONNX file exported before they were)."""
        logits, feats, _ = self.forward(pixels, maps=False)
        return logits, feats

    def forward(
        self, pixels: np.ndarray | torch.Tensor, *, maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`outputs` and, with ``maps`` where the model has them (:attr:`has_maps`), the
        class-activation maps (N, classes, h, w) float32 before ReLU, from the same forward pass
        (else None). With :attr:`tta` ``flip``, each the mean over the image and its mirror."""
        if self.tta == "flip":
            x = np.asarray(pixels.cpu() if hasattr(pixels, "cpu") else pixels)
            x = x[None] if x.ndim == 2 else x
            n = len(x)
            logits, feats, cam = self._forward(np.concatenate([x, x[:, :, ::-1]]), maps=maps)
            logits = (logits[:n] + logits[n:]) / 2
            feats = None if feats is None else (feats[:n] + feats[n:]) / 2
            cam = None if cam is None else (cam[:n] + cam[n:, :, :, ::-1]) / 2
            return logits, feats, cam
        return self._forward(pixels, maps=maps)

    def _forward(
        self, pixels: np.ndarray | torch.Tensor, *, maps: bool
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if self.engine == "onnxruntime":
            cfg = self.data_config
            names = ["logits", "features", "cam"][: 3 if maps and self.has_maps else 2]
            names = [n for n in names if n in self._outputs]
            x = prepare_input_np(pixels, mean=cfg["mean"], std=cfg["std"])
            parts = [self._run.run(names, {"input": x[s : s + ORT_CHUNK]}) for s in range(0, max(len(x), 1), ORT_CHUNK)]
            out = [np.concatenate([p[k] for p in parts]).astype(np.float32, copy=False) for k in range(len(names))]
            return out[0], out[1] if len(out) > 1 else None, out[2] if len(out) > 2 else None
        import torch

        dev = torch.device(self.device)
        if dev.type == "cuda":  # uint8 over the bus (a quarter of float32's bytes), normalised on the GPU
            x = self.prepare(torch.as_tensor(pixels).pin_memory().to(dev, non_blocking=True))
        else:
            x = self.prepare(pixels)
        self._run.maps = maps and self.has_maps
        with torch.inference_mode(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
            out = self._run(x)
        cam = out[2].float().cpu().numpy() if len(out) > 2 else None
        return out[0].float().cpu().numpy(), out[1].float().cpu().numpy(), cam

    @property
    def _outputs(self) -> tuple[str, ...]:
        return tuple(o.name for o in self._run.get_outputs())

    def probabilities(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 greyscale (N, H, W) -> float32 (N, classes) softmax probabilities (uncalibrated)."""
        logits, _ = self.outputs(pixels)
        return softmax(logits).astype(np.float32)


def prepare_input_np(pixels: np.ndarray, *, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """:func:`prepare_input` in numpy, for ONNX Runtime: uint8 (H, W) or (N, H, W) -> float32
    (N, 3, H, W), the same float32 operations in the same order (bit-identical on the CPU)."""
    x = np.asarray(pixels)
    if x.dtype != np.uint8 or x.ndim not in (2, 3):
        raise InputError(
            f"expected uint8 greyscale images shaped (H, W) or (N, H, W), got {x.dtype} {x.shape}: "
            "pass MRIPreprocess output"
        )
    x = (x[None] if x.ndim == 2 else x)[:, None].astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def load_inference_model(
    uri: str,
    *,
    engine: str = "auto",
    use_gpu: bool = False,
    threads: int | None = None,
    s3_endpoint_url: str | None = None,
    pin: PackagePin | None = None,
    tta: str = "none",
) -> InferenceModel:
    """Load a package for inference on ``engine`` (see :func:`choose_engine`).

    ``threads``: intra-op threads for the engine (``torch.set_num_threads`` for PyTorch, which
    is per process; ORT's ``intra_op_num_threads``); None leaves PyTorch's setting and gives
    ORT as many as PyTorch has. The ONNX file's sha256 is checked when it is used. ``pin``:
    what the driver verified; every file loaded must hash to it (:class:`PackagePin`). ``tta``:
    one of :data:`TTA_MODES` (see :attr:`InferenceModel.tta`).
    """
    if tta not in TTA_MODES:
        raise ConfigError(f"tta={tta!r} is unknown: use one of {', '.join(TTA_MODES)}")
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = read_package_meta(loc, pin=pin)
    if engine == "onnxruntime" and (note := meta.onnx_unbound_note()):
        raise ConfigError(f"{loc.uri}: {note} (or use engine torch or auto)")
    chosen = choose_engine(engine, has_onnx=meta.has_onnx, use_gpu=use_gpu)
    device = "cuda" if use_gpu else "cpu"
    if threads is not None:
        threads = max(1, int(threads))
    common: dict[str, Any] = dict(
        model_id=meta.model_id,
        class_names=meta.class_names,
        preprocess=meta.preprocess,
        data_config=dict(meta.data_config),
        uri=loc.uri,
        threads=threads,
        device=device,
        trust=read_trust(loc, meta, pin=pin),
        tta=tta,
    )
    if chosen == "onnxruntime":
        session = onnx_session(read_onnx(loc, meta, pin=pin), threads=threads or _default_threads(), use_gpu=use_gpu)
        # A model.onnx exported before the maps has no cam output: scoring falls back to Grad-CAM.
        has_maps = "cam" in {o.name for o in session.get_outputs()}
        return InferenceModel(engine=chosen, _run=session, has_maps=has_maps, **common)
    net, has_maps = _torch_network(
        uri, meta, s3_endpoint_url=s3_endpoint_url, pin=pin, use_gpu=use_gpu, threads=threads
    )
    return InferenceModel(engine=chosen, _run=net, _channels_last=not use_gpu, has_maps=has_maps, **common)


def _torch_network(
    uri: str,
    meta: PackageMeta,
    *,
    s3_endpoint_url: str | None,
    pin: PackagePin | None,
    use_gpu: bool,
    threads: int | None,
) -> tuple[Any, bool]:
    """The package's network on PyTorch, giving logits, features and (for a global-pool + linear
    head) the class-activation maps; and whether it has the maps."""
    import torch

    from ._factory import WithFeatures, has_cam

    if threads is not None:
        torch.set_num_threads(threads)
    # NHWC is what depthwise-conv backbones run fastest in on CPU.
    pkg = load_model_package(uri, s3_endpoint_url=s3_endpoint_url, channels_last=not use_gpu, pin=pin, meta=meta)
    net = pkg.model.to("cuda" if use_gpu else "cpu")
    has_maps = has_cam(net)
    return WithFeatures(net, maps=has_maps).eval(), has_maps


def _default_threads() -> int:
    """What PyTorch would take (OMP_NUM_THREADS, else the CPUs), without importing it."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
