"""A scoring run's plan: pure, no Ray, no storage; what :mod:`._run` executes and commits.

The driver lists the input, reads the committed rows (the manifest's files only) and verifies
the model package; from those facts alone :func:`rerun_diff` decides which files to read and
score, which rows to withdraw and which errors to try again, and :func:`plan_scoring` adds the
engine, the replicas, the identifiers and the output layout, as one frozen
:class:`ScoringPlan`. The model replicas get that object (its :class:`PackagePin` says which
bytes they may load). The rules, one file at a time (``prior``: its latest rows in the output):

- never scored, or only withdrawn: scored;
- listed with another size or version than its latest rows (version: ETag on S3; mtime, inode
  and change time on disk), or with no version at all: read and hashed, scored unless its bytes
  are the ones already scored;
- an error row: tried again when it may come out otherwise, while it has fewer than
  ``1 + retry_errors`` error rows at this version: the file could not be read (briefly
  unreadable, vanished, grown, or it killed its decode task), or the input guard's settings
  changed since (a limit raised). The same bytes under the same settings fail the same way
  (a corrupt file): final at once. Past the cap an error is final and stays recorded (a file
  that kills its decode task every time does not cost every later run two task deaths);
- skipped by the series selector: looked at again only under another selector;
- scored by another model: the whole output is refused unless ``rescore_all`` (one model per
  output), which scores every file again and replaces every earlier row;
- gone from the listing: its rows are withdrawn (a ``withdrawn`` row, the latest, beside the
  old ones, which stay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..core import ConfigError, Identifiers, latest_mask, same_version
from ..imaging import InputGuard, MRIPreprocess, SeriesSelector
from ._layout import REPORT_KEY, SERIES_KEY

if TYPE_CHECKING:  # models imports torch: the plan and the decode tasks do not need it
    from ..models import PackageMeta, PackagePin
    from ._config import ScoreConfig

# The columns of committed rows the plan reads.
PRIOR_COLUMNS = {
    "path": pa.string(),
    "sha256": pa.string(),
    "size": pa.int64(),
    "version": pa.string(),
    "model_id": pa.string(),
    "status": pa.string(),
    "selection": pa.string(),
    "scored_at": pa.timestamp("us", tz="UTC"),
    "error": pa.string(),
    "guard": pa.string(),
}
# Errors that may not recur with the same bytes and settings: the file could not be read (it was
# briefly unreadable, vanished, grew while listed) or it killed its decode task.
TRANSIENT_ERRORS = ("unreadable", "vanished", "killed its decode task")
# Decoding is a few ms an image against tens for the model: two decode tasks share a CPU.
DECODE_CPUS = 0.5
# CPU scoring: the model's share of the CPUs (decode ~3 ms an image, ONNX Runtime's Lite0 ~11 ms
# a thread) and the threads of one replica (intra-op scaling is near-linear at 2: 92 -> 173
# images/s). Measured on 2 vCPUs, 3264 images: 1 replica x 1 CPU 75 images/s, 1 x 1.5 CPUs (2
# threads) 101, 2 x 0.75 CPUs 102 (docs/benchmarks.md).
MODEL_SHARE = 0.75
THREADS_PER_REPLICA = 2
WITHDRAWN = "withdrawn"
WITHDRAWN_REASON = (
    "withdrawn: the input file is gone (deleted or moved) since this row was scored; its earlier rows are kept"
)


@dataclass(frozen=True)
class PriorFile:
    """The latest rows of one file in the output (one per slice, all from one run)."""

    model_ids: frozenset[str]
    status: str  # ok, error, skipped or withdrawn (error when any of them is)
    size: int | None
    version: str | None
    sha256: str | None
    selection: str
    error_rows: int  # error rows of this file at its latest version, over every run
    error: str | None = None  # the latest error
    guard: str | None = None  # the input guard's settings it was scored under (None: before they were recorded)

    def may_fail_otherwise(self, guard: str) -> bool:
        """Whether an error row could come out otherwise now (see the module doc)."""
        err = self.error or ""
        return (
            err.startswith(TRANSIENT_ERRORS)
            or "grown since it was listed" in err
            or (self.guard is not None and self.guard != guard)
        )


def prior_state(rows: pa.Table) -> dict[str, PriorFile]:
    """Committed rows (:data:`PRIOR_COLUMNS`) -> the latest state of each file, by its output name."""
    cols = {c: rows.column(c).to_pylist() for c in PRIOR_COLUMNS if c != "scored_at"}
    latest = latest_mask(rows).to_pylist()
    by_path: dict[str, list[int]] = {}
    for i, p in enumerate(cols["path"]):
        by_path.setdefault(p, []).append(i)
    out = {}
    ids: dict[str | None, frozenset[str]] = {}
    for p, idx in by_path.items():
        # Most files have one row, their own latest: no sets or scans for them. 100,000 rows (1% of
        # files with two): 4.8-7.7 s against 8.4-13.5 s (load 20-25 on 2 CPUs, sides interleaved).
        if len(idx) == 1:
            i = idx[0]
            st, m = cols["status"][i] or "ok", cols["model_id"][i]
            out[p] = PriorFile(
                model_ids=ids.setdefault(m, frozenset((m,)) if m else frozenset()),
                status=st if st in ("error", WITHDRAWN, "skipped") else "ok",
                size=cols["size"][i],
                version=cols["version"][i],
                sha256=cols["sha256"][i],
                selection=cols["selection"][i] or "",
                error_rows=int(st == "error"),
                error=cols["error"][i],
                guard=cols["guard"][i],
            )
            continue
        mine = [i for i in idx if latest[i]]
        statuses = {cols["status"][i] or "ok" for i in mine}
        status = (
            "error"
            if "error" in statuses
            else WITHDRAWN
            if WITHDRAWN in statuses
            else ("skipped" if statuses == {"skipped"} else "ok")
        )
        i0 = next((i for i in mine if cols["status"][i] == "error"), mine[0])
        version = cols["version"][i0]
        errors = sum(1 for i in idx if cols["status"][i] == "error" and cols["version"][i] == version)
        out[p] = PriorFile(
            model_ids=frozenset(cols["model_id"][i] for i in mine if cols["model_id"][i]),
            status=status,
            size=cols["size"][i0],
            version=version,
            sha256=cols["sha256"][i0],
            selection=cols["selection"][i0] or "",
            error_rows=errors,
            error=cols["error"][i0],
            guard=cols["guard"][i0],
        )
    return out


@dataclass(frozen=True)
class RerunDiff:
    """What a run does to the output, file by file (see the module doc)."""

    todo: dict[str, tuple[int, str]]  # listing path -> (size, version): read, hash, score
    already: frozenset[tuple[str, str]]  # (listing path, sha256) whose rows stand: dropped once hashed
    withdrawn: tuple[str, ...]  # output names of files gone from the input
    retried: int = 0  # error files tried again
    final_errors: int = 0  # error files past the retry cap, left as they are
    replaced_models: tuple[str, ...] = ()  # rescore_all: the other models whose rows this run replaces

    @property
    def has_work(self) -> bool:
        return bool(self.todo or self.withdrawn)


def other_models(prior: Mapping[str, PriorFile], model_id: str) -> dict[str, int]:
    """Files of the output whose rows another model wrote, by model id."""
    counts: dict[str, int] = {}
    for state in prior.values():
        for m in state.model_ids - {model_id}:
            counts[m] = counts.get(m, 0) + 1
    return dict(sorted(counts.items()))


def rerun_diff(
    files: Mapping[str, tuple[int, str]],
    shown: Mapping[str, str],
    prior: Mapping[str, PriorFile],
    *,
    model_id: str,
    selection: str,
    retry_errors: int,
    guard: str = "",
    rescore_all: bool = False,
    output: str = "the output",
) -> RerunDiff:
    """Decide a run: ``files`` the listing (path -> (size, version)), ``shown`` each path as the
    output names it (path_mode), ``prior`` :func:`prior_state` of the committed rows."""
    others = other_models(prior, model_id)
    if others and not rescore_all:
        which = ", ".join(f"{m} ({n} file{'s' if n > 1 else ''})" for m, n in others.items())
        raise ConfigError(
            f"output {output} holds rows of model {which}, and this run scores with model {model_id}: one output "
            "holds one model's rows, so that every row and the report speak for one model. Rerun with --rescore-all "
            "to score every file again with this model and replace those rows, or score into a new output"
        )
    if rescore_all:
        return RerunDiff(todo=dict(files), already=frozenset(), withdrawn=(), replaced_models=tuple(others))
    todo: dict[str, tuple[int, str]] = {}
    already: set[tuple[str, str]] = set()
    retried = final = 0
    for p, (size, version) in files.items():
        state = prior.get(shown[p])
        if state is None or state.status == WITHDRAWN:
            todo[p] = (size, version)
            continue
        fresh = state.size == size and same_version(state.version, version)
        if state.status == "error":
            if not fresh:
                todo[p] = (size, version)  # changed: a new file, its own retries
            elif not state.may_fail_otherwise(guard):
                pass  # the same bytes, the same settings: the same error
            elif state.error_rows < 1 + retry_errors:
                todo[p] = (size, version)
                retried += 1
            else:
                final += 1
            continue
        if state.status == "skipped" and state.selection != selection:
            todo[p] = (size, version)
            continue
        if not fresh:
            todo[p] = (size, version)
            if state.sha256:  # the same bytes under a new version (touched, copied back): not scored twice
                already.add((p, state.sha256))
    listed = set(shown.values())
    withdrawn = tuple(sorted(s for s, st in prior.items() if s not in listed and st.status != WITHDRAWN))
    return RerunDiff(todo=todo, already=frozenset(already), withdrawn=withdrawn, retried=retried, final_errors=final)


def plan_engine(asked: str, meta: PackageMeta, *, use_gpu: bool, model: str) -> tuple[str, tuple[str, ...]]:
    """The engine a run scores with (``onnxruntime`` or ``torch``) from the setting and the
    package's ``model.json``, and the summary's notes. Pure; the driver pins and checks the files
    of the engine it names before the plan (:func:`plan_scoring` takes the result). A
    ``model.onnx`` its model id does not cover (exported before it did) is never run: ``auto``
    scores with PyTorch and says why, ``onnxruntime`` is refused naming the fix."""
    from ..models import choose_engine, onnx_unbound_note, package_has_onnx

    note = onnx_unbound_note(meta)
    if note and asked == "onnxruntime":
        raise ConfigError(f"{model}: {note}; or score with --engine auto or torch")
    engine = choose_engine(asked, has_onnx=package_has_onnx(meta), use_gpu=use_gpu)
    return engine, (note,) if note else ()


def guard_id(guard: InputGuard) -> str:
    """The input guard's settings as a short hash (the rows' ``guard`` column)."""
    import hashlib

    return hashlib.sha256(guard.to_yaml().encode()).hexdigest()[:12]


# Bumped when what the series table or the report hold changes: each output's are built again once.
DERIVED_FORMAT = 1


@dataclass(frozen=True)
class DerivedFacts:
    """The output's derived files (series table, report) as a run finds them: what the manifest
    lists (``derived``: key -> entry, with the sha256 and ``of``, the digest of the rows' files they
    were built from), the sha256 of each file there now (None: absent) and the digest of the
    manifest's files now (:func:`~braintumor_ray.core.files_digest`)."""

    listed: Mapping[str, Mapping[str, Any]]
    present: Mapping[str, str | None]
    rows: str


