"""Bulk scoring: an MRI archive (local or S3) -> one Parquet row per file, incrementally.

Ray Data reads the files; CPU tasks decode and preprocess them with the model package's own
:class:`MRIPreprocess` (the ingest's code, the training's settings); a pool of model actors
runs the network. Each run writes its rows to a staging folder beside the output, marks them
complete, then moves the files into the output one by one: a reader of the output sees whole
Parquet files only, and a run killed at any point is finished or redone by the next one.

A run is a short sequence (:func:`_run_scoring`): its facts (:mod:`._facts`: the verified
package, the listing, the committed rows read and sha256-checked once into one Arrow table),
its plan (:mod:`._plan`, pure: one frozen :class:`ScoringPlan` from those facts alone, the
identifiers record claimed or the run refused), the settings it accepted written (the identifiers
record, ``_config.yaml``), its execution (:mod:`._execute`: decode tasks, :mod:`._decode`, and
model replicas, :class:`Predictor`, on Ray Data; the replicas take the plan and load only the
package bytes it pins), its one commit (:mod:`._commit`: the withdrawal rows and the new versions
of unchanged files added, every file and the maps the replicas staged named in
``OUTPUT/_manifest.json``, with the per-series table, the report and the DICOM objects built in
memory from the committed rows as they will be, :mod:`._derived` and :mod:`._dicom`, listed in the
same manifest write, and the objects they replace unlisted in it), then the sending of the
committed objects, and MLflow. A run with nothing to commit writes nothing while the series table
and report committed before are whole and no DICOM object is to be made or retired. What the output is made of (its schema, its
sibling folders, its derived files and objects, its writer) is :mod:`._layout`.

DICOM files and NIfTI volumes are scored slice by slice (one row per slice, with its UIDs);
each commit carries the per-series table beside the output, rebuilt from every committed row
(:mod:`braintumor_ray.score._series`).

Output layout::

    OUTPUT/rows-<run>.parquet     the predictions, one file a run (read the folder with pandas, pyarrow, DuckDB)
    OUTPUT/_config.yaml           the last run's ScoreConfig (for --config; dataset readers skip it)
    OUTPUT/_manifest.json         what the job committed: each file, its sha256, rows and model id;
                                  only these files are read as committed rows; the series table and
                                  report (its "derived"), the heat maps and DICOM objects (its
                                  "objects": _explain/NAME, _dicom/NAME, each with its sha256)
    OUTPUT/_identifiers.json      how the rows name files and UIDs (path_mode, uid_mode, key id)
    OUTPUT/_report.html           the review report: counts, series verdicts, cases with heat maps, every row
    OUTPUT_series/series.parquet  one row per DICOM series or NIfTI volume and model
    OUTPUT_explain/*.png          --explain: heat-map overlays, named in OUTPUT/_manifest.json (staged by the
                                  replicas in OUTPUT._staging/<run>/_objects/_explain/, published by the commit)
    OUTPUT_dicom/*.dcm            --dicom-out: an SR (and SC) per DICOM series, named in OUTPUT/_manifest.json;
                                  _sent.json: what --dicom-send sent where (written after the commit)
    OUTPUT._staging/<run>/        a run in progress or cut off, its rows, maps and objects (never read by users)
    OUTPUT._lease.json            the lease of the run writing the output, while one runs (and, on
                                  local disk, OUTPUT._lease.lock, the lock its updates take)
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from ..core import Lease, Location, NoSpaceError, StorageError, check_disjoint, is_no_space, resolve
from ..tracking import log_scoring
from ..trust import softmax
from ._commit import _commit, commit_settings
from ._config import OUTPUT_SIBLINGS, ScoreConfig
from ._derived import ScoringSummary, _derived, algorithm, build_derived, commit_derived, run_counts, start_summary
from ._dicom import dicom_objects
from ._execute import _cluster_shape, _execute
from ._explain import HeatMaps, HeatmapWriter, explain_location
from ._facts import ScoringFacts, gather_facts
from ._layout import (
    _SLICE_NAMES,
    ATTEMPTS_DIR,
    EXPLAIN_SUFFIX,
    FETCHED_MODELS_DIR,
    PROB_PREFIX,
    REPORT_KEY,
    _remove_fetched,
    _writer,
    output_schema,
)
from ._plan import ScoringPlan, guard_id, plan_scoring, prior_state, rerun_diff

logger = logging.getLogger(__name__)


@dataclass
class _Scores:
    """A batch's per-row results, filled in place for the rows that decoded (NaN or None for the
    others): calibrated probabilities, confidence, OOD score, review reason, prediction set; and
    the decoded rows' images and class-activation maps, which the heat maps are drawn from."""

    probs: np.ndarray
    conf: np.ndarray
    ood: np.ndarray
    reasons: list[str | None]
    sets: list[list[str] | None]
    images: np.ndarray | None = None
    cam: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int, classes: int) -> _Scores:
        return cls(
            probs=np.full((n, classes), np.nan, dtype=np.float32),
            conf=np.full(n, np.nan, dtype=np.float32),
            ood=np.full(n, np.nan, dtype=np.float32),
            reasons=[None] * n,
            sets=[None] * n,
        )


