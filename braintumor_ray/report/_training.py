"""The report of a training run (``RUN/report.html``) and of a search (``SEARCH/report.html``).

Both are drawn from what the run already wrote (``metrics.json``'s figures, ``best.json`` and
the leaderboard, the PNG plots beside them) plus a grid of validation examples with their heat
maps that the caller computes with the model in hand. Nothing that exists is replaced: the
PNGs, JSON and CSV files stay as they were, the page embeds copies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import Location
from ._page import (
    REPORT_FILE,
    bar_chart,
    confusion_table,
    data_table,
    esc,
    facts_table,
    fmt,
    img,
    is_png,
    line_chart,
    page,
    risk_coverage,
    section,
    static_table,
    write_html,
)

logger = logging.getLogger(__name__)

SPLITS = ("val", "test", "test_clean")


@dataclass(frozen=True)
class Example:
    """One validation image for the grid: the preprocessed scan and its heat-map overlay (PNG
    bytes; either may be None), the true and predicted class, and the calibrated confidence."""

    true_label: str
    predicted_label: str
    confidence: float
    overlay_png: bytes | None = None
    scan_png: bytes | None = None
    review_reason: str | None = None
    prediction_set: tuple[str, ...] | None = None  # the conformal set (None: a model without sets)


def _read_png(loc: Location) -> bytes | None:
    try:
        data = loc.read_bytes() if loc.exists() else None
    except Exception as e:  # a missing plot costs its figure, not the page
        logger.warning("report: %s not embedded (%s)", loc.uri, e)
        return None
    return data if is_png(data) else None


def _figure(loc: Location, caption: str) -> str:
    data = _read_png(loc)
    if data is None:
        return ""
    return f"<figure>{img(data, caption)}<figcaption>{esc(caption)} ({esc(loc.uri)})</figcaption></figure>"


def metrics_section(m: Mapping[str, Any]) -> str:
    """Overall and per-class figures of val, test and test_clean, and their confusion matrices."""
    splits = [s for s in SPLITS if s in m]
    if not splits:
        return ""
    overall = [[s, m[s]["n"], m[s]["accuracy"], m[s]["macro_f1"], m[s].get("roc_auc_ovr")] for s in splits]
    body = [
        static_table(["split", "n", "accuracy", "macro-F1", "ROC-AUC (one vs rest)"], overall),
        '<div class="tables">',
    ]
    for s in splits:
        pc = m[s].get("per_class") or {}
        rows = [[name, c["precision"], c["recall"], c["f1"], c.get("roc_auc"), c["support"]] for name, c in pc.items()]
        body.append(
            f"<div><h3>{esc(s)}: per class</h3>"
            + data_table(
                f"per-class-{s}",
                ["class", "precision", "recall", "F1", "ROC-AUC", "support"],
                rows,
                types=["str", "num", "num", "num", "num", "int"],
                filters=False,
            )
            + "</div>"
        )
    body.append("</div>")
    cms = [
        confusion_table(
            m[s]["confusion_matrix"],
            m[s]["class_names"],
            f"{s}: accuracy {m[s]['accuracy']:.3f}, macro-F1 {m[s]['macro_f1']:.3f} (n={m[s]['n']}); "
            "rows: true class, shade: share of the row",
        )
        for s in splits
        if m[s].get("confusion_matrix")
    ]
    return section(
        "Metrics",
        "".join(body),
        anchor="metrics",
        note="test_clean: the test split without images that duplicate a training image.",
    ) + section("Confusion matrices", f'<div class="row">{"".join(cms)}</div>', anchor="confusion")


def trust_section(trust: Mapping[str, Any] | None, reliability: Location | None) -> str:
    """Calibration (reliability diagram, ECE, NLL), review flags, and the risk-coverage curve."""
    if not trust:
        return ""
    splits = [s for s in SPLITS if (trust.get(s) or {}).get("n")]
    fig = (
        _figure(reliability, "reliability diagram: accuracy against confidence, before and after calibration")
        if reliability is not None
        else ""
    )
    head = (
        f"temperature {trust['temperature']:.3f}; out-of-distribution detector {esc(str(trust.get('ood_detector')))}; "
        f"rows below confidence {trust['review_threshold']:.3f} or beyond the OOD threshold are flagged for review."
    )
    return section(
        "Calibration and review flags",
        f'{_trust_table(trust, splits)}<div class="row">{fig}{_risk_coverage_chart(trust, splits)}</div>',
        anchor="trust",
        note=head + " Risk-coverage: rows set aside from the least confident up; each point is exact "
        "(the reliability bins' edges), the ringed point is where the review flags put the line.",
    ) + conformal_section(trust)


def _trust_table(trust: Mapping[str, Any], splits: Sequence[str]) -> str:
    """Per split: calibration before and after (ECE, NLL), the share flagged, what the flags catch."""
    rows = [
        [
            s,
            trust[s]["n"],
            trust[s]["ece_before"],
            trust[s]["ece_after"],
            trust[s]["nll_before"],
            trust[s]["nll_after"],
            trust[s].get("flagged"),
            trust[s].get("accuracy"),
            trust[s].get("accuracy_unflagged"),
            trust[s].get("errors_caught"),
        ]
        for s in splits
    ]
    return static_table(
        [
            "split",
            "n",
            "ECE before",
            "ECE after",
            "NLL before",
            "NLL after",
            "flagged",
            "accuracy",
            "accuracy of unflagged",
            "errors caught by flags",
        ],
        rows,
    )


def _risk_coverage_chart(trust: Mapping[str, Any], splits: Sequence[str]) -> str:
    """Risk against coverage per split (from its reliability bins), the review flags' point ringed;
    empty when no split has bins."""
    series, marks = [], []
    for s in splits:
        bins = trust[s].get("reliability") or []
        cov, risk = risk_coverage(bins)
        if cov:
            series.append((s, cov, risk))
        fl, acc = trust[s].get("flagged"), trust[s].get("accuracy_unflagged")
        if fl is not None and acc is not None and fl < 1:
            marks.append((f"{s}: the review flags (keep {1 - fl:.0%})", 1 - fl, 1 - acc))
    if not series:
        return ""
    return line_chart(
        series,
        title="risk-coverage (calibrated confidence)",
        xlabel="coverage (share of rows kept)",
        ylabel="risk (error rate of kept rows)",
        xlim=(0.0, 1.0),
        ylim=(0.0, max([0.05] + [1.1 * v for _, _, r in series for v in r] + [1.1 * m[2] for m in marks])),
        points=marks,
    )


def conformal_section(trust: Mapping[str, Any]) -> str:
    """Prediction sets: coverage and mean set size per split and per true class, the set sizes."""
    splits = [s for s in SPLITS if ((trust.get(s) or {}).get("conformal") or {}).get("n")]
    cal = trust.get("conformal")
    if not splits or not cal:
        return ""
    classes = list(trust[splits[0]]["conformal"].get("per_class") or {})
    head = ["split", "n", "coverage", "mean set size"] + [f"{c} coverage / size" for c in classes]
    rows = []
    for s in splits:
        c = trust[s]["conformal"]
        per = c.get("per_class") or {}
        rows.append(
            [s, c["n"], c["coverage"], c["mean_set_size"]]
            + [
                f"{per[k]['coverage']:.3f} / {per[k]['mean_set_size']:.2f} (n={per[k]['n']})" if k in per else ""
                for k in classes
            ]
        )
    sizes = sorted({k for s in splits for k in trust[s]["conformal"].get("set_sizes", {})}, key=int)
    chart = bar_chart(
        [(s, [trust[s]["conformal"]["set_sizes"].get(k, 0) for k in sizes]) for s in splits],
        sizes,
        title="prediction-set size",
        xlabel="classes in the set",
    )
    note = (
        f"Class-conditional conformal sets ({esc(str(cal.get('score')))} score) at alpha {cal.get('alpha')}: for images like "
        f"the calibration images, each class's true images are in their set at least {1 - float(cal['alpha']):.0%} "
        f"of the time. Calibrated on {cal.get('rows')} validation images (per class {cal.get('counts')}) that fit "
        "neither the temperature nor the review threshold; val here is the other validation images (held out from "
        "the sets' calibration). Test and test_clean only report: shifted data is not covered by the guarantee."
    )
    return section(
        "Prediction sets", static_table(head, rows) + f'<div class="row">{chart}</div>', anchor="sets", note=note
    )


def examples_section(examples: Sequence[Example], *, what: str = "validation") -> str:
    if not examples:
        return ""
    cards = []
    for e in examples:
        wrong = e.true_label != e.predicted_label
        pics = "".join(
            img(p, f"{alt}: {e.true_label}")
            for p, alt in ((e.scan_png, "scan"), (e.overlay_png, "heat map"))
            if is_png(p)
        )
        flag = f'<span class="tag flag">{esc(e.review_reason)}</span>' if e.review_reason else ""
        cards.append(
            f'<div class="card"><div class="pair">{pics}</div><div>{flag}<span class="tag {"flag" if wrong else "ok"}">'
            f"{'wrong' if wrong else 'right'}</span></div><dl><dt>true</dt><dd>{esc(e.true_label)}</dd>"
            f"<dt>predicted</dt><dd>{esc(e.predicted_label)}</dd><dt>confidence</dt><dd>{fmt(e.confidence)}</dd>"
            + (f"<dt>prediction set</dt><dd>{esc(', '.join(e.prediction_set))}</dd>" if e.prediction_set else "")
            + "</dl></div>"
        )
    return section(
        f"{what.capitalize()} examples",
        f'<div class="cards">{"".join(cards)}</div>',
        anchor="examples",
        note=f"{len(examples)} {what} images, mistakes first, then a few of each class: the scan as the model "
        "saw it (after the head crop) and its Grad-CAM heat map for the predicted class.",
    )


def _history_section(hist: Sequence[Mapping[str, Any]], curves: Location) -> str:
    if not hist:
        return ""
    keys = [
        k
        for k in ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_macro_f1", "lr", "epoch_s")
        if k in hist[0]
    ]
    rows = [[h.get(k) for k in keys] for h in hist]
    types = ["int" if k == "epoch" else "num" for k in keys]
    return section(
        "Training curves",
        _figure(curves, "loss, accuracy and macro-F1 per epoch")
        + data_table("history", keys, rows, types=types, filters=False),
        anchor="curves",
    )


def training_report_html(metrics: Mapping[str, Any], run: Location, examples: Sequence[Example] = ()) -> str:
    r = metrics["run"]
    facts = [
        ["run", r.get("uri")],
        ["model", (metrics.get("model") or {}).get("uri")],
        ["model_id", (metrics.get("model") or {}).get("model_id")],
        ["backbone", (r.get("config") or {}).get("model")],
        ["data", r.get("data")],
        ["images", ", ".join(f"{k} {v}" for k, v in (r.get("images") or {}).items())],
        [
            "best epoch",
            f"{metrics['best_epoch']} of {len(metrics['epochs'])}"
            + (" (stopped early)" if metrics.get("stopped_early") else ""),
        ],
        ["restored from epoch(s)", ", ".join(map(str, metrics.get("restores") or [])) or "-"],
        ["wall time", f"{r.get('wall_s')} s"],
        ["Ray / torch", f"{r.get('ray')} / {r.get('torch')}"],
    ]
    config = facts_table(sorted((k, str(v)) for k, v in (r.get("config") or {}).items()))
    summary = facts_table(facts) + f"<details><summary>all settings</summary>{config}</details>"
    body = (
        section("Run", summary, anchor="run")
        + metrics_section(metrics)
        + _history_section(metrics["epochs"], run.join("curves.png"))
        + trust_section(metrics.get("trust"), run.join("reliability.png"))
        + examples_section(examples)
    )
    return page(f"Training run {r['name']}", body, subtitle=esc(r.get("uri") or ""))


def write_training_report(metrics: Mapping[str, Any], run: Location, examples: Sequence[Example] = ()) -> str:
    """``RUN/report.html`` from the run's metrics and plots; returns its URI."""
    return write_html(run.join(REPORT_FILE), training_report_html(metrics, run, examples))


