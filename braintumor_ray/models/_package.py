"""Opening a package: verify, pin and load (``model.json`` + ``model.safetensors`` + ``model.onnx``
+ ``trust.safetensors``, written by :mod:`._writer`; the format in :mod:`._format`).

Scoring verifies a package once in the driver (:func:`verify_package`: the JSON parsed once into
a :class:`~._format.PackageMeta`, every file against the sha256s its model id is made of) and
hands every model replica a :class:`PackagePin` (the id and the sha256 of each file); the
replica recomputes them over the bytes it loads, and refuses a package folder rewritten since.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import ConfigError, InputError, Location, PackageIntegrityError, resolve
from ..imaging import MRIPreprocess
from ..trust import Trust
from ._format import ONNX_FILE, PACKAGE_JSON, PackageMeta

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and timm are imported where a function needs them, not here: a model replica that runs
# ONNX Runtime reads the package (JSON, ONNX file, trust arrays) without them (~1 GB of RSS and
# seconds of start-up; docs/benchmarks.md).


@dataclass(frozen=True)
class ModelPackage:
    """A loaded package: the model in eval mode and the settings that travel with it."""

    model: nn.Module = field(repr=False)
    meta: PackageMeta = field(repr=False)
    channels_last: bool = False
    trust: Trust | None = None  # calibration and review flags (None: a package from before them)

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def backbone(self) -> str:
        return self.meta.backbone

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names

    @property
    def preprocess(self) -> MRIPreprocess:
        return self.meta.preprocess

    @property
    def data_config(self) -> Mapping[str, Any]:
        return self.meta.data_config

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.document().get("metrics", {})

    @property
    def uri(self) -> str:
        return self.meta.uri

    def prepare(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocessed greyscale uint8 images -> the model's normalised 3-channel input."""
        return prepare_input(pixels, mean=self.meta.mean, std=self.meta.std, channels_last=self.channels_last)

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
            raise PackageIntegrityError(
                f"{loc.uri}/{name} is not the file verified for model {pin.model_id} (sha256 {got[:12]}, verified "
                f"{(want or 'none')[:12]}): the package folder changed after the job checked it, and this replica "
                "refuses to load it, so nothing is scored with it. Keep the package folder unchanged while a job "
                "scores with it (export a new model to a new folder), then rerun.",
                file=f"{loc.uri}/{name}",
                expected=want,
                actual=got,
            )
    return blob


def _checked_bytes(
    loc: Location, name: str, expected: str | None, pin: PackagePin | None, *, fix: str, missing: str | None = None
) -> bytes:
    """A file ``model.json`` names, its sha256 checked against ``expected`` (the one the model id
    is made of; and against ``pin``). ``fix``: what to do about a changed file; ``missing``: what
    to do about a missing one (without it, the storage's own error)."""
    path = f"{loc.uri}/{name}"
    if missing is not None and not loc.join(name).exists():
        raise PackageIntegrityError(
            f"{path} is missing though {PACKAGE_JSON} names it: {missing}", file=path, expected=expected
        )
    blob = _read_file(loc, name, pin)
    if (got := hashlib.sha256(blob).hexdigest()) != expected:
        raise PackageIntegrityError(
            f"{path} does not match the sha256 in {PACKAGE_JSON}: {fix}", file=path, expected=expected, actual=got
        )
    return blob


def pin_package(loc: Location, meta: PackageMeta, *, with_onnx: bool) -> PackagePin:
    """The pin of a package whose ``model.json`` (``meta``) and files were just verified."""
    files = {
        PACKAGE_JSON: hashlib.sha256(loc.join(PACKAGE_JSON).read_bytes()).hexdigest(),
        meta.weights_file: meta.weights_sha256,
    }
    if meta.trust is not None:
        files[meta.trust_file] = str(meta.trust_sha256)
    if with_onnx:
        files[str(meta.onnx_file)] = str(meta.onnx_sha256)
    pin = PackagePin(uri=loc.uri, model_id=meta.model_id, files=tuple(sorted(files.items())))
    # The JSON read for the hash must be the one verified: a rewrite in between is caught here.
    if read_package_meta(loc, pin=pin).document() != meta.document():
        raise ConfigError(
            f"{loc.uri}/{PACKAGE_JSON} changed while the job checked it: rerun once the package is unchanged"
        )
    return pin


def read_package_meta(loc: Location, *, pin: PackagePin | None = None) -> PackageMeta:
    """A package's ``model.json``, checked (:meth:`PackageMeta.parse`: readable, this format,
    its model id intact; with ``pin``, the very bytes the driver verified)."""
    return PackageMeta.parse(_read_file(loc, PACKAGE_JSON, pin), loc.uri)