class Predictor:
    """Model side (a Ray Data actor): one loaded package per actor; probabilities for the rows
    that decoded. It loads the package the plan pins and nothing else: every file's sha256 is
    recomputed over the bytes it loads (:class:`~braintumor_ray.models.PackagePin`)."""

    def __init__(self, plan: ScoringPlan, threads: int | None = None):
        from ..models import load_inference_model

        # Intra-op threads = the CPUs this actor was given (Ray's OMP_NUM_THREADS covers torch
        # only, and ORT would take every core): replicas and decode tasks then share the node
        # without oversubscribing it.
        self.threads = threads or actor_threads()
        self.model = load_inference_model(
            plan.pin.uri,
            engine=plan.engine,
            use_gpu=plan.use_gpu,
            threads=self.threads,
            s3_endpoint_url=plan.s3_endpoint_url,
            pin=plan.pin,
            tta=plan.tta,
        )
        self.schema = output_schema(list(self.model.class_names))
        self.files, self.uri_prefix, self.scored_at = plan.diff.todo, plan.uri_prefix, plan.scored_at
        self.selection, self.review_threshold, self.ids, self.explain = (
            plan.selection,
            plan.review_threshold,
            plan.identifiers,
            plan.explain,
        )
        self.guard_id = plan.guard_id
        # Heat maps: into the run's own staging folder (its objects), named by the final one.
        self.heatmaps = (
            HeatmapWriter(
                plan.explain,
                model_uri=plan.pin.uri,
                s3_endpoint_url=plan.s3_endpoint_url,
                use_gpu=plan.use_gpu,
                stage_uri=plan.explain_stage_uri,
                final_uri=plan.explain_final_uri,
                model_id=self.model.model_id,
                pin=plan.pin,
                method=plan.explain_method,
                threads=self.threads,
            )
            if plan.explain != "none"
            else None
        )

    def _score(self, batch: pa.Table, ok: list[int]) -> _Scores:
        """The network and the package's trust on the rows ``ok`` of ``batch`` (those that decoded)."""
        scores = _Scores.empty(batch.num_rows, len(self.model.class_names))
        if ok:
            pix = batch.column("pixels").to_pylist()
            side = batch.column("side").to_pylist()
            scores.images = np.stack([np.frombuffer(pix[i], np.uint8).reshape(side[i], side[i]) for i in ok])
            # The maps come from the same forward pass, when they will be drawn (see HeatmapWriter).
            want_maps = self.heatmaps is not None and self.heatmaps.method == "auto"
            logits, feats, scores.cam = self.model.forward(scores.images, maps=want_maps)
            self._assess(logits, feats, ok, scores)
        return scores

    def _assess(self, logits: np.ndarray, feats: np.ndarray | None, ok: list[int], scores: _Scores) -> None:
        """The package's trust on the scored rows ``ok``, written into the batch's columns."""
        trust = self.model.trust
        if trust is None:  # a package from before calibration: raw softmax, no flags
            scores.probs[ok] = softmax(logits)
            scores.conf[ok] = scores.probs[ok].max(axis=1)
            return
        a = trust.assess(logits, feats, review_threshold=self.review_threshold)
        scores.probs[ok], scores.conf[ok], scores.ood[ok] = a.probs, a.confidence, a.ood_score
        sets_of: list[Any] = a.prediction_sets(self.model.class_names) or [None] * len(ok)
        for i, r, ps in zip(ok, a.review_reason, sets_of):
            scores.reasons[i], scores.sets[i] = r, ps

    def __call__(self, batch: pa.Table, files: dict[str, tuple[int, str]] | None = None) -> pa.Table:
        """The batch's rows; ``files``: each file's listed (size, version), when the plan came
        without its file list (layout tasks)."""
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        ok = [i for i in range(n) if status[i] == "ok"]
        scores = self._score(batch, ok)
        names = list(self.model.class_names)
        predicted = [names[int(np.argmax(scores.probs[i]))] if status[i] == "ok" else None for i in range(n)]
        heat = (
            self.heatmaps(batch, ok, scores.images, predicted, scores.reasons, names, scores.cam)
            if self.heatmaps
            else ([None] * n,) * 3
        )
        return self._rows(batch, status, scores, predicted, heat, files or self.files)

    def _rows(
        self,
        batch: pa.Table,
        status: list[str],
        scores: _Scores,
        predicted: list[str | None],
        heat: tuple[list, list, list],
        files: dict[str, tuple[int, str]],
    ) -> pa.Table:
        """The batch's rows in the output schema: each file as ``path_mode`` names it (and its
        decoder's message scrubbed alike), its scores (null where it did not decode), its UIDs as
        ``uid_mode`` names them, the run's settings, its heat map."""
        n = batch.num_rows
        paths = batch.column("path").to_pylist()
        errors = batch.column("error").to_pylist()
        failed = np.asarray([s != "ok" for s in status], bool)
        uris = [self.uri_prefix + p for p in paths]
        ids = self.ids
        if ids.path_mode != "full":  # decoders' messages may quote the path: shown as the path column shows it
            errors = [ids.scrub(e, u) for e, u in zip(errors, uris)]
        probs, conf, ood, sets = scores.probs, scores.conf, scores.ood, scores.sets
        cols: dict[str, Any] = {
            "path": [ids.path(u) for u in uris],
            "sha256": batch.column("sha256"),
            "size": [files[p][0] for p in paths],
            "version": [files[p][1] for p in paths],
            "predicted_label": predicted,
            **{
                PROB_PREFIX + c: pa.array(probs[:, k], pa.float32(), mask=failed)
                for k, c in enumerate(self.model.class_names)
            },
            "confidence": pa.array(conf, pa.float32(), mask=np.isnan(conf)),
            "ood_score": pa.array(ood, pa.float32(), mask=np.isnan(ood)),
            "review_reason": scores.reasons,
            "prediction_set": sets,
            "set_size": [None if ps is None else len(ps) for ps in sets],
            "head_fraction": batch.column("head_fraction"),
            "model_id": [self.model.model_id] * n,
            "scored_at": [self.scored_at] * n,
            "status": status,
            "error": errors,
            **{
                k: batch.column(k)
                if k in ("instance_number", "slice_index") or ids.uid_mode == "full"
                else [ids.uid(u) for u in batch.column(k).to_pylist()]
                for k in _SLICE_NAMES
            },
            "selection": [self.selection] * n,
            "explain": [self.explain] * n,
            "heatmap_path": heat[0],
            "heatmap_peak_x": heat[1],
            "heatmap_peak_y": heat[2],
            "guard": [self.guard_id] * n,
        }
        return pa.Table.from_pydict(cols, schema=self.schema)


