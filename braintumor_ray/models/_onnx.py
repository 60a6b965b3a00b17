"""``model.onnx``: the export from PyTorch, checked on a probe batch, and ONNX Runtime's session.

``model.onnx`` is the same network for ONNX Runtime (scoring's fast CPU engine), written only
after its outputs matched PyTorch's on a probe batch. Its sha256 is one of the id's inputs
(``onnx_in_id``): a probe batch cannot prove two files are the same network, so the id names
the exact file, and a package only ever runs an ONNX file its id covers. Packages exported
before that (``model.onnx`` present, ``onnx_in_id`` absent) keep their id and score with
PyTorch, with a note; export them again to use ONNX Runtime. Packages without the file load
and score with PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import ConfigError, resolve
from ._format import ONNX_FILE, PackageMeta
from ._package import load_model_package, prepare_input, read_onnx, read_package_meta

if TYPE_CHECKING:
    import torch
    from torch import nn

# Opset 18 (ONNX 1.13, 2022): what torch.onnx's exporter writes natively, run by every
# onnxruntime since 1.14, so a package also loads on a cluster with an older runtime.
ONNX_OPSET = 18
#: Largest max-abs difference between ONNX Runtime's and PyTorch's probabilities on the probe
#: batch that export accepts.
ONNX_TOLERANCE = 1e-4


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``torch.compile`` and (Distributed)DataParallel wrappers."""
    from torch import nn

    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


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

    net = copy.deepcopy(unwrap(model)).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
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


def verify_onnx(
    uri: str, *, s3_endpoint_url: str | None = None, against_weights: bool = False, meta: PackageMeta | None = None
) -> None:
    """Check a package's ``model.onnx`` against its ``model.json`` (a ConfigError naming the file
    if it is missing or changed); scoring calls it before it starts any work.

    ``against_weights``: also run the probe batch through it and through the package's weights
    (checked against their sha256), as export did: a diagnostic only. What ties the file to the
    model is its hash inside the model id (``onnx_in_id``): a probe batch cannot prove two files
    are the same network, so scoring does not rely on it. ``meta``: the package's ``model.json``
    as the caller verified it (else read here).
    """
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = meta or read_package_meta(loc)
    blob = read_onnx(loc, meta)
    if not against_weights:
        return
    import torch

    from ._factory import WithFeatures

    pkg = load_model_package(uri, s3_endpoint_url=s3_endpoint_url, meta=meta)
    side = int(meta.onnx_input_side or pkg.preprocess.image_size)
    probe = prepare_input(_probe_pixels(side), mean=meta.mean, std=meta.std)
    diff = _probe_diff(WithFeatures(pkg.model).eval(), onnx_session(blob, threads=torch.get_num_threads()), probe)
    if not diff <= ONNX_TOLERANCE:  # NaN fails too
        raise ConfigError(
            f"{loc.uri}/{meta.onnx_file} is not the network of {loc.uri}/{meta.weights_file} (model {meta.model_id}): "
            f"their probabilities differ by up to {diff:.3g} on the probe batch (export allows {ONNX_TOLERANCE:g}). "
            "The file was replaced after export: export the package again, or score with --engine torch."
        )
