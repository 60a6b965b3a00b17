"""What a scoring run derives from its committed rows, in memory: the per-series table, the
review page and the DICOM objects (built before the commit, from the rows as they will be, and
committed with them), then the sending of the committed objects, the summary's counts; and the
summary's text."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ..core import Lease, Location, StagedWriter
from ..imaging import SLICE_SKIP_REASONS
from ..report import scoring_report_html
from ._config import ScoreConfig
from ._dicom import DicomObjects, send_committed
from ._dicom_out import Algorithm
from ._explain import HeatMaps
from ._layout import REPORT_KEY, SERIES_KEY
from ._plan import WITHDRAWN, RerunDiff, ScoringPlan
from ._series import series_bytes, series_table

if TYPE_CHECKING:
    from ._facts import ScoringFacts


@dataclass(frozen=True)
class ScoringSummary:
    """What :func:`~braintumor_ray.score.run_scoring` returns: one run's counts, where its outputs
    are, and how it went. ``summary["scored"]`` and ``summary.get("dicom")`` read it as the dict it
    was before (scripts and tests written against that); :meth:`to_dict` gives that dict."""

    input: str
    output: str
    model_id: str
    files_seen: int
    skipped_already_scored: int  # listed files whose rows stand (or whose bytes were scored already)
    scored: int  # rows scored ok this run (one per image or slice)
    errors: int
    not_selected: int  # files the series selector left out
    withdrawn: int  # files gone from the input, their rows marked withdrawn
    errors_retried: int
    errors_final: int
    committed_runs: int  # earlier cut-off runs this run finished
    dropped_runs: int  # and those it dropped
    wall_s: float
    images_per_s: float
    lease: dict[str, Any]
    report: str | None = None  # the review page's URI
    series: int | None = None  # rows of the series table (None: the output has none)
    heatmaps: int = 0
    slices_skipped: int = 0  # a volume's slices with no content or no head
    run_id: str | None = None  # None: nothing was committed
    engine: str | None = None  # these four when the run scored anything
    layout: str | None = None  # tasks or replicas (replicas: tasks at once, with layout tasks)
    replicas: int | None = None
    cpus_per_replica: float | None = None
    dicom: dict[str, Any] | None = None  # --dicom-out / --dicom-send: objects written, sent
    replaced_models: tuple[str, ...] = ()  # --rescore-all: the models whose rows this run replaced
    notes: tuple[str, ...] = ()
    mlflow_run_id: str | None = None
    mlflow_error: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default

    def to_dict(self) -> dict[str, Any]:
        """The summary as a plain dict (tuples as lists), for JSON and MLflow."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def of(cls, counts: Mapping[str, Any]) -> ScoringSummary:
        """From the run's counts as :func:`start_summary`, :func:`run_counts` and the derived step
        gather them: an unknown key is a bug (a TypeError here), never a silently dropped count."""
        tuples = {k: tuple(counts[k]) for k in ("replaced_models", "notes") if k in counts}
        return cls(**{**counts, **tuples})


def start_summary(facts: ScoringFacts, diff: RerunDiff) -> dict[str, Any]:
    """The summary as the plan has it, before anything runs."""
    return {
        "input": facts.src.uri,
        "output": facts.dst.uri,
        "model_id": facts.model_id,
        "files_seen": len(facts.files),
        "skipped_already_scored": len(facts.files) - len(diff.todo),
        "scored": 0,
        "errors": 0,
        "not_selected": 0,
        "withdrawn": len(diff.withdrawn),
        "errors_retried": diff.retried,
        "errors_final": diff.final_errors,
        **({"replaced_models": list(diff.replaced_models)} if diff.replaced_models else {}),
        **({"notes": list(facts.notes)} if facts.notes else {}),
        **facts.recovered,
    }


