"""After training: fit what makes each prediction trustworthy, on splits the test sets never touch.

The best model runs once over every split in the driver (one forward pass gives logits and
penultimate features): the temperature and the review threshold come from validation, the
out-of-distribution reference from the training split's features (its threshold from
validation). Test and test_clean only report: ECE and NLL before and after, how many rows would
be flagged, the accuracy of those that stand, and the share of errors caught.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..core import CLASS_NAMES, Location
from ..trust import (
    REVIEW_REASONS,
    Trust,
    TrustConfig,
    calibration_report,
    coverage_report,
    fit_trust,
    reliability_bins,
    softmax,
    split_calibration,
)
from ._data import TrainData
from ._outputs import pyplot, save_figure

logger = logging.getLogger(__name__)

RELIABILITY_PNG = "reliability.png"


def model_outputs(model: torch.nn.Module, dataset, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Logits, penultimate features, labels and leak flags of every image of a Ray dataset split."""
    from ..models import WithFeatures, data_config, prepare_input

    dcfg = data_config(model)
    net = WithFeatures(model).eval()
    out: dict[str, list] = {"logits": [], "features": [], "labels": [], "leaked": []}
    with torch.inference_mode():
        for batch in dataset.iter_torch_batches(batch_size=batch_size):
            lo, fe = net(prepare_input(batch["image"], mean=dcfg["mean"], std=dcfg["std"]))
            out["logits"].append(lo.float().numpy())
            out["features"].append(fe.float().numpy())
            out["labels"].append(batch["label"].numpy())
            out["leaked"].append(batch["leaked"].numpy().astype(bool))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def split_outputs(model: torch.nn.Module, data: TrainData, *, batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """:func:`model_outputs` of every split the data has (train, val, test): one pass each, which
    the trust fit and the metrics (:func:`output_metrics`) share."""
    return {
        s: model_outputs(model, data.datasets[s], batch_size=batch_size)
        for s in ("train", "val", "test")
        if s in data.datasets
    }


def output_metrics(outs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class figures and loss on val, test and test_clean (the raw
    logits, before any temperature), from outputs already computed."""
    from ._loop import eval_metrics

    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        if split not in outs:
            continue
        o = outs[split]
        logits = o["logits"].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        ev = {
            "probs": softmax(o["logits"]),
            "labels": o["labels"],
            "losses": log_z - logits[np.arange(len(logits)), o["labels"].astype(int)],
            "leaked": o["leaked"],
        }
        metrics[split] = eval_metrics(ev)
        if split == "test":
            metrics["test_clean"] = eval_metrics(ev, ~o["leaked"])
    return metrics


def fit_model_trust(
    model: torch.nn.Module,
    data: TrainData,
    cfg: TrustConfig,
    *,
    seed: int = 0,
    batch_size: int = 64,
    outputs: dict[str, dict[str, np.ndarray]] | None = None,
) -> tuple[Trust, dict[str, Any]]:
    """The package's :class:`Trust` and the figures ``metrics.json`` records under ``trust``
    (``outputs``: :func:`split_outputs`, when the caller has them)."""
    outs = outputs if outputs is not None else split_outputs(model, data, batch_size=batch_size)
    tr, va = outs["train"], outs["val"]
    trust = fit_trust(
        cfg,
        train_features=tr["features"],
        train_labels=tr["labels"],
        val_logits=va["logits"],
        val_features=va["features"],
        val_labels=va["labels"],
        seed=seed,
    )
    # Validation's conformal figures: on the rows that did not calibrate the sets (split as fit_trust splits).
    held_out = ~split_calibration(va["labels"], cfg.conformal_fraction, seed=seed)
    splits = {"val": va}
    if "test" in outs:
        te = outs["test"]
        splits["test"] = te
        splits["test_clean"] = {k: v[~te["leaked"]] for k, v in te.items()}
    report: dict[str, Any] = {
        "temperature": trust.temperature,
        "ood_detector": trust.detector,
        "ood_threshold": trust.ood_threshold,
        "review_threshold": trust.review_threshold,
    }
    for name, o in splits.items():
        report[name] = split_report(trust, o)
        if trust.conformal is not None:
            keep = held_out if name == "val" else np.ones(len(o["labels"]), bool)
            report[name]["conformal"] = coverage_report(
                trust.conformal, softmax(o["logits"][keep], trust.temperature), o["labels"][keep], CLASS_NAMES
            )
    if trust.conformal is not None:
        report["conformal"] = trust.report.get("conformal")
        logger.info(
            "trust: prediction sets at alpha %g, val (held out) coverage %.3f, mean set size %.2f",
            trust.conformal.alpha,
            report["val"]["conformal"].get("coverage", float("nan")),
            report["val"]["conformal"].get("mean_set_size", float("nan")),
        )
    logger.info(
        "trust: temperature %.3f, %s OOD threshold %.4g, review below confidence %.3f; val ECE %.3f -> %.3f",
        trust.temperature,
        trust.detector,
        trust.ood_threshold,
        trust.review_threshold,
        report["val"]["ece_before"],
        report["val"]["ece_after"],
    )
    return trust, report


def split_report(trust: Trust, o: dict[str, np.ndarray]) -> dict[str, Any]:
    """Calibration and abstention figures of one split."""
    y = o["labels"]
    if not len(y):
        return {"n": 0}
    a = trust.assess(o["logits"], o["features"])
    correct = a.probs.argmax(1) == y
    flagged = np.array([r is not None for r in a.review_reason])
    return {
        **calibration_report(o["logits"], y, trust.temperature),
        "flagged": float(flagged.mean()),
        **{f"flagged_{r}": float(np.mean([x == r for x in a.review_reason])) for r in REVIEW_REASONS},
        "accuracy": float(correct.mean()),
        "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
        "errors_caught": float((~correct & flagged).sum() / (~correct).sum()) if (~correct).any() else None,
        "reliability": reliability_bins(a.probs, y),
        "reliability_uncalibrated": reliability_bins(softmax(o["logits"]), y),
    }


def write_reliability(report: dict[str, Any], run: Location) -> str:
    """``reliability.png``: accuracy against confidence per bin, before and after calibration."""
    plt = pyplot()
    splits = [s for s in ("val", "test", "test_clean") if report.get(s, {}).get("n")]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4), squeeze=False)
    for ax, s in zip(axes[0], splits):
        r = report[s]
        for key, label, style in (
            ("reliability_uncalibrated", f"raw (ECE {r['ece_before']:.3f})", "--o"),
            ("reliability", f"T={report['temperature']:.2f} (ECE {r['ece_after']:.3f})", "-s"),
        ):
            pts = [(b["confidence"], b["accuracy"]) for b in r[key] if b["n"]]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{s} (n={r['n']})")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, run.join(RELIABILITY_PNG))