def actor_threads() -> int:
    """The CPUs Ray gave the calling actor or task, rounded, at least 1 (outside Ray: 1)."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            return max(1, int(cpus + 0.5))
    except Exception:  # not in a Ray worker
        pass
    return 1


def run_scoring(config: ScoreConfig) -> ScoringSummary:
    """Score every new or changed file under ``input``; returns the run's summary (a frozen
    :class:`ScoringSummary`).

    The whole run holds the output's lease (``OUTPUT._lease.json``): a second run on the same
    output refuses, naming this one, or waits (``wait``), whoever started it. A full disk is a
    :class:`StorageError` of one line; what was committed stays whole, and the next run goes on.
    """
    # Again here, not only when the config was built: links resolve on the machine that runs the
    # job, and this comes before the lease or anything else touches storage.
    check_disjoint(config.input, config.output, siblings=OUTPUT_SIBLINGS)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    try:
        with Lease(dst, owner=run_id, ttl_s=config.lease_ttl_s, wait_s=config.wait, what="score") as lease:
            try:
                summary = _run_scoring(config, lease)
            finally:
                _remove_fetched(_writer(dst).root.join(FETCHED_MODELS_DIR))  # only this run's copy: the lease
    except StorageError:
        raise
    except Exception as e:
        if is_no_space(e):  # a Ray task's OSError arrives wrapped, with the worker's traceback
            raise NoSpaceError(dst.uri) from e
        raise
    return ScoringSummary.of(summary | {"lease": lease.describe()})


def _run_scoring(config: ScoreConfig, lease: Lease) -> dict:
    """:func:`run_scoring`'s work, under the lease (``lease.owner`` is the run id): the facts
    (:mod:`._facts`, every read, once), the plan (:mod:`._plan`, pure), the settings it accepted
    written, the execution (Ray, :mod:`._execute`), the one commit (:mod:`._commit`) of the rows and
    of what is derived from them in memory (:mod:`._derived`: series table, report, DICOM objects),
    then the sending of the committed objects, then MLflow."""
    t0 = time.perf_counter()
    facts = gather_facts(config, lease)
    config = facts.config
    # The replicas stage the run's maps beside its rows: the rows' commit lists and publishes both.
    explain_stage = facts.writer.object_stage(facts.writer.stage(lease.owner), EXPLAIN_SUFFIX)
    plan = _plan_run(facts, run_id=lease.owner, explain_stage=explain_stage)
    diff = plan.diff
    summary = start_summary(facts, diff)
    commit_settings(facts.dst, plan, facts.asked)
    wants_dicom = config.dicom_out != "none" or bool(config.dicom_send)
    dicom = (
        partial(
            dicom_objects,
            config,
            dst=facts.dst,
            src=facts.src,
            ids=facts.ids,
            sources={v: k for k, v in facts.shown.items()},
            algo=algorithm(facts),
            listed=facts.objects,
        )
        if wants_dicom
        else None
    )
    build = partial(build_derived, plan=plan, dst=facts.dst, dicom=dicom)
    finish = partial(
        _derived,
        listed=facts.derived.listed,
        report=facts.writer.derived_location(REPORT_KEY).uri,
        config=config,
        dst=facts.dst,
        lease=lease,
    )
    if not diff.has_work:  # no row to commit: the series table and report stand unless found stale
        built = None
        listed_maps = HeatMaps(explain_location(facts.dst), facts.objects)  # looked up, never listed whole
        if plan.derived_stale is not None:
            logger.info("score: nothing new; the series table and report are built again: %s", plan.derived_stale)
        if plan.derived_stale is not None or wants_dicom:
            built = build(facts.committed, files=plan.derived_stale is not None, maps=listed_maps)
        if built is not None and built.changes:
            commit_derived(facts.writer, plan.run_id, built)
        summary.update(wall_s=round(time.perf_counter() - t0, 3), images_per_s=0.0)
        return log_scoring(config, finish(summary, built=built), facts.registered)
    staging = facts.writer.stage(plan.run_id)
    t_run = time.perf_counter()
    if diff.todo:
        _execute(plan, staging, source=facts.src, attempts=facts.writer.root.join(ATTEMPTS_DIR), predictor=Predictor)
    elapsed = time.perf_counter() - t_run
    written, after, heatmaps, built = _commit(plan, facts.writer, staging, facts.committed, build, facts.objects)
    summary.update(run_counts(written, plan, summary["skipped_already_scored"], elapsed), heatmaps=heatmaps)
    summary = finish(summary, built=built)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)  # with the derived outputs
    return log_scoring(config, summary, facts.registered)


def _plan_run(facts: ScoringFacts, *, run_id: str, explain_stage: Location) -> ScoringPlan:
    """The run's plan from its facts alone: which listed files to score, to withdraw or to record
    under a new version against the committed rows (:func:`rerun_diff`), and the one frozen plan
    (:func:`plan_scoring`; the cluster's shape is asked only when there is something to score)."""
    config = facts.config
    diff = rerun_diff(
        facts.files,
        facts.shown,
        prior_state(facts.committed),
        model_id=facts.model_id,
        selection=config.select.describe(),
        retry_errors=config.retry_errors,
        guard=guard_id(config.guard),
        rescore_all=config.rescore_all,
        output=facts.dst.uri,
    )
    return plan_scoring(
        config=config,
        run_id=run_id,
        input_uri=facts.src.uri,
        output_uri=facts.dst.uri,
        uri_prefix=facts.prefix,
        pin=facts.pin,
        engine=facts.engine,
        meta=facts.meta,
        preprocess=facts.preprocess,
        identifiers=facts.ids,
        diff=diff,
        refused=facts.listing.refused,
        explain_stage_uri=explain_stage.uri,
        explain_final_uri=explain_location(facts.dst).uri,
        cluster=_cluster_shape() if diff.todo else None,
        scored_at=datetime.now(UTC),
        notes=facts.notes,
        derived=facts.derived,
        identifiers_found=facts.identifiers_found,
    )