def derived_settings(*, class_names: tuple[str, ...], series_review_threshold: float, output_uri: str) -> str:
    """What the series table and the report depend on beside the committed rows, as one digest (their
    entries' ``settings``): the classes, the series verdicts' review threshold, the output's URI (the
    report names it) and :data:`DERIVED_FORMAT`."""
    import hashlib
    import json

    doc = {
        "format": DERIVED_FORMAT,
        "classes": list(class_names),
        "series_review_threshold": series_review_threshold,
        "output": output_uri,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def derived_stale(derived: DerivedFacts, settings: str, *, report: str) -> str | None:
    """Why a run that commits no rows must build the series table and report again, or None when
    the ones committed stand: each listed file there with its listed bytes, built from the files
    the manifest lists now under these settings, the report among them, and no unlisted one."""
    if report not in derived.listed:
        return "the manifest lists no report (an output from before they were committed with the rows)"
    for key, entry in sorted(derived.listed.items()):
        if derived.present.get(key) is None:
            return f"{key} is gone"
        if derived.present[key] != entry.get("sha256"):
            return f"{key} is not the file that was committed (its sha256 differs from the manifest's)"
        if entry.get("of") != derived.rows:
            return f"{key} was built from other committed files than the manifest lists"
        if entry.get("settings") != settings:
            return f"{key} was built under other settings (review threshold, output URI or format)"
    for key, sha in sorted(derived.present.items()):
        if sha is not None and key not in derived.listed:
            return f"{key} is there but not listed in the manifest"
    return None


# In _identifiers.json: the output's rows are named by _manifest.json. Without this, a deleted
# manifest made every Parquet file there, planted ones included, "adopted" as committed rows.
MANIFEST_ERA = {"manifest": 1}


@dataclass(frozen=True)
class IdentifiersFound:
    """The output's identifiers record (``_identifiers.json``) as a run finds it: its bytes (None:
    no file, or an empty one), and whether the manifest lists committed rows."""

    record: bytes | None = None
    has_rows: bool = False


def claim_identifiers(found: IdentifiersFound, ids: Identifiers, *, output: str) -> dict[str, Any] | None:
    """The identifiers record the run must write (None: the one there stands), or a ConfigError when
    the output's rows are named another way than this run would name them (another mode or key):
    they would not match the rows there, and every file would be scored again under a second name.
    An output with rows but no record was written before the modes existed: full names. Pure."""
    import json

    mine = ids.describe()
    theirs: dict[str, Any] | None = None
    if found.record is not None:
        try:
            theirs = json.loads(found.record)
            if not isinstance(theirs, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConfigError(
                f"{output}/_identifiers.json is not readable JSON ({e}): restore it, or score into a new output"
            ) from e
    elif found.has_rows:  # committed rows (a planted file is none), written before the record
        theirs = {"path_mode": "full", "uid_mode": "full", "key_id": None}
    if theirs is not None and {k: theirs.get(k) for k in mine} != mine:
        if (
            theirs.get("key_id") != mine["key_id"]
            and theirs.get("path_mode") == mine["path_mode"]
            and theirs.get("uid_mode") == mine["uid_mode"]
        ):
            why = f"its rows were hashed with another key (key id {theirs.get('key_id')}, this run's {mine['key_id']})"
            fix = "run with the key the output was written with"
        else:
            why = f"its rows name files with path_mode={theirs.get('path_mode')}, uid_mode={theirs.get('uid_mode')}"
            fix = f"rerun with --path-mode {theirs.get('path_mode')} --uid-mode {theirs.get('uid_mode')}"
        raise ConfigError(
            f"output {output}: {why}, and this run asks for path_mode={ids.path_mode}, uid_mode={ids.uid_mode}; every "
            f"file would be scored again under a second name. {fix}, or score into a new output"
        )
    want = mine | MANIFEST_ERA
    return None if found.record is not None and theirs == want else want


@dataclass(frozen=True)
class ClusterShape:
    """The Ray cluster's resources, as the replica plan needs them."""

    cpus: float
    gpus: int
    node_cpus: tuple[float, ...] = ()


@dataclass(frozen=True)
class ScoringPlan:
    """Everything a run does, decided before Ray runs anything; model replicas take this object."""

    run_id: str
    input_uri: str
    output_uri: str
    s3_endpoint_url: str | None
    uri_prefix: str  # "s3://" for S3 inputs: listing paths -> URIs
    pin: PackagePin  # the package the driver verified: replicas load exactly these bytes
    engine: str
    class_names: tuple[str, ...]
    preprocess: MRIPreprocess = field(repr=False)
    identifiers: Identifiers = field(repr=False)
    diff: RerunDiff = field(repr=False)
    refused: dict[str, str] = field(repr=False)  # listing path -> why it is refused unread
    select: SeriesSelector
    selection: str  # the selector, described (the rows' selection column)
    guard: InputGuard
    guard_id: str  # its settings, hashed (the rows' guard column)
    explain: str
    explain_stage_uri: str  # the replicas write maps here: OUTPUT._staging/<run>/_objects/_explain
    explain_final_uri: str  # the commit publishes them here, rows name them here: OUTPUT_explain
    review_threshold: float | None  # the option (None: the package's)
    series_review_threshold: float  # the series verdicts': the option, else the package's
    use_gpu: bool
    batch_size: int
    layout: str  # tasks or replicas (plan_layout)
    replicas: int  # layout tasks: tasks at once (each holds a model)
    concurrency: int | None  # as asked for (layout tasks: the cap on tasks at once; none: the CPUs decide)
    replica_cpus: float
    scored_at: datetime
    rescore_all: bool
    notes: tuple[str, ...] = ()
    explain_method: str = "auto"  # auto: maps from the forward pass where the model gives them; gradcam
    tta: str = "none"  # flip: each image and its mirror, averaged (models.InferenceModel.tta)
    derived_settings: str = ""  # derived_settings(): the derived files' entries record it
    # Why the series table and report are built again although no row is committed (None: they
    # stand, and a run with nothing new writes nothing); a run that commits rows always builds them.
    derived_stale: str | None = None
    series_published: bool = False  # a series table is there (or listed): replaced even when empty
    # The identifiers record to write before anything is committed (None: the one there stands).
    identifiers_record: dict[str, Any] | None = None

    @property
    def builds_derived(self) -> bool:
        return self.diff.has_work or self.derived_stale is not None


def plan_scoring(
    *,
    config: Any,
    run_id: str,
    input_uri: str,
    output_uri: str,
    uri_prefix: str,
    pin: PackagePin,
    engine: str,
    meta: PackageMeta,
    preprocess: MRIPreprocess,
    identifiers: Identifiers,
    diff: RerunDiff,
    refused: Mapping[str, str],
    explain_stage_uri: str,
    explain_final_uri: str,
    cluster: ClusterShape | None,
    scored_at: datetime,
    notes: tuple[str, ...] = (),
    derived: DerivedFacts | None = None,
    identifiers_found: IdentifiersFound | None = None,
) -> ScoringPlan:
    """The run's plan from the config (a :class:`ScoreConfig`) and the facts the driver read.
    ``cluster``: None when there is nothing to score (no replicas then). ``derived``: the output's
    series table and report as found (None: none, they are built). ``identifiers_found``: the
    output's identifiers record as found (None: no record and no rows); a record of another mode or
    key refuses the run here (:func:`claim_identifiers`), before anything is written.

    One piece on purpose: its keyword signature and the plan's constructor are most of it, and
    each decision in it is a function of its own (:func:`claim_identifiers`, :func:`plan_replicas`,
    :func:`derived_stale`)."""
    record = claim_identifiers(identifiers_found or IdentifiersFound(), identifiers, output=output_uri)
    if config.use_gpu and cluster is not None and cluster.gpus < 1:
        raise ConfigError("use_gpu is set but the Ray cluster has no GPU: drop --use-gpu or add GPU nodes")
    layout = plan_layout(config, engine=engine)
    replicas, per = (0, 0.0)
    if cluster is not None and diff.todo:
        nodes = list(cluster.node_cpus) or None
        replicas, per = (
            plan_tasks(config, cpus=cluster.cpus, node_cpus=nodes)
            if layout == "tasks"
            else plan_replicas(config, cpus=cluster.cpus, gpus=cluster.gpus, node_cpus=nodes)
        )
    review = config.review_threshold if config.review_threshold is not None else meta.review_threshold
    settings = derived_settings(
        class_names=tuple(meta.class_names), series_review_threshold=review, output_uri=output_uri
    )
    derived = derived or DerivedFacts(listed={}, present={}, rows="")
    return ScoringPlan(
        **_config_fields(config),
        run_id=run_id,
        input_uri=input_uri,
        output_uri=output_uri,
        uri_prefix=uri_prefix,
        pin=pin,
        engine=engine,
        class_names=meta.class_names,
        preprocess=preprocess,
        identifiers=identifiers,
        diff=diff,
        refused={p: refused[p] for p in diff.todo if p in refused},
        explain_stage_uri=explain_stage_uri,
        explain_final_uri=explain_final_uri,
        series_review_threshold=review,
        layout=layout,
        replicas=replicas,
        replica_cpus=per,
        scored_at=scored_at,
        notes=notes,
        derived_settings=settings,
        derived_stale=None if diff.has_work else derived_stale(derived, settings, report=REPORT_KEY),
        series_published=SERIES_KEY in derived.listed or derived.present.get(SERIES_KEY) is not None,
        identifiers_record=record,
    )


def _config_fields(config: Any) -> dict[str, Any]:
    """The plan's fields that are the config's settings as they are (the selector and the guard
    also described, as the rows' columns name them)."""
    return {
        "s3_endpoint_url": config.s3_endpoint_url,
        "select": config.select,
        "selection": config.select.describe(),
        "guard": config.guard,
        "guard_id": guard_id(config.guard),
        "explain": config.explain,
        "review_threshold": config.review_threshold,
        "use_gpu": config.use_gpu,
        "batch_size": config.batch_size,
        "concurrency": config.concurrency,
        "rescore_all": config.rescore_all,
        "explain_method": config.explain_method,
        "tta": config.tta,
    }


def plan_layout(config: ScoreConfig, *, engine: str) -> str:
    """``tasks`` or ``replicas``: ``config.layout``, where ``auto`` is tasks on CPUs with ONNX
    Runtime and replicas otherwise.

    Tasks read, decode and score their own files, with the model loaded once per worker process
    and one thread per CPU: no actor to start each run (~1.4 s of CPU on 2 vCPUs) and no pixels
    through the object store. Measured on 2 vCPUs (2,000 real images, Lite0, five rounds,
    2026-12-07): 1.01x the machine's limit without maps and 0.79x with the default maps
    (medians), against 0.78x and 0.69x for replicas in the same rounds (docs/benchmarks.md).
    Replicas stay for GPUs (one actor per GPU, fed by CPU decode tasks) and for PyTorch on CPUs
    (every task worker would import it).
    """
    if config.layout != "auto":
        return config.layout
    return "tasks" if not config.use_gpu and engine == "onnxruntime" else "replicas"


def plan_tasks(config: ScoreConfig, *, cpus: float, node_cpus: list[float] | None = None) -> tuple[int, float]:
    """(tasks at once, CPUs each) for layout tasks: by default one task of 1 CPU (one model
    thread) per CPU of the cluster; ``concurrency`` and ``cpus_per_replica`` change them. A task
    larger than every node could never be scheduled: refused."""
    per = config.cpus_per_replica or 1.0
    nodes = [c for c in (node_cpus or [cpus]) if c > 0] or [cpus]
    if per > max(nodes) + 1e-9:
        raise ConfigError(
            f"layout tasks: {per:g} CPUs a task is more than any node has ({max(nodes):g}), and the job would "
            "wait forever: lower cpus_per_replica"
        )
    return config.concurrency or max(1, sum(int(c / per + 1e-9) for c in nodes)), round(per, 3)


def plan_replicas(
    config: ScoreConfig, *, cpus: float, gpus: int, node_cpus: list[float] | None = None
) -> tuple[int, float]:
    """(model replicas, CPUs each; each replica runs that many threads, rounded).

    With use_gpu: one replica per GPU, 1 CPU each (default). On CPUs each node gives the model
    :data:`MODEL_SHARE` of its CPUs and reading and decoding the rest (at least
    :data:`DECODE_CPUS`), in replicas of about :data:`THREADS_PER_REPLICA` CPUs: on a 2-vCPU
    node one replica of 1.5 CPUs (2 threads) beside 0.5 CPU of decode tasks, the fastest layout
    measured (docs/benchmarks.md). ``node_cpus``: the CPUs of each node (default: one node).
    """
    if config.use_gpu:
        return config.concurrency or gpus, config.cpus_per_replica or 1.0
    nodes = [c for c in (node_cpus or [cpus]) if c >= 2 * DECODE_CPUS] or [cpus]
    model = [max(min(c * MODEL_SHARE, c - DECODE_CPUS), DECODE_CPUS) for c in nodes]
    # One replica size for the whole pool (Ray Data's actors are alike): the smallest node's.
    default_per = min(m / max(1, round(m / THREADS_PER_REPLICA)) for m in model)
    per = config.cpus_per_replica or default_per
    if config.concurrency:
        replicas = config.concurrency
        if not config.cpus_per_replica:  # the model's CPUs shared by the replicas asked for
            per = min(default_per, sum(model) / replicas)
    else:
        replicas = max(1, sum(int(m / per + 1e-9) for m in model))
    if replicas * per > cpus - DECODE_CPUS + 1e-9 or per > max(nodes) - DECODE_CPUS + 1e-9:
        raise ConfigError(
            f"{replicas} model replicas x {per:g} CPUs leave less than {DECODE_CPUS} of the cluster's {cpus:g} CPUs "
            "(or of a node's) to read and decode files, and the job would wait forever: lower concurrency or "
            "cpus_per_replica"
        )
    if abs(per - DECODE_CPUS) < 1e-9:
        # Equal remote arguments would let Ray Data fuse the decode stage into the model actor,
        # where it runs in turn with inference (issue 6): a hair less keeps them apart.
        per = DECODE_CPUS - 0.01
    return replicas, round(per, 3)
