"""Heat maps in a scoring run (``--explain``): which rows get one, and the PNGs in ``OUTPUT_explain/``.

Each chosen row gets the heat-map overlay of the preprocessed scan the model saw
(:mod:`braintumor_ray.explain`), written by the model actor that scored it into the run's own
staging folder, ``OUTPUT._staging/<run>/_objects/_explain/``; the run's one commit lists them in
``OUTPUT/_manifest.json``'s objects (``_explain/NAME`` with its sha256) in the same write as its
rows, then moves them into ``OUTPUT_explain/``. A run cut off before its commit leaves no map
listed (the next run drops its staging with its rows); one cut off while committing is finished
with them. Readers (the report, the DICOM SC) trust only listed maps whose bytes match
(:class:`HeatMaps`). File names come from the content (sha256, slice, model id), not the input
path: a redone run overwrites its maps instead of adding copies, and no patient name reaches a
file name.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..core import (
    MANIFEST_FILE,
    BraintumorError,
    Location,
    Manifest,
    StagedWriter,
    StorageError,
    file_sha256,
    posix_basename,
    remove_child,
    resolve,
)
from ..imaging import original_xy
from ._layout import EXPLAIN_SUFFIX
from ._series import NO_TUMOR

logger = logging.getLogger(__name__)


def explain_location(dst: Location) -> Location:
    """``OUTPUT_explain`` beside ``OUTPUT`` (outside any glob over the predictions)."""
    return dst.sibling(EXPLAIN_SUFFIX)


class UntrustedMap(BraintumorError):
    """A row's heat map that is not a map the output's manifest lists with these bytes."""


class HeatMaps(Mapping[str, Mapping[str, Any]]):
    """The heat maps a reader may trust, by file name: those the output's manifest lists in its
    objects (``objects``, looked up by key and never copied: a listing of 100,000 maps costs
    nothing until a map is read; ``retired`` ones left out) and this run's own, still in its
    staging folder (``staged``: the folder, ``staged_entries``: key -> entry, from
    :meth:`StagedWriter.staged_objects`) until its commit lists and publishes them."""

    def __init__(
        self,
        root: Location,
        objects: Mapping[str, Mapping[str, Any]],
        *,
        staged: Location | None = None,
        staged_entries: Mapping[str, Mapping[str, Any]] | None = None,
        retired: frozenset[str] = frozenset(),
    ) -> None:
        self.root, self.objects, self.staged = root, objects, staged
        self.staged_entries, self.retired = staged_entries or {}, retired

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        key = f"{EXPLAIN_SUFFIX}/{name}"
        if key in self.staged_entries:
            return self.staged_entries[key]
        if key in self.objects and key not in self.retired:
            return self.objects[key]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        keys = {k for k in self.objects if k not in self.retired} | set(self.staged_entries)
        return iter(sorted(k.partition("/")[2] for k in keys if k.startswith(f"{EXPLAIN_SUFFIX}/")))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def location(self, name: str) -> Location:
        """Where the listed map ``name`` is now: this run's staging for its own, else OUTPUT_explain."""
        if self.staged is not None and f"{EXPLAIN_SUFFIX}/{name}" in self.staged_entries:
            return self.staged.join(name)
        return self.root.join(name)

    def read(self, heatmap_path: str) -> bytes:
        """The bytes of the map a row's ``heatmap_path`` names: a plain file of OUTPUT_explain/ that
        the manifest lists (or this run stages), with the listed sha256; :class:`UntrustedMap` else."""
        name = posix_basename(heatmap_path)
        if heatmap_path != f"{self.root.uri.rstrip('/')}/{name}" or name in ("", ".", ".."):
            raise UntrustedMap(f"its heatmap_path is not a file of this output's OUTPUT_explain/ ({heatmap_path})")
        if name not in self:
            raise UntrustedMap(f"its heat map {name} is not one {MANIFEST_FILE} lists (planted, or never committed)")
        data = self.location(name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self[name].get("sha256"):
            raise UntrustedMap(
                f"its heat map {name} is not the one committed (its sha256 differs from {MANIFEST_FILE}'s)"
            )
        return data


def explain_objects(rows_heatmaps: Sequence[str | None], objects: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """The listed maps (keys of ``objects``) that no row of ``rows_heatmaps`` names: a
    ``--rescore-all`` retires them with the rows that named them."""
    named = {posix_basename(p) for p in rows_heatmaps if p}
    prefix = f"{EXPLAIN_SUFFIX}/"
    return tuple(sorted(k for k in objects if k.startswith(prefix) and k[len(prefix) :] not in named))


def migrate_explain_manifest(writer: StagedWriter, *, adopt_found: bool = False) -> int:
    """An output whose maps an older version named in ``OUTPUT_explain/_manifest.json``: each map
    listed there (adopted ones included) whose bytes still match is listed in
    ``OUTPUT/_manifest.json``'s objects, then that old manifest is deleted (cut off between the
    two, the next run does it again). A changed or missing one is not listed, and so never
    embedded nor drawn into an SC. ``adopt_found``: the rows were just adopted from before
    manifests, and a maps folder without a manifest has its maps adopted as they are. The number
    listed; a no-change run that finds no old manifest reads nothing else."""
    root = explain_location(writer.output)
    old = Manifest(root, what="explain")
    if not old.location.exists():
        if not adopt_found or not root.exists():
            return 0
        found = {
            posix_basename(p): {"sha256": ""}
            for p in root.files()
            if p.endswith(".png") and not posix_basename(p).startswith(("_", "."))
        }
        listed: Mapping[str, Any] = found
        adopting = True
    else:
        try:
            listed = old.read() or {}
        except StorageError as e:
            logger.warning("score: %s: no map of it is listed", e)
            listed = {}
        adopting = False
    adopted, left = {}, []
    for name, entry in sorted(listed.items()):
        key = f"{EXPLAIN_SUFFIX}/{name}"
        try:
            loc = writer.object_location(key)  # a plain name of OUTPUT_explain/, or none of ours
        except StorageError:
            left.append(name)
            continue
        if not name.endswith(".png") or not isinstance(entry, dict) or not loc.exists():
            left.append(name)
            continue
        sha = file_sha256(root, loc.path)
        if not adopting and sha != entry.get("sha256"):
            left.append(name)
            continue
        adopted[key] = {"sha256": sha, "committed_at": entry.get("committed_at"), "migrated": True}
    if writer.manifest is None or writer.manifest.read() is None:
        adopted = {}  # no committed rows: no map stands
    n = writer.adopt_objects(adopted)
    if left:
        logger.warning(
            "score: %d maps named in %s are gone or not the bytes it lists: not listed, never embedded "
            "in the report nor drawn into an SC",
            len(left),
            old.location.uri,
        )
    if not adopting:
        remove_child(writer.output, root, MANIFEST_FILE, what="score")
    logger.info("score: %d heat maps of %s now listed in %s", n, root.uri, MANIFEST_FILE)
    return n


def chosen_rows(mode: str, predicted: Sequence[str | None], reasons: Sequence[str | None]) -> list[int]:
    """Rows that get a map: ``all`` every scored row, ``positive`` a tumour class, ``flagged``
    a tumour class or a review reason, ``none`` no row. Rows without a prediction never do."""
    if mode == "none":
        return []
    out = []
    for i, (label, reason) in enumerate(zip(predicted, reasons)):
        if label is None:
            continue
        if mode == "all" or label != NO_TUMOR or (mode == "flagged" and reason is not None):
            out.append(i)
    return out


def heatmap_name(sha256: str, slice_index: int | None, model_id: str) -> str:
    return f"{sha256}-{model_id}.png" if slice_index is None else f"{sha256}-s{slice_index}-{model_id}.png"


class HeatmapWriter:
    """The model actor's side: maps for the chosen rows of a batch, in one batched call, as PNGs.

    ``method`` ``auto`` (the default) takes the class-activation maps the model gave with its
    predictions (``cam``: the same forward pass, numpy only; :func:`~braintumor_ray.explain.cam_heatmaps`).
    Without them (a ``model.onnx`` exported before them, a head other than pooling + linear) and
    with ``gradcam``, the maps are Grad-CAM on the package's PyTorch model, loaded on first use
    (the actor may score with ONNX Runtime, which has no gradients): a forward and a backward
    pass per batch, and PyTorch in the actor.
    """

    def __init__(
        self,
        mode: str,
        *,
        model_uri: str,
        s3_endpoint_url: str | None,
        use_gpu: bool,
        stage_uri: str,
        final_uri: str,
        model_id: str,
        pin: Any = None,
        method: str = "auto",
        threads: int = 1,
    ) -> None:
        self.mode, self.model_uri, self.s3_endpoint_url, self.pin = mode, model_uri, s3_endpoint_url, pin
        self.method = method
        self.device = "cuda" if use_gpu else "cpu"
        self.stage = resolve(stage_uri, s3_endpoint_url=s3_endpoint_url)
        self.final_uri, self.model_id = final_uri.rstrip("/"), model_id
        self._explainer: Any = None  # the Grad-CAM explainer, made on first need (it imports torch)
        self.threads = max(1, threads)
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    def __call__(
        self,
        batch: pa.Table,
        ok: list[int],
        images: np.ndarray | None,
        predicted: list[str | None],
        reasons: list[str | None],
        class_names: Sequence[str],
        cam: np.ndarray | None = None,
    ) -> tuple[list[str | None], list[int | None], list[int | None]]:
        """(heatmap_path, peak x, peak y) of every row of ``batch``; None where a row has no map.
        ``images`` are the preprocessed images of the ``ok`` rows, in that order; ``cam`` their
        class-activation maps from the forward pass (None: the model gave none)."""
        from ..explain import cam_heatmaps, heatmap_peak, overlay_png

        n = batch.num_rows
        paths: list[str | None] = [None] * n
        xs: list[int | None] = [None] * n
        ys: list[int | None] = [None] * n
        rows = chosen_rows(self.mode, predicted, reasons)
        if not rows or images is None:
            return paths, xs, ys
        at = {r: k for k, r in enumerate(ok)}
        pix = images[[at[r] for r in rows]]
        classes = [list(class_names).index(str(predicted[r])) for r in rows]  # chosen rows have a label
        if cam is not None and self.method == "auto":
            maps = cam_heatmaps(cam[[at[r] for r in rows]], classes, size=pix.shape[1:])
        else:
            maps = self._gradcam().heatmaps(pix, classes=classes)
        sha = batch.column("sha256").to_pylist()
        slices = batch.column("slice_index").to_pylist()
        boxes = batch.column("crop_box").to_pylist()

        def draw(k: int) -> tuple[bytes, tuple[int, int] | None]:
            # An all-zero map (nothing speaks for the class) has no peak.
            return overlay_png(pix[k], maps[k]), heatmap_peak(maps[k]) if float(maps[k].max()) > 0 else None

        # The maps are drawn on the replica's threads while ONNX Runtime's sit idle between
        # batches (OpenCV and numpy release the GIL); the files are written here, in order.
        drawn = self._pool().map(draw, range(len(rows))) if len(rows) > 1 else map(draw, range(len(rows)))
        for r, image, (png, peak) in zip(rows, pix, drawn):
            name = heatmap_name(sha[r], slices[r], self.model_id)
            self.stage.join(name).write_bytes(png, parents=False)  # the driver made the folder
            paths[r] = f"{self.final_uri}/{name}"
            if peak is not None:
                py, px = peak
                xs[r], ys[r] = original_xy(px, py, crop_box=tuple(boxes[r]), side=image.shape[0])
        return paths, xs, ys

    def _gradcam(self) -> Any:
        """The Grad-CAM explainer on the package's PyTorch model, made on first use (it imports
        torch); with ``auto``, the warning that the model gives no maps of its own."""
        if self._explainer is None:
            from ..explain import Explainer

            if self.method == "auto":
                logger.warning(
                    "score: model %s gives no class-activation maps with its predictions (a model.onnx "
                    "exported before them, or a head other than pooling + linear): heat maps by "
                    "Grad-CAM, a PyTorch pass per map (export the package again for the fast maps)",
                    self.model_id,
                )
            self._explainer = Explainer.from_package(
                self.model_uri, self.s3_endpoint_url, device=self.device, pin=self.pin
            )
        return self._explainer

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="heatmaps")
        return self._threads
