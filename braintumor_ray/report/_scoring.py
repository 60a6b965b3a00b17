"""The review report of a scoring output: ``OUTPUT/_report.html``, rebuilt after every run.

It lives inside the output folder because that is the one place a reader of the output
already has (and the permissions to): copying or syncing the folder takes the report along,
and on S3 it is one more object under the same prefix. Parquet readers skip it as they skip
``_config.yaml`` (pyarrow, pandas, Spark and Ray Data ignore ``_``- and ``.``-prefixed files; a
DuckDB glob ``OUTPUT/*.parquet`` never matches it).

What the page holds, all of it from the Parquet (nothing is read from the scanned files, so
no identifier appears that the output's path mode left out): counts by predicted class,
status and review reason; the per-series verdicts; the cases to review first (rows with a
review reason, then tumour predictions), each with its heat-map overlay when the predictions
name one (``heatmap_path``); and every prediction in a table that sorts and filters in the
page. A changed file's older rows (superseded by a later scoring of the same path with the
same model) are left out, as the series table leaves them out. Only the files the output's
manifest names (``_manifest.json``, their sha256 checked) are read: a Parquet file planted in
the output is never shown, nor any heat map it names; and only maps inside the job's own
maps folder are embedded. Rows of input files deleted since they were scored show as
``withdrawn`` (in the counts and the table, not among the cases); the model id of each group
of rows is listed, and each case card names its model.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import Location, Manifest, committed_table, latest_rows
from ._page import bar_chart, data_table, esc, fmt, img, is_png, page, section, static_table, write_html

logger = logging.getLogger(__name__)

SCORING_REPORT = "_report.html"
PROB_PREFIX = "prob_"
NO_TUMOR = "no_tumor"
# Cases shown with their heat maps: each overlay is tens of kB, so 300 keep the page near 20 MB
# at most; the rest stay one click away in the table.
MAX_CASES = 300
# Rows embedded in the predictions table (about 300 bytes each); flagged and failed rows come
# first, so what a reviewer needs is never the part left out.
MAX_TABLE_ROWS = 20_000
MAP_READERS = 16
REASON_ORDER = {"out_of_distribution": 0, "low_confidence": 1, "ambiguous": 2}

_TABLE_COLUMNS = [
    "path",
    "predicted_label",
    "confidence",
    "ood_score",
    "review_reason",
    "prediction_set",
    "set_size",
    "status",
    "error",
]
_OPTIONAL_COLUMNS = ["study_instance_uid", "series_instance_uid", "sop_instance_uid", "instance_number", "slice_index"]
_TAIL_COLUMNS = ["model_id", "scored_at"]
_SERIES_COLUMNS = [
    "predicted_label",
    "confidence",
    "review_reason",
    "prediction_set",
    "set_size",
    "slices_scored",
    "slices_failed",
    "slices_voting",
    "study_instance_uid",
    "series_instance_uid",
    "volume_path",
    "top_slice_path",
    "top_slice_instance_number",
    "top_slice_index",
    "model_id",
]
_TYPES = {
    "error": "long",
    "confidence": "num",
    "ood_score": "num",
    "top_probability": "num",
    "instance_number": "int",
    "slice_index": "int",
    "set_size": "int",
    "slices_scored": "int",
    "slices_failed": "int",
    "slices_voting": "int",
    "top_slice_instance_number": "int",
    "top_slice_index": "int",
}


def scoring_report_location(dst: Location) -> Location:
    return dst.join(SCORING_REPORT)


def read_predictions(dst: Location, rows: pa.Table | None = None) -> tuple[pd.DataFrame, int]:
    """Every committed row of the output (the columns the report shows), less the rows a later
    scoring of the same file superseded; and how many rows the Parquet holds in all.
    ``rows``: the output's committed rows, when the caller holds them (the scoring job does);
    else read here from the files its manifest names."""
    if rows is None:
        rows = committed_table(Manifest(dst, what="report").committed())  # committed files only, bytes checked
    total = rows.num_rows
    if total and "scored_at" in rows.column_names and "model_id" in rows.column_names:
        rows = latest_rows(rows, by=("model_id", "path"))
    want = [
        c
        for c in rows.column_names
        if c in _TABLE_COLUMNS + _OPTIONAL_COLUMNS + _TAIL_COLUMNS
        or c.startswith(PROB_PREFIX)
        or c.startswith("heatmap_")
    ]
    df = rows.select(want).to_pandas() if total else pd.DataFrame()
    for c in _TABLE_COLUMNS + _OPTIONAL_COLUMNS + _TAIL_COLUMNS:
        if c not in df:
            df[c] = None
    df["prediction_set"] = df["prediction_set"].map(set_text)
    return df.reset_index(drop=True), total


def set_text(v: Any) -> str | None:
    """A prediction set as the page shows it: ``glioma, meningioma`` (None without one)."""
    if v is None or isinstance(v, (float, str)):
        return None if v is None or isinstance(v, float) else v
    return ", ".join(str(c) for c in v)


def set_size_histogram(frames: list[tuple[str, pd.DataFrame]], classes: int) -> str:
    """Rows per prediction-set size (1 .. the number of classes), one bar series per frame."""
    sizes = [str(k) for k in range(1, max(2, classes) + 1)]
    bars = []
    for label, f in frames:
        n = (
            pd.to_numeric(f["set_size"], errors="coerce").dropna().astype(int).value_counts()
            if len(f)
            else pd.Series(dtype=int)
        )
        bars.append((label, [int(n.get(int(k), 0)) for k in sizes]))
    if not any(sum(v) for _, v in bars):
        return ""
    return bar_chart(bars, sizes, title="prediction-set size", xlabel="classes in the set")


def review_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a review reason (out of distribution first, least confident first), then
    tumour predictions (most confident first), then failed rows, then the rest by path."""
    reason = df["review_reason"].map(lambda r: REASON_ORDER.get(r, 2) if isinstance(r, str) else None)
    tumour = df["predicted_label"].notna() & (df["predicted_label"] != NO_TUMOR)
    conf = pd.to_numeric(df["confidence"], errors="coerce")
    group = pd.Series(4, index=df.index)
    group[df["status"] == "error"] = 3
    group[tumour & reason.isna()] = 2
    group[reason.notna()] = 1
    key = pd.DataFrame(
        {
            "g": group,
            "r": reason.fillna(9),
            # least confident first among the flagged, most confident first among tumours
            "c": conf.where(group != 2, -conf).fillna(9.0),
            "p": df["path"].astype(str),
        }
    )
    return df.loc[key.sort_values(["g", "r", "c", "p"], kind="stable").index].reset_index(drop=True)


