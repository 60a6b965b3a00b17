"""The per-series table of a scoring output: one row per DICOM series or NIfTI volume and model.

It is derived data, rebuilt from every committed prediction row (never patched run by run),
so it stays right whatever the history of incremental runs, changed files and cut-off runs.
The scoring job builds it in memory from the rows it committed (:func:`series_table`) and
gives that table to the DICOM step and the report; the file is written for users only and is
never read back by the job.
It lives in a sibling folder, ``OUTPUT_series/series.parquet``, so that the predictions folder
keeps one schema and reads as-is with pandas, pyarrow and DuckDB.

Which rows count: the latest scoring of each file (a changed file's old rows are left out,
as a NIfTI volume's old slices are), then the latest row of each DICOM instance (a file
copied under two names counts once).

The verdict (:func:`series_verdict`): only slices that show enough of the head vote (the crop's
``head_fraction`` at least half the series' largest, so the top and bottom of a head, with
little brain in them, do not), and out-of-distribution slices do not vote. When at least
``OOD_SHARE`` (half) of the head-showing slices are out of distribution, the series has no
verdict and its ``review_reason`` is ``out_of_distribution``: a model that does not know a
volume gives no answer from its few unflagged slices. Slices skipped for no content or no head
(a volume's empty ends) are counted in ``slices_skipped`` and take no part. The series'
tumour score is the mean of the top ``k`` = 3 voting slices' calibrated tumour probabilities
(1 - p(no_tumor)): a tumour shows on a few slices of a volume, so a majority vote would hide
it, while a single noisy slice (one of three) cannot reach 0.5 alone. A score of 0.5 or more
names the tumour class with the most probability on those slices; below, ``no_tumor``. The
series' ``confidence`` is the score (or 1 - score for ``no_tumor``), and its ``review_reason``
is ``out_of_distribution`` when no slice could vote because of it, ``no_head_content`` when
none shows enough head, ``low_confidence`` below the model's review threshold, or ``ambiguous``
when its prediction set holds more than one class. Models without a ``no_tumor`` class take
the highest mean probability of the voting slices.

The series' ``prediction_set`` is the union of the sets of the slices that decide the verdict
(the top ``k`` voting slices; all voting slices for models without ``no_tumor``), and the
verdict's class: every diagnosis still in play on the slices that carry the evidence. Each
slice's set has the conformal guarantee for slices like the calibration images; the union is
no calibrated series-level set (no series were calibrated), only larger, so at least as often
right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import Location, latest_rows
from ..imaging import SLICE_SKIP_REASONS
from ._layout import PROB_PREFIX, SERIES_SUFFIX

logger = logging.getLogger(__name__)

NO_TUMOR = "no_tumor"
TOP_K = 3
# A slice votes when its head covers at least this share of the series' largest head section.
HEAD_SHARE = 0.5
# A series is out_of_distribution as a whole when at least this share of its head-showing slices
# is: the OOD threshold passes 99% of validation images (TrustConfig.ood_pass_rate), so a volume
# like the training data has about 1 slice in 100 flagged, and half of them flagged means the model
# does not know this scanner or protocol; its few unflagged slices are then the least trustworthy
# of a volume it does not know, not evidence (docs/scoring.md, "Volumes").
OOD_SHARE = 0.5
# Columns older prediction files lack; their rows vote as before trust flags existed.
_OPTIONAL = {"head_fraction": pa.float32(), "review_reason": pa.string(), "prediction_set": pa.list_(pa.string())}

_ROW_COLUMNS = [
    "path",
    "model_id",
    "scored_at",
    "status",
    "error",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "instance_number",
    "slice_index",
]


def series_location(dst: Location) -> Location:
    """``OUTPUT_series`` beside ``OUTPUT`` (like the staging folder, outside any glob over it)."""
    return dst.sibling(SERIES_SUFFIX)


def series_schema(class_names: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("model_id", pa.string()),
            ("series_instance_uid", pa.string()),  # null for a NIfTI volume
            ("study_instance_uid", pa.string()),
            ("volume_path", pa.string()),  # the NIfTI file; null for a DICOM series (many files)
            ("slices_scored", pa.int32()),
            ("slices_failed", pa.int32()),
            ("slices_skipped", pa.int32()),  # no content or no head (a volume's empty ends): not scored
            ("predicted_label", pa.string()),
            ("top_probability", pa.float32()),
            ("confidence", pa.float32()),  # how sure the verdict is (see series_verdict)
            ("review_reason", pa.string()),  # null: the verdict stands
            ("prediction_set", pa.list_(pa.string())),  # union of the deciding slices' sets (null without sets)
            ("set_size", pa.int8()),
            ("slices_voting", pa.int32()),
            ("top_slice_path", pa.string()),
            ("top_slice_sop_instance_uid", pa.string()),
            ("top_slice_instance_number", pa.int32()),
            ("top_slice_index", pa.int32()),
            *[("max_" + PROB_PREFIX + c, pa.float32()) for c in class_names],
            *[("mean_" + PROB_PREFIX + c, pa.float32()) for c in class_names],
            ("last_scored_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def series_rows(rows: pa.Table) -> pa.Table:
    """The committed rows (the prediction schema) of DICOM series and NIfTI volumes: the rows the
    table is built from. Pure."""
    if rows.num_rows == 0:
        return rows
    return rows.filter(pc.or_(pc.is_valid(rows.column("series_instance_uid")), pc.is_valid(rows.column("slice_index"))))


def series_bytes(table: pa.Table) -> bytes:
    """The table as ``OUTPUT_series/series.parquet`` holds it. Derived output only: the scoring job
    builds the table from its committed rows in memory, hands it to the DICOM step and the report,
    and commits these bytes with the rows (listed in the manifest's ``derived``), so a file
    rewritten there reaches no SR and no report, and the next run writes it right again."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def series_table(rows: pa.Table, class_names: list[str], *, review_threshold: float = 0.0) -> pa.Table:
    """Aggregate slice rows (the prediction schema's columns) into one row per series and model."""
    schema = series_schema(class_names)
    rows = series_rows(rows)
    if rows.num_rows == 0:
        return schema.empty_table()
    # The latest scoring of each file: a changed file's (or volume's) older rows drop out, and so
    # do the rows of a file withdrawn since (gone from the input: its latest rows say so).
    rows = latest_rows(rows, by=("model_id", "path"))
    probs = [PROB_PREFIX + c for c in class_names]
    if not set(probs) <= set(rows.column_names):
        return schema.empty_table()  # rows of a model with other classes
    df = rows.select([c for c in _ROW_COLUMNS + probs + list(_OPTIONAL) if c in rows.column_names]).to_pandas()
    for c in _OPTIONAL:
        if c not in df:
            df[c] = None
    reasons = df["error"].fillna("") if "error" in df else pd.Series("", index=df.index)
    skipped_slice = (df["status"] == "skipped") & reasons.astype(str).str.startswith(SLICE_SKIP_REASONS)
    df = df[df["status"].isin(["ok", "error"]) | skipped_slice]
    if df.empty:
        return schema.empty_table()
    # The latest row of each DICOM instance (and frame): a copy under a second name counts once.
    df = df.assign(_frame=df["slice_index"].fillna(-1)).sort_values(["scored_at", "path"], ascending=[False, True])
    dicom = df["sop_instance_uid"].notna()
    dedup = df[dicom].drop_duplicates(["model_id", "sop_instance_uid", "_frame"])
    df = pd.concat([df[~dicom], dedup])
    df["_key"] = np.where(
        df["series_instance_uid"].notna(),
        "uid:" + df["series_instance_uid"].astype(str),
        "path:" + df["path"].astype(str),
    )
    out: dict[str, list] = {n: [] for n in schema.names}
    names = list(class_names)
    no_tumor = names.index(NO_TUMOR) if NO_TUMOR in names else None
    for (model_id, _), g in sorted(df.groupby(["model_id", "_key"]), key=lambda kv: kv[0]):
        _add_series(out, model_id, g, names, no_tumor, review_threshold)
    return pa.Table.from_pydict(out, schema=schema)


def _add_series(
    out: dict[str, list],
    model_id: str,
    g: pd.DataFrame,
    names: list[str],
    no_tumor: int | None,
    review_threshold: float,
) -> None:
    """Append one series' (or volume's) row to ``out``: ``g`` its latest slice rows. A column its
    verdict leaves unset (no slice scored, or none could vote) is null."""
    g = g.sort_values(["instance_number", "slice_index", "path"], na_position="last", kind="stable")
    ok = g[g["status"] == "ok"]
    is_volume = g["series_instance_uid"].isna().all()
    studies = g["study_instance_uid"].dropna()
    row = {
        "model_id": model_id,
        "series_instance_uid": None if is_volume else _value(g["series_instance_uid"].iloc[0]),
        "study_instance_uid": _value(studies.iloc[0]) if len(studies) else None,
        "volume_path": _value(g["path"].iloc[0]) if is_volume else None,
        "slices_scored": len(ok),
        "slices_failed": int((g["status"] == "error").sum()),
        "slices_skipped": int((g["status"] == "skipped").sum()),
        "last_scored_at": g["scored_at"].max(),
    }
    row |= _verdict_columns(ok, names, no_tumor, review_threshold) if len(ok) else {"slices_voting": 0}
    for k, column in out.items():
        column.append(row.get(k))


def _verdict_columns(ok: pd.DataFrame, names: list[str], no_tumor: int | None, review_threshold: float) -> dict:
    """A series' verdict from its scored slices ``ok`` (:func:`series_verdict`) as the table's
    columns: the vote, the probabilities' max and mean per class, and the slice that shows the
    class (none when no slice could vote)."""
    p = ok[[PROB_PREFIX + c for c in names]].to_numpy(dtype=np.float64)
    head = ok["head_fraction"].to_numpy(dtype=np.float64, na_value=np.nan)
    ood = (ok["review_reason"] == "out_of_distribution").to_numpy()
    in_set = _set_mask(ok["prediction_set"].tolist(), names)
    v = series_verdict(
        p, head_fraction=head, ood=ood, no_tumor=no_tumor, review_threshold=review_threshold, in_set=in_set
    )
    cols: dict[str, Any] = {
        "slices_voting": v.voting,
        "confidence": v.confidence,
        "review_reason": v.review_reason,
        "prediction_set": None if v.in_set is None else [c for c, k in zip(names, v.in_set) if k],
        "set_size": None if v.in_set is None else int(sum(v.in_set)),
    }
    for i, c in enumerate(names):
        cols["max_" + PROB_PREFIX + c] = float(p[:, i].max())
        cols["mean_" + PROB_PREFIX + c] = float(p[:, i].mean())
    if v.label is None or v.top_slice is None:
        return cols
    top = ok.iloc[v.top_slice]
    return cols | {
        "predicted_label": names[v.label],
        "top_probability": float(p[v.top_slice, v.label]),
        "top_slice_path": _value(top["path"]),
        "top_slice_sop_instance_uid": _value(top["sop_instance_uid"]),
        "top_slice_instance_number": _value(top["instance_number"], int),
        "top_slice_index": _value(top["slice_index"], int),
    }


def _set_mask(sets: list, names: list[str]) -> np.ndarray | None:
    """(n, classes) bool mask of the slices' prediction sets; None when a slice has none (rows
    scored by a package from before sets)."""
    if not sets or any(s is None or (isinstance(s, float) and np.isnan(s)) for s in sets):
        return None
    return np.array([[c in set(s) for c in names] for s in sets], dtype=bool)


@dataclass(frozen=True)
class Verdict:
    """One series' verdict: class index (None when no slice could vote), the slice that shows it
    best, how sure, why to review it (None: it stands), how many slices voted, and its
    prediction set as a mask over the classes (None without slice sets)."""

    label: int | None
    top_slice: int | None
    confidence: float | None
    review_reason: str | None
    voting: int
    in_set: tuple[bool, ...] | None = None


def series_verdict(
    p: np.ndarray,
    *,
    head_fraction: np.ndarray | None = None,
    ood: np.ndarray | None = None,
    no_tumor: int | None,
    review_threshold: float = 0.0,
    k: int = TOP_K,
    in_set: np.ndarray | None = None,
) -> Verdict:
    """The verdict of a series from its ok slices' calibrated probabilities ``p`` (n, classes)
    and, when given, their prediction sets ``in_set`` (n, classes) bool."""
    n = len(p)
    ood = np.zeros(n, bool) if ood is None else np.asarray(ood, bool)
    head = np.ones(n) if head_fraction is None else np.nan_to_num(np.asarray(head_fraction, np.float64), nan=1.0)
    enough = head >= HEAD_SHARE * (head.max() if n else 0.0)
    if enough.any() and ood[enough].mean() >= OOD_SHARE:
        return Verdict(None, None, None, "out_of_distribution", 0)
    vote = enough & ~ood
    idx = np.nonzero(vote)[0]
    if not len(idx):
        # The largest head section always has "enough", so only OOD flags can silence every slice.
        return Verdict(None, None, None, "out_of_distribution" if ood.any() else "no_head_content", 0)
    q = p[idx]
    deciding = idx
    if no_tumor is None:
        cls = int(q.mean(axis=0).argmax())
        best = int(idx[int(q[:, cls].argmax())])
        conf = float(q[:, cls].mean())
    else:
        tumour = 1.0 - q[:, no_tumor]
        top = np.argsort(-tumour, kind="stable")[: min(k, len(idx))]
        deciding = idx[top]
        score = float(tumour[top].mean())
        if score >= 0.5:
            mass = q[top].sum(axis=0)
            mass[no_tumor] = -1.0
            cls = int(mass.argmax())
            best = int(idx[top[int(q[top, cls].argmax())]])
            conf = score
        else:
            cls = no_tumor
            best = int(idx[int(q[:, no_tumor].argmax())])
            conf = 1.0 - score
    union = None
    if in_set is not None:
        mask = np.asarray(np.asarray(in_set, bool)[deciding].any(axis=0))
        mask[cls] = True
        union = tuple(bool(x) for x in mask)
    reason = "low_confidence" if conf < review_threshold else "ambiguous" if union and sum(union) > 1 else None
    return Verdict(cls, best, conf, reason, int(len(idx)), union)


def top_slice(p: np.ndarray, no_tumor: int | None) -> tuple[int, int]:
    """(slice, class) that names a series, from its slices' probabilities ``p`` (n, classes).

    The first slice wins a tie (slices come in InstanceNumber or slice order).
    """
    if no_tumor is not None:
        top = p.argmax(axis=1)
        tumour = np.nonzero(top != no_tumor)[0]
        if len(tumour):
            best = tumour[int(np.argmax(p[tumour, top[tumour]]))]
            return int(best), int(top[best])
        return int(np.argmax(p[:, no_tumor])), no_tumor
    flat = int(np.argmax(p))
    return flat // p.shape[1], flat % p.shape[1]


def _value(v, kind=None):
    """A pandas cell as a plain value: pandas turns missing strings and integers into NaN."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return None
    return kind(v) if kind else v