def read_onnx(loc: Location, meta: PackageMeta, *, pin: PackagePin | None = None) -> bytes:
    """The package's ``model.onnx``, its sha256 checked against ``model.json`` (and ``pin``);
    only a file the model id covers (``onnx_in_id``)."""
    name = meta.onnx_file
    if not name:
        raise ConfigError(
            f"model package {loc.uri} has no {ONNX_FILE} (exported before ONNX support, or with "
            "onnx=False): score it with the torch engine, or export it again"
        )
    if not meta.onnx_in_id:
        raise ConfigError(f"{loc.uri}/{name}: {meta.onnx_unbound_note()} (or use --engine torch or auto)")
    return _checked_bytes(
        loc,
        name,
        meta.onnx_sha256,
        pin,
        fix="the file was changed or is half-written. Export the package again (or score with --engine torch, "
        "which does not read it).",
        missing="the package is half-copied. Copy or export it again (or score with --engine torch).",
    )


def read_trust(loc: Location, meta: PackageMeta, *, pin: PackagePin | None = None) -> Trust | None:
    """The package's calibration and review flags (None for a package from before them), the
    arrays' sha256 checked against ``model.json``; an unknown key is an error naming the file."""
    if meta.trust is None:
        return None
    blob = _checked_bytes(
        loc,
        meta.trust_file,
        meta.trust_sha256,
        pin,
        fix="the package was changed or is half-written. Export it again.",
        missing="the package is half-copied. Export it again.",
    )
    from safetensors.numpy import load as load_np

    try:
        # A plain copy: the Trust keeps its report, written back as JSON by a re-export.
        settings = meta.document()["trust"]
        return Trust.from_meta(settings, load_np(blob) if blob else {}, num_classes=len(meta.class_names))
    except ConfigError as e:
        raise ConfigError(f"{loc.uri}/{PACKAGE_JSON}: {e}") from e


def _read_weights(loc: Location, meta: PackageMeta, pin: PackagePin | None = None) -> bytes:
    """The package's weights file, its sha256 (one of the model id's inputs) checked."""
    return _checked_bytes(
        loc,
        meta.weights_file,
        meta.weights_sha256,
        pin,
        fix="the package was changed or is half-written. Export it again.",
    )


def verify_package(uri: str, *, s3_endpoint_url: str | None = None, expect_model_id: str | None = None) -> PackageMeta:
    """Check a package before any work and return its ``model.json``: the JSON unedited (the id
    recomputed from it), the id the one expected (``expect_model_id``), the weights and the
    trust file matching the sha256s the id is made of. ``model.onnx`` is checked by
    :func:`read_onnx` where the engine reads it."""
    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    meta = read_package_meta(loc)
    if expect_model_id is not None and meta.model_id != expect_model_id.strip().lower():
        raise ConfigError(
            f"model package {loc.uri} is model {meta.model_id}, not the expected {expect_model_id} "
            "(--expect-model-id): nothing was scored. Point --model at the package of that model, or change "
            "--expect-model-id if the new model is meant."
        )
    _read_weights(loc, meta)
    read_trust(loc, meta)
    return meta


def load_model_package(
    uri: str,
    *,
    s3_endpoint_url: str | None = None,
    channels_last: bool = False,
    pin: PackagePin | None = None,
    meta: PackageMeta | None = None,
) -> ModelPackage:
    """Load a package written by :func:`export_model_package`; the weights' sha256 is checked
    (and every file against ``pin``, when given). ``meta``: its ``model.json`` as the caller
    already read and checked it (with ``pin``, if one is given), not read again."""
    import timm
    import torch
    from safetensors.torch import load

    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    if meta is None:
        meta = read_package_meta(loc, pin=pin)
    blob = _read_weights(loc, meta, pin)
    if meta.members:
        from ._ensemble import ensemble_from_meta

        model = ensemble_from_meta(meta)
    else:
        model = timm.create_model(
            meta.backbone, pretrained=False, num_classes=len(meta.class_names), global_pool=meta.global_pool
        )
    model.load_state_dict(load(blob), strict=True)
    model.braintumor_build = {
        "backbone": meta.backbone,
        "num_classes": meta.num_classes,
        "global_pool": meta.global_pool,
    }
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ModelPackage(model=model, meta=meta, channels_last=channels_last, trust=read_trust(loc, meta, pin=pin))
