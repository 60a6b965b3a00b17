"""The HTML report of a training run (and the examples a search's report shows): validation
images with their Grad-CAM maps, computed here where the model is at hand, and the page
:mod:`braintumor_ray.report` draws from ``metrics.json`` and the plots."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core import CLASS_NAMES, Location
from ..report import Example, write_training_report

logger = logging.getLogger(__name__)

# Images in the grid: 4 per class. Grad-CAM of 16 images at 224 px is under a second on CPU.
EXAMPLES_PER_CLASS = 4
# Validation images looked at to choose them (the first ones Ray hands out: no full pass).
EXAMPLES_SCANNED = 512


def validation_examples(
    model: torch.nn.Module,
    dataset,
    *,
    trust=None,
    class_names: Sequence[str] = CLASS_NAMES,
    per_class: int = EXAMPLES_PER_CLASS,
    scanned: int = EXAMPLES_SCANNED,
    batch_size: int = 64,
) -> list[Example]:
    """Up to ``per_class`` x classes validation images for the report's grid: the mistakes
    among the first ``scanned`` images first (at most half the grid), then each class's first
    images in turn; each with its scan, Grad-CAM overlay for the predicted class, and the
    (calibrated, with ``trust``) confidence."""
    from ..explain import Explainer, overlay_png
    from ..imaging import encode_png
    from ..models import data_config

    dcfg = data_config(model)
    first = _first_outputs(model, dataset, scanned=scanned, batch_size=batch_size)
    if first is None:
        return []
    x, y, lo, fe = first
    if trust is not None:
        a = trust.assess(lo, fe)
        probs, reasons, sets = a.probs, list(a.review_reason), a.prediction_sets(class_names)
    else:
        from ..trust import softmax

        probs, reasons, sets = softmax(lo), [None] * len(lo), None
    pred = probs.argmax(1)
    chosen = pick_examples(pred, y, classes=len(class_names), per_class=per_class)
    maps = Explainer(model, mean=dcfg["mean"], std=dcfg["std"], class_names=class_names).heatmaps(
        x[chosen], classes=[int(pred[i]) for i in chosen]
    )
    return [
        Example(
            true_label=class_names[int(y[i])],
            predicted_label=class_names[int(pred[i])],
            confidence=float(probs[i].max()),
            overlay_png=overlay_png(x[i], m),
            scan_png=encode_png(x[i]),
            review_reason=reasons[i],
            prediction_set=tuple(sets[i]) if sets else None,
        )
        for i, m in zip(chosen, maps)
    ]


def _first_outputs(
    model: torch.nn.Module, dataset, *, scanned: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The first ``scanned`` images of ``dataset`` with their labels, logits and features (None:
    an empty dataset)."""
    from ..models import WithFeatures, data_config, prepare_input

    dcfg = data_config(model)
    net = WithFeatures(model).eval()
    images, labels, logits, feats = [], [], [], []
    with torch.inference_mode():
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            lo, fe = net(prepare_input(batch["image"], mean=dcfg["mean"], std=dcfg["std"]))
            images.append(batch["image"])
            labels.append(batch["label"])
            logits.append(lo.float().numpy())
            feats.append(fe.float().numpy())
            if sum(len(x) for x in images) >= scanned:
                break
    if not images:
        return None
    x, y = np.concatenate(images)[:scanned], np.concatenate(labels)[:scanned]
    return x, y, np.concatenate(logits)[:scanned], np.concatenate(feats)[:scanned]


def pick_examples(pred: np.ndarray, y: np.ndarray, *, classes: int, per_class: int) -> list[int]:
    """Indices of the report's grid: the mistakes first (at most half of ``per_class`` x
    ``classes``), then each class's correctly predicted images in turn."""
    total = per_class * classes
    chosen = [int(i) for i in np.nonzero(pred != y)[0][: total // 2]]
    queues = [[int(i) for i in np.nonzero((y == c) & (pred == y))[0]] for c in range(classes)]
    while len(chosen) < total and any(queues):
        for q in queues:
            if q and len(chosen) < total:
                chosen.append(q.pop(0))
    return chosen


def write_run_report(metrics: dict[str, Any], run: Location, *, model: torch.nn.Module, trust, data) -> str:
    """``RUN/report.html``: the run's figures and a grid of validation examples with their maps."""
    examples = validation_examples(model, data.datasets["val"], trust=trust) if "val" in data.datasets else []
    return write_training_report(metrics, run, examples)
