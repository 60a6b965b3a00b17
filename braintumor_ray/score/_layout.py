"""What a scoring output is made of: the rows' schema, the folders beside it, and its writer.

The other modules of the run (:mod:`._decode`, :mod:`._commit`, :mod:`._facts`, :mod:`._run`)
take these from here; see :mod:`._run` for the output's layout.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core import (
    STAGING_SUFFIX,
    CommittedFile,
    Lease,
    Location,
    StagedWriter,
    StorageError,
    committed_table,
    posix_basename,
    remove_child,
)
from ..report import SCORING_REPORT
from ._dicom_out import DICOM_SUFFIX

logger = logging.getLogger(__name__)

PROB_PREFIX = "prob_"

# The per-series table: OUTPUT_series/series.parquet (score/_series.py).
SERIES_SUFFIX = "_series"
SERIES_FILE = "series.parquet"
# What the job derives from its committed rows, committed with them (the rows' writer publishes
# them and lists them in the manifest's "derived"): keys as StagedWriter.derived reads them.
REPORT_KEY = SCORING_REPORT  # OUTPUT/_report.html
SERIES_KEY = f"{SERIES_SUFFIX}/{SERIES_FILE}"  # OUTPUT_series/series.parquet
DERIVED_KEYS = (REPORT_KEY, SERIES_KEY)
# --explain's heat maps: OUTPUT_explain/*.png (score/_explain.py).
EXPLAIN_SUFFIX = "_explain"
# The siblings whose files (objects) a commit adds and retires: OUTPUT_dicom/*.dcm and
# OUTPUT_explain/*.png, keyed "_dicom/NAME" and "_explain/NAME" in the manifest's "objects"
# (score/_dicom.py, score/_explain.py).
OBJECT_SIBLINGS = (DICOM_SUFFIX, EXPLAIN_SUFFIX)

# Beside the runs in OUTPUT._staging/: the markers of decode attempts (see _Attempts).
ATTEMPTS_DIR = "_attempts"

# Where a models:/ package from a server-side artifact store is fetched, in OUTPUT._staging/ (which
# every node reads, and whose "_" folders recovery keeps): one folder per run, removed when it ends;
# a killed run's copy goes at the next run's start. A driver-local temp folder was left behind by
# every run, and was what replicas on other nodes were told to load.
FETCHED_MODELS_DIR = "_models"

# A staged row's status for a file whose bytes are the committed ones under a new version (a
# chmod, a restore, a touch): the commit turns it into copies of its latest rows with the new
# version, so that the next run does not read it again. Never committed.
UNCHANGED = "unchanged"


def output_schema(class_names: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("size", pa.int64()),
            ("version", pa.string()),  # ETag on S3, mtime on disk: how reruns spot changed files
            ("predicted_label", pa.string()),
            *[(PROB_PREFIX + c, pa.float32()) for c in class_names],  # calibrated when the package can
            ("confidence", pa.float32()),  # the top probability (calibrated)
            ("ood_score", pa.float32()),  # distance from the training data (higher: less like it)
            # null: the prediction stands; out_of_distribution (wins), low_confidence or ambiguous: review it
            ("review_reason", pa.string()),
            # The classes still in play (class-conditional conformal set at the package's alpha);
            # null for packages from before sets and for rows that are not ok.
            ("prediction_set", pa.list_(pa.string())),
            ("set_size", pa.int8()),
            ("head_fraction", pa.float32()),  # share of the image the head covers (series votes)
            ("model_id", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
            ("status", pa.string()),  # ok, error, or skipped (left out by the series selector)
            ("error", pa.string()),
            # Where a slice came from: DICOM UIDs and InstanceNumber, the slice's index in a
            # NIfTI volume (or a multi-frame DICOM); null for plain images. Nothing else from a
            # file's header is ever written.
            *SLICE_FIELDS,
            ("selection", pa.string()),  # the series selector in force ("" for none)
            ("explain", pa.string()),  # the --explain setting in force: which rows got a heat map
            # The Grad-CAM overlay PNG (OUTPUT_explain/...) and its peak in the original image's
            # pixels; null for rows without a map.
            ("heatmap_path", pa.string()),
            ("heatmap_peak_x", pa.int32()),
            ("heatmap_peak_y", pa.int32()),
            # The input guard's settings (hashed) the row was scored under: a rerun under others
            # (a limit raised) tries its error rows again.
            ("guard", pa.string()),
        ]
    )


SLICE_FIELDS = [
    ("sop_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("study_instance_uid", pa.string()),
    ("instance_number", pa.int32()),
    ("slice_index", pa.int32()),
]

_SLICE_NAMES = [n for n, _ in SLICE_FIELDS]


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file (what a staged file of a run holds)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def committed_rows(files: list[CommittedFile], class_names: list[str]) -> pa.Table:
    """Every committed row, in the output schema: the run's one reading of the output's history
    (columns a file predates: null, status ``ok`` and selection empty, as those files meant)."""
    return committed_table(files, output_schema(class_names), fill={"status": "ok", "selection": ""})


def recover(dst: Location) -> dict[str, int]:
    """Finish what earlier runs left: commit staged runs that completed, drop those that did not."""
    return _writer(dst).recover()


def _remove_fetched(loc: Location) -> None:
    """Delete ``OUTPUT._staging/_models`` (the models:/ packages fetched for runs on the output)."""
    out = _output_of(loc)
    try:
        remove_child(out, _writer(out).root, posix_basename(loc.path), what="score", tree=True)
    except StorageError as e:  # the next run's start removes it
        logger.warning("score: could not remove the fetched model package %s (%s)", loc.uri, e)


def _writer(dst: Location, lease: Lease | None = None) -> StagedWriter:
    """The predictions' writer: its commits name their files in ``OUTPUT/_manifest.json``, with the
    derived files and the DICOM objects they carry."""
    return StagedWriter(
        dst, what="score", lease=lease, describe=_describe_rows, derived=DERIVED_KEYS, objects=OBJECT_SIBLINGS
    )


def _output_of(staged: Location) -> Location:
    """The output whose staging folder holds ``staged`` (``OUTPUT._staging/<x>`` -> OUTPUT)."""
    root = staged.path.rstrip("/").rsplit("/", 1)[0]
    base = root.removesuffix(STAGING_SUFFIX)
    return Location(uri=staged.uri_of(base), path=base, fs=staged.fs, is_s3=staged.is_s3)


def _describe_rows(data: bytes) -> dict[str, Any]:
    """A committed Parquet file's manifest entry: its rows and the model id of its rows."""
    t = pq.read_table(pa.BufferReader(data), columns=["model_id"])
    return {"rows": t.num_rows, "model_ids": sorted({m for m in t.column("model_id").to_pylist() if m})}