def is_case(df: pd.DataFrame) -> pd.Series:
    """The rows to look at first: a review reason, or a tumour class (not withdrawn: the file is gone)."""
    return (df["status"] != "withdrawn") & (
        df["review_reason"].notna() | (df["predicted_label"].notna() & (df["predicted_label"] != NO_TUMOR))
    )


def heatmap_location(dst: Location, value: str) -> Location:
    """A ``heatmap_path`` as the predictions hold it (a URI, or relative to the folder that
    holds the output) on the output's own filesystem (its S3 endpoint and credentials)."""
    if value.startswith("s3://"):
        return Location(uri=value, path=value[len("s3://") :], fs=dst.fs, is_s3=True)
    if value.startswith("/"):
        return Location(uri=value, path=value, fs=dst.fs, is_s3=dst.is_s3)
    parent = posixpath.dirname(dst.path.rstrip("/"))
    path = posixpath.normpath(posixpath.join(parent, value))
    return Location(uri=dst.uri_of(path), path=path, fs=dst.fs, is_s3=dst.is_s3)


def _counts(df: pd.DataFrame, column: str, order: list[str] | None = None, none_label: str = "(none)") -> list[list]:
    vc = df[column].fillna(none_label).value_counts()
    keys = [k for k in (order or []) if k in vc.index] + sorted(k for k in vc.index if k not in (order or []))
    return [[k, int(vc[k]), f"{vc[k] / max(len(df), 1):.1%}"] for k in keys]


