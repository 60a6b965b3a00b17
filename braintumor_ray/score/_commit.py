"""A scoring run's one commit: its staged rows (each file read once), the withdrawals and the new
versions of unchanged files, the maps the replicas staged; and the committed table after it, built
in memory."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import Location, StagedWriter, StorageError, latest_rows, posix_basename, remove_child
from ._config import OUTPUT_CONFIG_FILE, OUTPUT_IDS_FILE, ScoreConfig
from ._derived import Derived, commit_args
from ._explain import HeatMaps, explain_location, explain_objects
from ._layout import ATTEMPTS_DIR, EXPLAIN_SUFFIX, UNCHANGED, _output_of, _writer, output_schema, parquet_bytes
from ._plan import WITHDRAWN, WITHDRAWN_REASON, ScoringPlan

logger = logging.getLogger(__name__)


def _commit(
    plan: ScoringPlan,
    writer: StagedWriter,
    staging: Location,
    committed: pa.Table,
    derive: Callable[..., Derived],
    objects: Mapping[str, Mapping[str, Any]],
) -> tuple[pa.Table, pa.Table, int, Derived]:
    """Add the withdrawal rows to the run, then commit it: its rows, the maps its replicas staged,
    and the series table, report and DICOM objects ``derive`` builds from the committed rows as
    they will be (all listed in the same manifest write as the rows; replaced objects, and with
    ``--rescore-all`` the maps no row names any more, leave it in that write). ``objects``: the
    manifest's objects before the commit. Returns this run's rows (scored and withdrawn), the
    committed rows after the commit, the maps committed and what ``derive`` built.

    Every row of the run is on storage: the commit marks it so (from here a cut-off run is
    committed by the next one instead of redone), then moves the files in one by one and names
    them in the manifest. Each staged file is read once (each map once, to hash it); the
    committed table after the commit is built from those tables and ``committed`` (the rows the
    plan read), not read back from storage.
    """
    schema = output_schema(list(plan.class_names))
    kept, data, found = _gather_staged(plan, staging, committed, schema)
    written = pa.concat_tables([t.cast(schema) for t in kept.values()]) if kept else schema.empty_table()
    maps = writer.staged_objects(staging, EXPLAIN_SUFFIX)  # each hashed alone: never all in memory
    parts = [] if plan.rescore_all and kept else [committed]
    if found:  # after `written`: these files were not scored again
        reversioned = _reversioned_rows(committed, found, plan.scored_at)
        _stage_table(staging, f"versions-{plan.run_id}.parquet", reversioned, kept, data)
        parts.append(reversioned)
        logger.info(
            "score: %d files with unchanged bytes under a new version (touched, chmod, restored): their new "
            "version recorded, not scored again",
            len(found),
        )
    after = pa.concat_tables([*parts, written])
    replace_all = plan.rescore_all and bool(kept)
    # The replaced rows' maps go with them: retired in this commit's one write, then deleted.
    unnamed = explain_objects(after.column("heatmap_path").to_pylist(), objects) if replace_all else ()
    retired = tuple(k for k in unnamed if k not in maps)
    heat = HeatMaps(
        explain_location(writer.output),
        objects,
        staged=writer.object_stage(staging, EXPLAIN_SUFFIX),
        staged_entries=maps,
        retired=frozenset(retired),
    )
    built = derive(after, maps=heat)
    args = commit_args(built)
    args["retire"] = (*args["retire"], *retired)
    writer.commit(staging, replace_all=replace_all, data=data, staged=maps, **args)
    _clear_attempts(writer.root.join(ATTEMPTS_DIR))
    return written, after, len(maps), built


def commit_settings(dst: Location, plan: ScoringPlan, config: ScoreConfig) -> None:
    """What the plan accepted, written before anything else is: the identifiers record when the plan
    says so (:func:`~._plan.claim_identifiers`: before any row named by it is committed, so that a
    run cut off after its commit never leaves rows named another way than the record says), and the
    run's config as given (``jobs/score.py --config`` takes it back; dataset readers skip it) unless
    the output holds these bytes already: a run with nothing new writes nothing."""
    if plan.identifiers_record is not None:
        dst.join(OUTPUT_IDS_FILE).write_atomic(json.dumps(plan.identifiers_record, indent=2).encode())
    loc = dst.join(OUTPUT_CONFIG_FILE)
    data = config.to_yaml().encode()
    if not loc.exists() or loc.read_bytes() != data:
        config.save_yaml(loc)


def _gather_staged(
    plan: ScoringPlan, staging: Location, committed: pa.Table, schema: pa.Schema
) -> tuple[dict[str, pa.Table], dict[str, bytes], dict[str, tuple[int, str]]]:
    """The run's staged rows as the commit will publish them: the replicas' files without their
    :data:`UNCHANGED` rows, as one file, plus the withdrawal rows of the files gone from the input.
    Returns the tables and bytes by staged name, and the unchanged files' new (size, version)."""
    staged, data = _read_staged(staging)
    kept, found = _take_unchanged(staged)
    _restage(staged, kept, data, staging)
    kept, data = _one_file(kept, data, staging, plan.run_id, schema)
    if plan.diff.withdrawn:
        rows = _withdrawal_rows(committed, plan.diff.withdrawn, plan.scored_at)
        _stage_table(staging, f"withdrawn-{plan.run_id}.parquet", rows, kept, data)
        logger.warning(
            "score: %d rows of %d files gone from the input marked withdrawn (their earlier rows stay)",
            rows.num_rows,
            len(plan.diff.withdrawn),
        )
    return kept, data, found


