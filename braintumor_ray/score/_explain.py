"""Heat maps in a scoring run (``--explain``): which rows get one, and the PNGs in ``OUTPUT_explain/``.

Each chosen row gets the heat-map overlay of the preprocessed scan the model saw
(:mod:`braintumor_ray.explain`), written by the model actor that scored it into the run's own
staging folder, ``OUTPUT_explain._staging/<run>/``; the run commits that folder just before its
predictions, so a row's ``heatmap_path`` never names a file that is not there. File names come
from the content (sha256, slice, model id), not the input path: a redone run overwrites its
maps instead of adding copies, and no patient name reaches a file name.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..core import Location, resolve
from ..imaging import original_xy
from ._series import NO_TUMOR

logger = logging.getLogger(__name__)

EXPLAIN_SUFFIX = "_explain"


def explain_location(dst: Location) -> Location:
    """``OUTPUT_explain`` beside ``OUTPUT`` (outside any glob over the predictions)."""
    return dst.sibling(EXPLAIN_SUFFIX)


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
            self.stage.join(name).write_bytes(png)
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
