"""The package format: its file names, ``model.json`` as one typed object, and the model id.

``model.json`` carries everything scoring needs to see pixels exactly as training did: backbone,
class names in output order, the model's input size and normalisation, the MRI crop settings,
plus training metrics. The model id is a content hash of what decides the predictions (weights
and those settings), so the same model exported twice has the same id.

:class:`PackageMeta` is that file parsed and checked once (:meth:`PackageMeta.parse`: this
format, the keys readers need, the id recomputed, the preprocessing parsed) where a package is
opened or verified; every later step takes the object instead of reading the JSON again. The
file's exact text travels with it (:attr:`PackageMeta.text`), so what is on disk stays the
format older versions wrote and read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..core import ConfigError, PackageIntegrityError
from ..imaging import MRIPreprocess

PACKAGE_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
TRUST_FILE = "trust.safetensors"
FORMAT_VERSION = 1

# The keys every id is made of; the optional ones below join only when present, so a package
# from before them keeps its id.
_ID_KEYS = ("backbone", "num_classes", "global_pool", "class_names", "data_config", "preprocess", "weights_sha256")


def package_model_id(doc: Mapping[str, Any]) -> str:
    """The model id of a ``model.json`` document (its ``model_id`` key aside): the hash of what
    decides the predictions. A KeyError when a key every id needs is missing."""
    ident = {k: doc[k] for k in _ID_KEYS}
    # Calibration and the review flags change what scoring writes, so they are part of the id;
    # a package from before them keeps its id (the keys are absent, not null).
    for k in ("trust", "trust_sha256"):
        if k in doc:
            ident[k] = doc[k]
    # An ensemble's members (backbones, heads, normalisation; their weights are in weights_sha256),
    # not where each came from: the same members copied elsewhere are the same model.
    if "members" in doc:
        ident["members"] = [{k: v for k, v in m.items() if k != "source"} for m in doc["members"]]
    # model.onnx bound to the id; packages from before keep their id (the key is absent).
    if doc.get("onnx_in_id"):
        ident["onnx_in_id"], ident["onnx_sha256"] = True, doc.get("onnx_sha256")
    canon = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _frozen(x: Any) -> Any:
    """JSON values made read-only (dicts as mapping proxies, lists as tuples): the metadata is
    shared by every step of a run, and none may change it for the others."""
    if isinstance(x, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in x.items()})
    if isinstance(x, list):
        return tuple(_frozen(v) for v in x)
    return x


@dataclass(frozen=True)
class PackageMeta:
    """A package's ``model.json``, parsed and checked once (:meth:`parse`)."""

    uri: str  # the package folder
    model_id: str
    format_version: int
    backbone: str
    num_classes: int
    global_pool: str
    class_names: tuple[str, ...]
    #: The model's input: ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ...
    data_config: Mapping[str, Any] = field(repr=False)
    preprocess: MRIPreprocess = field(repr=False)
    weights_file: str
    weights_sha256: str
    #: ``model.onnx``'s name, hash and input side (None: a package without one).
    onnx_file: str | None
    onnx_sha256: str | None
    #: Whether the id covers the ONNX file (False: exported before it did; never run).
    onnx_in_id: bool
    onnx_input_side: int | None
    #: The calibration and review settings (``trust``; None: a package from before them); their
    #: arrays are in ``trust_file``, read with them by :func:`read_trust`.
    trust: Mapping[str, Any] | None = field(repr=False)
    trust_file: str
    trust_sha256: str | None
    #: An ensemble's members (backbone, head, data config, source); empty for one model.
    members: tuple[Mapping[str, Any], ...] = field(repr=False)
    metrics: Mapping[str, Any] = field(repr=False)
    #: ``model.json`` exactly as read (or written): what a pinned read is compared with.
    text: str = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str | bytes, uri: str) -> PackageMeta:
        """``model.json``'s text, checked: a JSON object of this format with the keys readers
        need, its model id intact, its preprocessing known. A ConfigError naming the file
        otherwise (a package from a newer version is refused here, before any work)."""
        where = f"{uri.rstrip('/')}/{PACKAGE_JSON}"
        try:
            body = text.decode() if isinstance(text, bytes) else text  # a UnicodeDecodeError is a ValueError
            doc = json.loads(body)
            version = doc["format_version"]
            doc["backbone"], doc["class_names"], doc["weights_file"]  # noqa: B018 (must be there)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where} is not a model package description ({e}): re-export the model") from e
        if version != FORMAT_VERSION:
            raise ConfigError(f"model package {uri} has format {version}; this version reads {FORMAT_VERSION}")
        try:
            recomputed = package_model_id(doc)
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where} is not a model package description (no {e}): re-export the model") from e
        if recomputed != doc.get("model_id"):
            raise PackageIntegrityError(
                f"{where} was edited after export (its model_id no longer matches): export again",
                file=where,
                expected=doc.get("model_id"),
                actual=recomputed,
            )
        try:
            preprocess = MRIPreprocess.from_dict(doc["preprocess"], where="preprocess")
        except ConfigError as e:
            raise ConfigError(
                f"{where}: {e}. Was the package exported by another version of braintumor_ray? Export it again "
                "with this one."
            ) from e
        try:
            return cls._typed(doc, uri, preprocess, body)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where} is not a model package description ({e!r}): re-export the model") from e

    @classmethod
    def from_written(cls, text: str, uri: str, preprocess: MRIPreprocess) -> PackageMeta:
        """The object of a ``model.json`` this process just wrote (``text``), unchecked."""
        return cls._typed(json.loads(text), uri, preprocess, text)

    @classmethod
    def _typed(cls, doc: dict[str, Any], uri: str, preprocess: MRIPreprocess, text: str) -> PackageMeta:
        side = doc.get("onnx_input_side")
        return cls(
            uri=uri,
            model_id=str(doc["model_id"]),
            format_version=int(doc["format_version"]),
            backbone=str(doc["backbone"]),
            num_classes=int(doc["num_classes"]),
            global_pool=str(doc["global_pool"]),
            class_names=tuple(str(c) for c in doc["class_names"]),
            data_config=_frozen(doc["data_config"]),
            preprocess=preprocess,
            weights_file=str(doc["weights_file"]),
            weights_sha256=str(doc["weights_sha256"]),
            onnx_file=doc.get("onnx_file") or None,
            onnx_sha256=doc.get("onnx_sha256"),
            onnx_in_id=bool(doc.get("onnx_in_id")),
            onnx_input_side=int(side) if side else None,
            trust=_frozen(doc["trust"]) if "trust" in doc else None,
            trust_file=str(doc.get("trust_file", TRUST_FILE)),
            trust_sha256=doc.get("trust_sha256"),
            members=_frozen(doc.get("members") or []),
            metrics=_frozen(doc.get("metrics") or {}),
            text=text,
        )

    def __hash__(self) -> int:
        return hash((self.uri, self.model_id))

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Pickled (a Ray task, a deep copy) as its text, parsed and checked again on arrival: the
        # read-only mappings are not picklable themselves.
        return (PackageMeta.parse, (self.text, self.uri))

    def document(self) -> dict[str, Any]:
        """``model.json`` as a fresh dict (every key, the ones not typed here too)."""
        return json.loads(self.text)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.data_config["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.data_config["std"])

    @property
    def has_onnx(self) -> bool:
        """A ``model.onnx`` the package may run: one its model id covers (see :meth:`onnx_unbound_note`)."""
        return bool(self.onnx_file) and self.onnx_in_id

    @property
    def has_conformal(self) -> bool:
        """Whether the package has prediction sets (exported after them)."""
        return "conformal" in (self.trust or {})

    @property
    def review_threshold(self) -> float:
        """The confidence under which a row is flagged for review (0: a package from before it)."""
        return float((self.trust or {}).get("review_threshold", 0.0))

    def onnx_unbound_note(self) -> str | None:
        """The note for a package whose ``model.onnx`` its id does not cover (exported before the
        id named it): the file could be any network, so it is never run."""
        if self.onnx_file and not self.onnx_in_id:
            return (
                f"model {self.model_id}: its {self.onnx_file} is not covered by its model id (exported before "
                "the id named the ONNX file), so it is not used: scored with PyTorch. Export the package again to "
                "score with ONNX Runtime"
            )
        return None


def onnx_unbound_note(meta: PackageMeta) -> str | None:
    """:meth:`PackageMeta.onnx_unbound_note` (scoring's engine choice calls it by this name)."""
    return meta.onnx_unbound_note()