def run_counts(written: pa.Table, plan: ScoringPlan, skipped_before: int, elapsed: float) -> dict[str, Any]:
    """The summary's counts of the rows this run committed (``written``: scored and withdrawn)."""
    diff = plan.diff
    status = written.column("status")
    counts = {k: int(pc.sum(pc.equal(status, k)).as_py() or 0) for k in ("ok", "error", "skipped")}
    # A skipped row is a file the series selector left out, or a slice with no content or no head.
    slices_skipped = sum(
        1
        for st, r in zip(status.to_pylist(), written.column("error").to_pylist())
        if st == "skipped" and (r or "").startswith(SLICE_SKIP_REASONS)
    )
    files_written = len(set(written.filter(pc.not_equal(status, WITHDRAWN)).column("path").to_pylist()))
    return dict(
        scored=counts["ok"],
        errors=counts["error"],
        not_selected=counts["skipped"] - slices_skipped,
        slices_skipped=slices_skipped,
        skipped_already_scored=skipped_before + len(diff.todo) - files_written,
        run_id=plan.run_id,
        **(
            {
                "layout": plan.layout,
                "replicas": plan.replicas,
                "cpus_per_replica": plan.replica_cpus,
                "engine": plan.engine,
            }
            if diff.todo
            else {}
        ),
        images_per_s=round(len(diff.todo) / elapsed, 2) if diff.todo and elapsed > 0 else 0.0,
    )


def algorithm(facts: ScoringFacts) -> Algorithm:
    """The DICOM objects' algorithm identification: the registered model's name and version when
    scored by name, else the package's backbone and format."""
    reg, meta = facts.registered, facts.meta
    return Algorithm(
        name=reg["name"] if reg else f"braintumor-ray {meta.backbone}",
        version=f"{reg['version']} (registered)" if reg else f"package format {meta.format_version}",
        model_id=facts.model_id,
    )


@dataclass(frozen=True)
class Derived:
    """What a run builds from the committed rows as they will be, for its one commit: the series
    table and report (``files``; empty when the ones committed stand) and the DICOM objects."""

    series: pa.Table  # in memory: the DICOM objects are built from it, never from its file
    files: dict[str, tuple[bytes, dict[str, Any]]]  # key -> (bytes, extra manifest entry keys)
    series_rows: int | None  # None: no table (an archive of plain images gets no empty sibling folder)
    dicom: DicomObjects | None = None  # None: neither --dicom-out nor --dicom-send

    @property
    def changes(self) -> bool:
        """Whether a commit has anything to publish."""
        return bool(self.files) or (self.dicom is not None and self.dicom.changes)


def build_derived(
    rows: pa.Table,
    *,
    plan: ScoringPlan,
    dst: Location,
    maps: HeatMaps,
    files: bool = True,
    dicom: Callable[..., DicomObjects | None] | None = None,
) -> Derived:
    """The per-series table, the review page (``files``) and the DICOM objects (``dicom``, given the
    rows, the series table and the maps) of the committed rows ``rows`` (in memory, never read back
    from storage), as :meth:`StagedWriter.commit` takes them. ``maps``: the heat maps listed after
    the commit (this run's still staged), the only ones the page embeds and an SC draws."""
    series = series_table(rows, list(plan.class_names), review_threshold=plan.series_review_threshold)
    extra = {"settings": plan.derived_settings}
    out: dict[str, tuple[bytes, dict[str, Any]]] = {}
    series_rows = None
    if files and (series.num_rows or plan.series_published):  # one there before is replaced, by an empty one too
        out[SERIES_KEY] = (series_bytes(series), extra | {"rows": series.num_rows})
        series_rows = series.num_rows
    if files:
        html = scoring_report_html(
            dst, series=series, maps=maps.root, rows=rows, map_files=maps, staged_maps=maps.staged
        )
        out[REPORT_KEY] = (html.encode("utf-8"), extra)
    objects = dicom(rows=rows, series=series, maps=maps) if dicom is not None else None
    return Derived(series=series, files=out, series_rows=series_rows, dicom=objects)


def commit_derived(writer: StagedWriter, run_id: str, built: Derived) -> None:
    """A run with no rows to commit whose series table or report is missing, altered or stale, or
    whose DICOM objects changed (ones a cut-off run left unmade): a commit of those alone (the next
    run with nothing new finds them whole and writes nothing)."""
    writer.commit(writer.stage(run_id), **commit_args(built))


def commit_args(built: Derived) -> dict[str, Any]:
    """What a run's :meth:`StagedWriter.commit` carries beside its rows: derived files and objects."""
    return {
        "derived": built.files or None,
        "objects": built.dicom.objects if built.dicom is not None else None,
        "retire": built.dicom.retire if built.dicom is not None else (),
    }


