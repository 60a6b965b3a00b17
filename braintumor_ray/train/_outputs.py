"""What a training run and a search write besides checkpoints: PNG plots on storage (local or
``s3://``) and the figures a model package carries. One place, used by both ``run_training``
and ``run_search``."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from ..core import Location

EVAL_SPLITS = ("val", "test", "test_clean")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display: clusters, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, loc: Location, *, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG to ``loc`` (local or ``s3://``), close it; returns the URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    loc.write_bytes(buf.getvalue())
    return loc.uri


def package_metrics(evaluations: Mapping[str, Mapping[str, Any]], **first: Any) -> dict[str, Any]:
    """The ``metrics`` a model package records: ``first`` (e.g. the best epoch, the trial), then
    accuracy and macro-F1 of each split evaluated (val, test, test_clean)."""
    out = dict(first)
    for split in EVAL_SPLITS:
        if split in evaluations:
            out[f"{split}_accuracy"] = evaluations[split]["accuracy"]
            out[f"{split}_macro_f1"] = evaluations[split]["macro_f1"]
    return out


def write_plots(metrics: dict[str, Any], run: Location) -> list[str]:
    """``curves.png`` (loss, accuracy, macro-F1 per epoch) and ``confusion_<split>.png``."""
    plt = pyplot()
    written = []
    hist = metrics["epochs"]
    ep = [h["epoch"] for h in hist]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, (("loss", "loss"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"))):
        for split, style in (("train", "-o"), ("val", "-s")):
            k = f"{split}_{key}"
            if hist and k in hist[0]:
                ax.plot(ep, [h[k] for h in hist], style, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{metrics['run']['name']} (best epoch {metrics['best_epoch']})")
    fig.tight_layout()
    written.append(save_figure(fig, run.join("curves.png")))
    for split in EVAL_SPLITS:
        if split not in metrics:
            continue
        m = metrics[split]
        cm = m["confusion_matrix"]
        fig, ax = plt.subplots(figsize=(5.2, 4.6))
        ax.imshow(cm, cmap="Blues")
        names = m["class_names"]
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        top = max(max(r) for r in cm) or 1
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} (n={m['n']})")
        fig.tight_layout()
        written.append(save_figure(fig, run.join(f"confusion_{split}.png")))
    return written