def _read_map(
    dst: Location,
    value: str,
    maps: Location | None = None,
    listed: Mapping[str, Mapping[str, Any]] | None = None,
    staged: Location | None = None,
) -> bytes | None:
    """A heat map's bytes, or None (with a warning) unless it is a plain child of the job's maps
    folder (no ``..``: ``OUTPUT_explain/../elsewhere/x.png`` was embedded once) and, when the
    output lists its maps (``listed``), named there with these bytes' sha256. ``staged``: the maps
    the run being committed staged (listed by its commit, not yet moved): read there when there."""
    loc = heatmap_location(dst, value)
    name = posixpath.basename(loc.path)
    if maps is not None and (".." in value.split("/") or posixpath.dirname(loc.path) != maps.path.rstrip("/")):
        logger.warning("report: heat map %s not shown: it is not in the job's maps folder %s", value, maps.uri)
        return None
    if listed is not None and name not in listed:
        logger.warning("report: heat map %s not shown: the output's manifest does not list it", value)
        return None
    if staged is not None and staged.join(name).exists():
        loc = staged.join(name)
    try:
        data = loc.read_bytes()
    except Exception as e:  # a removed or unreadable map costs its picture, not the report
        logger.warning("report: heat map %s not shown (%s)", value, e)
        return None
    if listed is not None and hashlib.sha256(data).hexdigest() != listed[name].get("sha256"):
        logger.warning("report: heat map %s not shown: its bytes are not the ones committed", value)
        return None
    return data


def _card(row: pd.Series, maps: dict[str, bytes | None], probs: list[str], extra: list[str]) -> tuple[str, bool]:
    """One case: its overlay (when there is one), what the model said, and why it is here."""
    image, embedded = "", False
    hp = row.get("heatmap_path")
    if isinstance(hp, str) and hp:
        data = maps.get(hp)
        if is_png(data):
            image, embedded = img(data, f"heat map of {row['path']}"), True
        else:
            image = '<p class="note">heat map missing or not a PNG</p>'
    reason = row.get("review_reason")
    label = row.get("predicted_label")
    tag = (f'<span class="tag flag">{esc(reason)}</span>' if isinstance(reason, str) else "") + (
        f'<span class="tag {"tumour" if label != NO_TUMOR else "ok"}">{esc(label)}</span>'
        if isinstance(label, str)
        else ""
    )
    facts = [
        ("model", fmt(row.get("model_id"))),
        ("confidence", fmt(row.get("confidence"))),
        ("ood score", fmt(row.get("ood_score"))),
    ]
    if isinstance(row.get("prediction_set"), str):
        facts.insert(1, ("prediction set", row["prediction_set"]))
    facts += [(c[len(PROB_PREFIX) :], fmt(row.get(c))) for c in probs]
    for c in ("instance_number", "slice_index"):
        v = row.get(c)
        if v is not None and not pd.isna(v):
            facts.append((c.replace("_", " "), str(int(v))))
    for c in extra:  # the map's peak (pandas holds integers with gaps as floats)
        v = row.get(c)
        v = int(v) if isinstance(v, float) and v.is_integer() else v
        if fmt(v):
            facts.append((c.replace("_", " "), fmt(v)))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return (
        f'<div class="card">{image}<div>{tag}</div><div class="path">{esc(str(row["path"]))}</div><dl>{dl}</dl></div>'
    ), embedded


def _counts_section(df: pd.DataFrame, ok: pd.DataFrame, probs: list[str]) -> str:
    """Rows by predicted class, status, review reason and prediction-set size."""
    by_class = []
    for k, n, share in _counts(ok, "predicted_label"):
        sub = ok[ok["predicted_label"] == k]
        by_class.append([k, n, share, int(sub["review_reason"].notna().sum())])
    counts = (
        '<div class="tables">'
        + "<div><h3>Predicted class (ok rows)</h3>"
        + static_table(["class", "rows", "share", "flagged for review"], by_class)
        + "</div>"
        + "<div><h3>Status</h3>"
        + static_table(["status", "rows", "share"], _counts(df, "status", ["ok", "error", "skipped", "withdrawn"]))
        + "</div>"
        + "<div><h3>Review reason (ok rows)</h3>"
        + static_table(
            ["review reason", "rows", "share"],
            _counts(ok, "review_reason", list(REASON_ORDER), none_label="none (the prediction stands)"),
        )
        + "</div>"
    )
    hist = set_size_histogram([("ok rows", ok)], len(probs)) if len(ok) else ""
    if hist:
        sized = ok[pd.to_numeric(ok["set_size"], errors="coerce").notna()]
        counts += (
            "<div><h3>Prediction-set size (ok rows)</h3>"
            + static_table(
                ["classes in the set", "rows", "share"],
                _counts(sized.assign(set_size=sized["set_size"].astype(int).astype(str)), "set_size"),
            )
            + hist
            + "</div>"
        )
    counts += "</div>"
    return section("Counts", counts, anchor="counts")