LEADERBOARD_TYPES = {
    "rank": "int",
    "best_epoch": "int",
    "epochs_run": "int",
    "batch_size": "int",
    "best_val_macro_f1": "num",
    "time_s": "num",
    "lr": "num",
    "weight_decay": "num",
    "drop_rate": "num",
    "augment_strength": "num",
}


def search_report_html(
    summary: Mapping[str, Any],
    root: Location,
    *,
    leaderboard: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    examples: Sequence[Example] = (),
) -> str:
    cols = list(columns) + ["error"]
    rows = [[r.get(c) for c in cols] for r in leaderboard]
    board = data_table("leaderboard", cols, rows, types=[LEADERBOARD_TYPES.get(c, "str") for c in cols])
    body = (
        section("Search", facts_table(_search_facts(summary)), anchor="search")
        + section(
            "Leaderboard",
            board,
            anchor="trials-ranked",
            note="One row per trial, best validation macro-F1 first. Click a header to sort; filter per column.",
        )
        + section(
            "Trials",
            _trial_curves(histories, root),
            anchor="trials",
            note="A line that stops early is a trial ASHA stopped (or one that stopped early by itself).",
        )
        + "<h2>The best model</h2>"
        + metrics_section(summary)
        + trust_section(summary.get("trust"), root.join("reliability.png"))
        + examples_section(examples)
    )
    return page(f"Search {posix_name(root)}", body, subtitle=esc(root.uri))