def _derived(
    summary: dict,
    *,
    built: Derived | None,
    listed: Mapping[str, Mapping[str, Any]],
    report: str,
    config: ScoreConfig,
    dst: Location,
    lease: Lease,
) -> dict:
    """After the commit, still under the lease: the summary's series count, DICOM objects and report,
    and the sending of the committed objects (``--dicom-send``: only what the manifest lists now,
    with those bytes). ``built``: what this run built before its commit (None: nothing; the series
    table and report committed before stand, ``listed`` in the manifest)."""
    count = built.series_rows if built is not None and built.files else (listed.get(SERIES_KEY) or {}).get("rows")
    out = summary | {"series": count}
    if built is not None and built.dicom is not None:
        out["dicom"] = dict(built.dicom.summary)
        sent = send_committed(dst, config, lease)
        if sent is not None:
            out["dicom"]["sent"] = sent
    return out | {"report": report}


def format_summary(s: ScoringSummary | Mapping[str, Any]) -> str:
    """What ``jobs/score.py`` prints (``s``: the summary, or a dict of its fields)."""
    lines = [
        f"score {s['input']} -> {s['output']} (model {s['model_id']})",
        f"  files seen {s['files_seen']}, rows scored {s['scored']} (one per image or slice), skipped as already "
        f"scored {s['skipped_already_scored']}, errors {s['errors']}, not selected {s.get('not_selected', 0)}"
        + (f", slices skipped (no content or no head) {s['slices_skipped']}" if s.get("slices_skipped") else ""),
    ]
    if s.get("withdrawn") or s.get("errors_retried") or s.get("errors_final"):
        lines.append(
            f"  withdrawn {s.get('withdrawn', 0)} (files gone from the input), error rows tried again "
            f"{s.get('errors_retried', 0)}, errors final after --retry-errors {s.get('errors_final', 0)}"
        )
    if s.get("replaced_models"):
        lines.append(f"  replaced the rows of model {', '.join(s['replaced_models'])} (--rescore-all)")
    for note in s.get("notes", ()):
        lines.append(f"  note: {note}")
    if s.get("series") is not None:
        lines.append(f"  series table: {s['series']} series or volumes in {s['output'].rstrip('/')}_series/")
    if s.get("heatmaps"):
        lines.append(f"  heat maps: {s['heatmaps']} overlay PNGs in {s['output'].rstrip('/')}_explain/")
    if s.get("dicom"):
        lines.extend(_dicom_lines(s["dicom"], s["output"].rstrip("/")))
    if s.get("committed_runs") or s.get("dropped_runs"):
        lines.append(f"  earlier cut-off runs: committed {s['committed_runs']}, redone {s['dropped_runs']}")
    what = "tasks at once" if s.get("layout") == "tasks" else "model replicas"
    engine = f" ({s['engine']}, {s['replicas']} {what} x {s['cpus_per_replica']:g} CPUs)" if s.get("engine") else ""
    lines.append(f"  {s['wall_s']:.1f} s, {s['images_per_s']:.1f} images/s{engine}")
    if s.get("report"):
        lines.append(f"  report: {s['report']}")
    if s.get("mlflow_error"):
        lines.append(f"  MLflow: not logged, the rows are committed ({s['mlflow_error'][:200]})")
    return "\n".join(lines)


def _dicom_lines(d: dict, out: str) -> list[str]:
    lines = []
    if d["mode"] != "none":
        lines.append(
            f"  DICOM objects: {d['sr']} SR, {d['sc']} SC written to {out}_dicom/ ({d['series']} DICOM series"
            + (f", {d['skipped']} left out: source file gone or unreadable" if d["skipped"] else "")
            + ")"
        )
    if d.get("not_dicom_files"):
        lines.append(f"  not DICOM: {d['not_dicom_files']} scored files (JPEG/PNG/NIfTI) get no DICOM objects")
    for e in d.get("sent", ()):
        lines.append(
            f"  sent to {e['destination']}: {e['sent']} new, {e['already']} sent before"
            + (f", {e['failed']} NOT sent ({e.get('error')}): the next run tries again" if e["failed"] else "")
        )
    return lines