def _read_staged(staging: Location) -> tuple[dict[str, pa.Table], dict[str, bytes]]:
    """The run's staged Parquet files, by name, each read once: their tables and their bytes."""
    tables, raw = {}, {}
    for path in sorted(staging.files() if staging.exists() else []):
        if path.endswith(".parquet"):
            name = posix_basename(path)
            raw[name] = staging.fs.cat_file(path)
            tables[name] = pq.read_table(pa.BufferReader(raw[name]))
    return tables, raw


def _restage(staged: dict[str, pa.Table], kept: dict[str, pa.Table], data: dict[str, bytes], staging: Location) -> None:
    """The staged files that held :data:`UNCHANGED` rows (``kept``: the tables without them)
    rewritten without them, or removed when nothing else was in them; ``data`` follows."""
    out = _output_of(staging)
    for name, t in staged.items():
        if name not in kept:
            del data[name]
            remove_child(out, staging, name, what="score")
        elif kept[name] is not t:
            data[name] = parquet_bytes(kept[name])
            staging.join(name).write_bytes(data[name])


def _stage_table(
    staging: Location, name: str, table: pa.Table, kept: dict[str, pa.Table], data: dict[str, bytes]
) -> None:
    """A table the commit adds to the run (withdrawals, new versions), staged as ``name`` and
    entered in ``kept`` and ``data`` as the staged files are."""
    kept[name], data[name] = table, parquet_bytes(table)
    staging.join(name).write_bytes(data[name])


def _one_file(
    kept: dict[str, pa.Table], data: dict[str, bytes], staging: Location, run_id: str, schema: pa.Schema
) -> tuple[dict[str, pa.Table], dict[str, bytes]]:
    """The run's scored rows as one staged file, ``rows-RUN.parquet``, in place of Ray Data's one
    file per block (32 files a 1,000 rows): every later run reads each committed file, and reading
    the 305 files of 10,000 rows was 0.85 s of a 2.7 s no-change rerun (load 35; at 100,000 rows,
    3,125 files, 3-5 s). Written before the parts go, all before the run's marker: a run cut off
    here is dropped whole by the next one, as any unmarked run."""
    if len(kept) < 2:
        return kept, data
    merged = pa.concat_tables([t.cast(schema) for t in kept.values()])
    name = f"rows-{run_id}.parquet"
    blob = parquet_bytes(merged)
    staging.join(name).write_bytes(blob)
    out = _output_of(staging)
    for part in kept:
        if not remove_child(out, staging, part, what="score"):  # left there, it would be committed twice
            raise StorageError(f"score: could not remove the staged part {part} of {staging.uri} (see the warning)")
    return {name: merged}, {name: blob}


def _take_unchanged(staged: dict[str, pa.Table]) -> tuple[dict[str, pa.Table], dict[str, tuple[int, str]]]:
    """Split the :data:`UNCHANGED` rows off the staged tables: the tables without them (a table
    left empty is dropped) and each such file's (size, version) as listed."""
    found: dict[str, tuple[int, str]] = {}
    kept: dict[str, pa.Table] = {}
    for name, t in staged.items():
        same = pc.equal(t.column("status"), UNCHANGED)
        if not pc.any(same).as_py():
            kept[name] = t
            continue
        hit = t.filter(same)
        found.update(
            zip(hit.column("path").to_pylist(), zip(hit.column("size").to_pylist(), hit.column("version").to_pylist()))
        )
        rest = t.filter(pc.invert(same))
        if rest.num_rows:
            kept[name] = rest
    return kept, found


def _reversioned_rows(committed: pa.Table, found: dict[str, tuple[int, str]], scored_at: datetime) -> pa.Table:
    """Copies of the latest rows of files whose bytes are unchanged, with their new size and version."""
    rows = _withdrawal_rows(committed, tuple(found), scored_at, status=None)
    paths = rows.column("path").to_pylist()
    schema = rows.schema
    rows = rows.set_column(schema.get_field_index("size"), "size", pa.array([found[p][0] for p in paths], pa.int64()))
    return rows.set_column(
        schema.get_field_index("version"), "version", pa.array([found[p][1] for p in paths], pa.string())
    )


def _withdrawal_rows(
    committed: pa.Table, withdrawn: tuple[str, ...], scored_at: datetime, *, status: str | None = WITHDRAWN
) -> pa.Table:
    """A ``withdrawn`` row for each latest row of the files gone from the input: a copy of it
    (what was said, by which model, from which bytes), marked, and the latest of its file.
    ``status=None``: the copies keep their status and error (a file's rows under a new version).
    ``committed``: the committed rows (:func:`committed_rows`), whose schema the rows take."""
    gone = pa.array(sorted(withdrawn), pa.string())
    rows = latest_rows(committed.filter(pc.is_in(committed.column("path"), value_set=gone)))
    n = rows.num_rows
    if status is not None:
        rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array([status] * n, pa.string()))
        rows = rows.set_column(
            rows.schema.get_field_index("error"), "error", pa.array([WITHDRAWN_REASON] * n, pa.string())
        )
    field = rows.schema.field("scored_at")
    return rows.set_column(rows.schema.get_field_index("scored_at"), field, pa.array([scored_at] * n, field.type))


def _clear_attempts(attempts: Location) -> None:
    """After a commit every listed file has its row: the decode-attempt markers have served (and
    the lease keeps other runs out, so none of them is another run's)."""
    out = _output_of(attempts)
    try:
        remove_child(out, _writer(out).root, posix_basename(attempts.path), what="score", tree=True)
    except Exception as e:
        logger.warning(
            "score: could not delete the decode-attempt markers in %s (%s): harmless, they are only "
            "read while a file is being scored",
            attempts.uri,
            e,
        )