def _search_facts(summary: Mapping[str, Any]) -> list[list[Any]]:
    """The search at a glance: trials, the epochs ASHA saved, the best trial and its model."""
    best = summary.get("best_trial") or {}
    return [
        ["search", summary.get("search")],
        ["trials", summary.get("trials")],
        [
            "trial-epochs run",
            f"{summary.get('trial_epochs_run')} of {summary.get('trial_epochs_budget')} "
            f"(ASHA saved {summary.get('asha_saved_fraction', 0):.0%})",
        ],
        [
            "best trial",
            f"{best.get('trial')} ({best.get('backbone')}), val macro-F1 {fmt(best.get('best_val_macro_f1'))}",
        ],
        ["best model", (summary.get("model") or {}).get("uri")],
        ["model_id", (summary.get("model") or {}).get("model_id")],
        ["wall time", f"{summary.get('wall_s')} s"],
    ]


def _trial_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], root: Location) -> str:
    """Validation macro-F1 and the losses per epoch, one line per trial, and the search's own plot
    of macro-F1 over each trial's time."""
    charts = []
    for key, title in (
        ("val_macro_f1", "validation macro-F1"),
        ("val_loss", "validation loss"),
        ("train_loss", "training loss"),
    ):
        series = [
            (t, [h["epoch"] for h in hist], [h.get(key) for h in hist])
            for t, hist in histories.items()
            if hist and key in hist[0]
        ]
        if series:
            charts.append(
                line_chart(series, title=f"{title} per epoch, one line per trial", xlabel="epoch", ylabel=title)
            )
    return f'<div class="row">{"".join(charts)}</div>' + _figure(
        root.join("val_macro_f1.png"), "validation macro-F1 over each trial's time"
    )


def posix_name(loc: Location) -> str:
    return loc.path.rstrip("/").rsplit("/", 1)[-1]


def write_search_report(summary: Mapping[str, Any], root: Location, **kw: Any) -> str:
    """``SEARCH/report.html`` (leaderboard, per-trial curves, the best model's figures); its URI."""
    return write_html(root.join(REPORT_FILE), search_report_html(summary, root, **kw))
