"""What a scoring run derives from its committed rows, in memory, after its one commit: the
summary's counts, the per-series table, the DICOM objects and their sending, the review page;
and the summary's text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ..core import Identifiers, Lease, Location, Manifest
from ..imaging import SLICE_SKIP_REASONS
from ..report import write_scoring_report
from ._config import ScoreConfig
from ._dicom import run_dicom_step
from ._dicom_out import Algorithm
from ._explain import explain_location
from ._plan import WITHDRAWN, RerunDiff, ScoringPlan
from ._series import series_table, write_series_table

if TYPE_CHECKING:
    from ._facts import ScoringFacts


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
            {"replicas": plan.replicas, "cpus_per_replica": plan.replica_cpus, "engine": plan.engine}
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


def _derived(
    summary: dict,
    rows: pa.Table,
    *,
    config: ScoreConfig,
    plan: ScoringPlan,
    dst: Location,
    src: Location,
    ids: Identifiers,
    sources: dict[str, str],
    lease: Lease,
    algo: Algorithm,
) -> dict:
    """What is built from the committed rows ``rows`` (in memory, never read back from storage),
    still under the lease: the per-series table, then the DICOM objects and their sending (from
    that table, not from its file), then the review page."""
    series = series_table(rows, list(plan.class_names), review_threshold=plan.series_review_threshold)
    out = summary | {"series": write_series_table(dst, series)}
    step = run_dicom_step(
        config,
        dst=dst,
        src=src,
        ids=ids,
        sources=sources,
        lease=lease,
        run_id=plan.run_id,
        algo=algo,
        rows=rows,
        series=series,
    )
    if step is not None:
        out["dicom"] = step
    maps = explain_location(dst)
    return out | {
        "report": write_scoring_report(
            dst, series=series, maps=maps, rows=rows, map_files=Manifest(maps, what="explain").read()
        )
    }


def format_summary(s: dict) -> str:
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
    engine = (
        f" ({s['engine']}, {s['replicas']} model replicas x {s['cpus_per_replica']:g} CPUs)" if s.get("engine") else ""
    )
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