def _models_section(df: pd.DataFrame) -> str:
    """Which model wrote which rows (one model per output unless an output predates that rule)."""
    by_model = df.groupby(df["model_id"].fillna("(none)"))
    model_rows = [
        [m, int(len(g)), int((g["status"] == "withdrawn").sum()), fmt(g["scored_at"].max())] for m, g in by_model
    ]
    return section(
        "Models",
        static_table(["model id", "rows", "withdrawn", "last scored"], model_rows),
        anchor="models",
        note="The model id of each group of rows (every case card names its own).",
    )


def _series_section(series: Location | pa.Table | None, dst: Location) -> str | None:
    """The per-series verdicts; None for an output of plain images."""
    if isinstance(series, Location):
        series = pq.read_table(series.path, filesystem=series.pyarrow_fs) if series.exists() else None
    if series is not None and series.num_rows:  # none for an output of plain images
        st = series.to_pandas()
        cols = [c for c in _SERIES_COLUMNS if c in st and st[c].notna().any()]
        if len(st):
            st = review_order(st.assign(path=st.get("top_slice_path"), status="ok"))
        if "prediction_set" in st:
            st["prediction_set"] = st["prediction_set"].map(set_text)
        rows = st[cols].astype(object).where(st[cols].notna(), None).values.tolist()
        verdicts = static_table(["verdict", "series or volumes", "share"], _counts(st, "predicted_label"))
        return section(
            "Series verdicts",
            verdicts + data_table("series", cols, rows, types=[_TYPES.get(c, "str") for c in cols]),
            anchor="series-verdicts",
            note="One row per DICOM series or NIfTI volume (" + esc(dst.uri.rstrip("/")) + "_series/); flagged "
            "verdicts first. A series' verdict is the mean tumour probability of its top 3 slices that show enough head.",
        )
    return None


def _predictions_section(df: pd.DataFrame, dst: Location, max_rows: int) -> str:
    """Every prediction (the first ``max_rows``, flagged first) in a sortable, filterable table."""
    cols = _TABLE_COLUMNS + [c for c in _OPTIONAL_COLUMNS if df[c].notna().any()] + _TAIL_COLUMNS
    table = df.head(max_rows)
    rows = table[cols].astype(object).where(table[cols].notna(), None).values.tolist()
    note = (
        "Click a header to sort, click again to reverse; type in a column's box to filter (on numbers also "
        "<code>&gt;0.9</code> or <code>&lt;=0.5</code>). Flagged rows first, then tumours, then errors."
    )
    if len(df) > max_rows:
        note += (
            f' <span class="notice">The table holds the first {max_rows} of {len(df)} rows (flagged, tumour and '
            f"failed rows first); every row is in the Parquet dataset {esc(dst.uri)}.</span>"
        )
    return section(
        "Predictions",
        data_table("predictions", cols, rows, types=[_TYPES.get(c, "str") for c in cols]),
        anchor="all-predictions",
        note=note,
    )


def _cases_section(
    df: pd.DataFrame,
    cases: pd.DataFrame,
    dst: Location,
    probs: list[str],
    *,
    maps: Location | None,
    map_files: Mapping[str, Mapping[str, Any]] | None,
    staged_maps: Location | None = None,
    max_cases: int,
) -> str:
    """A card per row to review first, with its heat map when the maps' manifest lists it."""
    shown = cases.head(max_cases)
    cards, embedded = [], 0
    extra = [c for c in df.columns if c.startswith("heatmap_") and c != "heatmap_path"]
    wanted = sorted({v for v in shown.get("heatmap_path", pd.Series(dtype=object)) if isinstance(v, str) and v})
    # Side by side: on S3 each map is a GET of tens of ms, 300 of them one after the other ~10 s.
    with ThreadPoolExecutor(MAP_READERS) as pool:
        read = dict(zip(wanted, pool.map(lambda v: _read_map(dst, v, maps, map_files, staged_maps), wanted)))
    for _, row in shown.iterrows():
        html_card, has = _card(row, read, probs, extra)
        cards.append(html_card)
        embedded += has
    note = (
        f"{len(cases)} rows to review first: rows with a review reason (out of distribution, then low confidence, "
        "then ambiguous: a prediction set of more than one class; least confident first), then tumour predictions "
        "(most confident first). A row's prediction set holds the classes still in play: at the model's conformal "
        "alpha it misses the true class of at most that share of each class's images like the calibration images."
    )
    if len(cases) > max_cases:
        note += f' <span class="notice">Showing the first {max_cases} of {len(cases)}; the rest are in the table below.</span>'
    if len(shown) and not embedded:
        note += " No heat maps: score with --explain to add them."
    body = f'<div class="cards">{"".join(cards)}</div>' if cards else "<p>No row is flagged or predicted a tumour.</p>"
    return section("Cases to review", body, anchor="cases", note=note)


def scoring_report_html(
    dst: Location,
    *,
    series: Location | pa.Table | None = None,
    maps: Location | None = None,
    max_cases: int = MAX_CASES,
    max_rows: int = MAX_TABLE_ROWS,
    rows: pa.Table | None = None,
    map_files: Mapping[str, Mapping[str, Any]] | None = None,
    staged_maps: Location | None = None,
) -> str:
    """The page; ``series``: the per-series table (the scoring job gives the one it built from its
    committed rows; a location is read); ``maps``: the folder the job writes heat maps to (only
    maps in it are embedded); ``rows``: the output's committed rows, when the caller holds them;
    ``map_files``: the maps the output's manifest lists, by name (only those maps, with those bytes,
    are embedded); ``staged_maps``: where the maps of the run being committed are staged."""
    df, total = read_predictions(dst, rows)
    df = review_order(df) if len(df) else df
    probs = sorted(c for c in df.columns if c.startswith(PROB_PREFIX))
    ok = df[df["status"] == "ok"] if len(df) else df
    parts = []
    superseded = total - len(df)
    models = sorted(str(m) for m in df["model_id"].dropna().unique()) if len(df) else []
    last = df["scored_at"].max() if len(df) and df["scored_at"].notna().any() else None
    subtitle = (
        f"{esc(dst.uri)} &middot; {len(df)} rows"
        + (f" ({superseded} older row{'s' if superseded > 1 else ''} of rescored files left out)" if superseded else "")
        + f" &middot; model {', '.join(esc(m) for m in models) or '-'}"
        + f" &middot; last scored {esc(fmt(last))} &middot; report written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )

    cases = df[is_case(df)] if len(df) else df
    nav = [
        '<a href="#counts">counts</a>',
        '<a href="#cases">cases to review</a>',
        '<a href="#all-predictions">predictions</a>',
    ]

    parts.append(_counts_section(df, ok, probs))

    if len(df):
        parts.append(_models_section(df))

    verdicts = _series_section(series, dst)
    if verdicts:
        parts.append(verdicts)
        nav.insert(1, '<a href="#series-verdicts">series</a>')

    parts.append(
        _cases_section(
            df, cases, dst, probs, maps=maps, map_files=map_files, staged_maps=staged_maps, max_cases=max_cases
        )
    )

    parts.append(_predictions_section(df, dst, max_rows))
    toc = f'<nav class="toc">{"".join(nav)}</nav>'
    return page("Scoring review report", toc + "".join(parts), subtitle=subtitle)


def write_scoring_report(dst: Location, *, series: Location | None = None, **kw: Any) -> str:
    """Rebuild ``OUTPUT/_report.html`` from every committed row; returns its URI."""
    return write_html(scoring_report_location(dst), scoring_report_html(dst, series=series, **kw))
