"""Scoring's plan and record, without Ray (issue 25): the rerun rules, versions, the manifest,
atomic writes on a full disk, the package pin and the ONNX file bound to the model id."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from braintumor_ray.core import ConfigError, Manifest, NoSpaceError, StorageError, local_version, resolve, same_version
from braintumor_ray.score._plan import PRIOR_COLUMNS, WITHDRAWN, prior_state, rerun_diff

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _rows(*rows: dict) -> pa.Table:
    base = {"sha256": "s", "size": 10, "version": "v1", "model_id": "m1", "status": "ok", "selection": "",
            "scored_at": T0, "error": None, "guard": "g1"}
    full = [base | r for r in rows]
    return pa.table({c: pa.array([r[c] for r in full], t) for c, t in PRIOR_COLUMNS.items()})


def _diff(files, rows, **kw):
    kw = {"model_id": "m1", "selection": "", "retry_errors": 2, "guard": "g1"} | kw
    return rerun_diff(files, {p: p for p in files}, prior_state(rows), **kw)


def test_unchanged_files_are_done_and_new_ones_scored():
    d = _diff({"a": (10, "v1"), "b": (5, "v1")}, _rows({"path": "a"}))
    assert d.todo == {"b": (5, "v1")} and not d.already and not d.withdrawn


def test_a_changed_version_at_equal_size_is_read_again_and_dropped_if_same_bytes():
    d = _diff({"a": (10, "v2")}, _rows({"path": "a", "sha256": "abc"}))
    assert d.todo == {"a": (10, "v2")} and d.already == {("a", "abc")}


def test_no_version_means_hash():
    d = _diff({"a": (10, "")}, _rows({"path": "a", "version": ""}))
    assert "a" in d.todo


def test_error_rows_are_retried_up_to_the_cap_then_final():
    unreadable = {"path": "a", "status": "error", "error": "unreadable: permission denied"}
    d = _diff({"a": (10, "v1")}, _rows(unreadable))
    assert d.todo == {"a": (10, "v1")} and d.retried == 1 and not d.already  # retried even at the same bytes
    three = _rows(*(unreadable | {"scored_at": T0 + timedelta(seconds=i)} for i in range(3)))
    d = _diff({"a": (10, "v1")}, three)
    assert not d.todo and d.final_errors == 1  # 1 + retry_errors=2 error rows: final, stays recorded
    assert _diff({"a": (10, "v1")}, _rows(unreadable), retry_errors=0).final_errors == 1
    # A changed file starts afresh, whatever its history.
    assert "a" in _diff({"a": (11, "v2")}, three).todo
    # A later ok row supersedes the errors.
    fixed = _rows(unreadable, {"path": "a", "scored_at": T0 + timedelta(seconds=1)})
    assert not _diff({"a": (10, "v1")}, fixed).todo


def test_a_decode_error_is_retried_only_under_other_guard_settings():
    corrupt = _rows({"path": "a", "status": "error", "error": "not an image: cannot identify image file"})
    assert not _diff({"a": (10, "v1")}, corrupt).todo  # same bytes, same settings: the same error
    assert _diff({"a": (10, "v1")}, corrupt, guard="g2").retried == 1  # a limit raised since
    killed = _rows({"path": "a", "status": "error", "error": "killed its decode task twice (out of memory?)"})
    assert _diff({"a": (10, "v1")}, killed).retried == 1


def test_skipped_files_are_looked_at_again_only_under_another_selector():
    rows = _rows({"path": "a", "status": "skipped", "selection": "sel1"})
    assert not _diff({"a": (10, "v1")}, rows, selection="sel1").todo
    assert "a" in _diff({"a": (10, "v1")}, rows, selection="sel2").todo


def test_files_gone_from_the_input_are_withdrawn_once():
    rows = _rows({"path": "a"}, {"path": "gone"})
    assert _diff({"a": (10, "v1")}, rows).withdrawn == ("gone",)
    again = _rows({"path": "a"}, {"path": "gone"}, {"path": "gone", "status": WITHDRAWN,
                                                     "scored_at": T0 + timedelta(seconds=1)})
    assert _diff({"a": (10, "v1")}, again).withdrawn == ()
    # A withdrawn file that comes back is scored again.
    assert "gone" in _diff({"a": (10, "v1"), "gone": (10, "v1")}, again).todo


def test_another_models_rows_refuse_the_run_with_the_fix_named():
    rows = _rows({"path": "a", "model_id": "old"})
    with pytest.raises(ConfigError, match=r"model old \(1 file\).*--rescore-all.*new output"):
        _diff({"a": (10, "v1")}, rows)
    d = _diff({"a": (10, "v1"), "b": (1, "v1")}, rows, rescore_all=True)
    assert d.todo == {"a": (10, "v1"), "b": (1, "v1")} and d.replaced_models == ("old",)


def test_local_version_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 100)
    st = os.stat(f)
    before = local_version(st)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    f.write_bytes(b"b" * 100)  # cp -p: same size, mtime put back
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = local_version(os.stat(f))
    assert os.stat(f).st_mtime == st.st_mtime and os.stat(f).st_size == st.st_size
    assert not same_version(before, after)
    # A row written before the new versions (mtime only) compares by the mtime, as it did.
    assert same_version(str(st.st_mtime), after) and not same_version(None, after)


def test_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    loc = resolve(str(tmp_path / "out" / "_identifiers.json"))
    loc.write_atomic(b'{"old": 1}')
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="no space left on the device") as e:
        loc.write_atomic(b'{"new": 2}')
    assert "\n" not in str(e.value) and isinstance(e.value, NoSpaceError) and e.value.uri == loc.uri
    monkeypatch.setattr(os, "fsync", real)
    assert loc.read_bytes() == b'{"old": 1}' and os.listdir(tmp_path / "out") == ["_identifiers.json"]


def _parquet(path, rows):
    pq.write_table(pa.table({"path": rows, "model_id": ["m"] * len(rows)}), path)
    return open(path, "rb").read()


def test_the_manifest_reads_only_the_files_it_names_with_their_bytes(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    good = _parquet(out / "a.parquet", ["x"])
    _parquet(out / "planted.parquet", ["y"])
    _parquet(out / "b.parquet", ["z"])
    m = Manifest(resolve(str(out)))
    assert m.read() is None and [c.name for c in m.committed()] == ["a.parquet", "b.parquet", "planted.parquet"]
    m.write({"a.parquet": {"sha256": hashlib.sha256(good).hexdigest()},
             "b.parquet": {"sha256": "0" * 64}})  # b rewritten since its commit
    with caplog.at_level("WARNING"):
        assert [c.name for c in m.committed()] == ["a.parquet"]
    assert "planted.parquet is not in _manifest.json" in caplog.text and "b.parquet is not the file" in caplog.text
    (out / "_manifest.json").write_text("{")
    with pytest.raises(StorageError, match="not a readable manifest"):
        m.committed()


def test_a_model_onnx_outside_the_id_is_never_run(package, old_package):
    """Today's packages have model.onnx in their id (another file under it: test_safety.py::
    test_another_models_onnx_is_refused_before_any_work); one exported before keeps its id,
    scores with PyTorch, and says why."""
    from braintumor_ray.models import load_inference_model, onnx_unbound_note, verify_package

    meta = verify_package(package)
    assert meta.onnx_in_id is True and meta.has_onnx
    old = verify_package(old_package)
    assert old.model_id != meta.model_id and "not covered by its model id" in onnx_unbound_note(old)
    assert old.onnx_file and not old.has_onnx
    assert load_inference_model(old_package, engine="auto").engine == "torch"
    with pytest.raises(ConfigError, match="not covered by its model id"):
        load_inference_model(old_package, engine="onnxruntime")


def test_a_pinned_load_refuses_a_package_rewritten_after_its_checks(package, trusted_package, tmp_path):
    from braintumor_ray.models import load_inference_model, pin_package, verify_package

    pkg = str(tmp_path / "pkg")
    shutil.copytree(package, pkg)
    meta = verify_package(pkg)
    pin = pin_package(resolve(pkg), meta, with_onnx=True)
    assert dict(pin.files)["model.json"] == hashlib.sha256(open(os.path.join(pkg, "model.json"), "rb").read()).hexdigest()
    assert load_inference_model(pkg, engine="onnxruntime", pin=pin).model_id == meta.model_id
    # Rewritten whole and consistently (another whole package's files over it, as a second export
    # into the folder would leave them): still refused.
    shutil.copytree(trusted_package, pkg, dirs_exist_ok=True)
    assert verify_package(pkg).model_id != meta.model_id
    for engine in ("onnxruntime", "torch"):
        with pytest.raises(ConfigError, match=r"pkg/model\.json is not the file verified for model"):
            load_inference_model(pkg, engine=engine, pin=pin)


def test_a_folder_refused_for_its_depth_gets_its_error_row_once(tmp_path):
    """(the soak found it) A folder past max_folder_depth was listed with no version, so every run
    wrote its error row again; its version is now the limit, and the row is final while it holds."""
    from braintumor_ray.core._storage import too_deep_reason

    base = tmp_path / "in"
    (base / "a" / "b").mkdir(parents=True)
    (base / "top.png").write_bytes(b"x")
    first, again = resolve(str(base)).listing(max_depth=1), resolve(str(base)).listing(max_depth=1)
    folder = str(base / "a" / "b")
    assert first.files[folder] == again.files[folder] and first.files[folder][1]
    row = _rows({"path": folder, "size": 0, "version": first.files[folder][1], "status": "error",
                 "sha256": None, "error": too_deep_reason(2, 1)})
    assert _diff({folder: again.files[folder]}, row).todo == {}
    # Another limit is another listing: the folder is looked at again.
    deeper = resolve(str(base)).listing(max_depth=2)
    assert folder not in deeper.refused and str(base / "top.png") in deeper.files


def test_latest_rows_is_one_rule_for_every_reader():
    """The latest rows of a file: its latest scored_at (every slice of that run); rows without a
    time are the oldest, and a file whose rows all lack one keeps them all. The plan, the
    withdrawals, the series table, the DICOM step and the report all take this one function."""
    from braintumor_ray.core import committed_table, latest_rows

    t1 = T0 + timedelta(hours=1)
    rows = _rows({"path": "a", "scored_at": None, "sha256": "old"}, {"path": "a", "sha256": "s0"},
                 {"path": "a", "scored_at": t1, "sha256": "s1"}, {"path": "a", "scored_at": t1, "sha256": "s2"},
                 {"path": "b", "scored_at": None, "sha256": "b1"}, {"path": "b", "scored_at": None, "sha256": "b2"},
                 {"path": "c", "sha256": "c1", "model_id": "m1"}, {"path": "c", "scored_at": t1, "model_id": "m2"},
                 {"path": "d", "scored_at": None, "sha256": "d1"})
    assert latest_rows(rows).column("sha256").to_pylist() == ["s1", "s2", "b1", "b2", "s", "d1"]
    by_model = latest_rows(rows, by=("model_id", "path"))
    assert by_model.column("sha256").to_pylist() == ["s1", "s2", "b1", "b2", "c1", "s", "d1"]
    assert latest_rows(rows.slice(8)).num_rows == 1  # one row a file: all of them, nothing grouped
    state = prior_state(rows)
    assert state["a"].sha256 == "s1" and state["b"].sha256 == "b1" and state["c"].model_ids == {"m2"}

    # One table from committed files of two eras: a column a file predates is its fill value.
    class F:
        def __init__(self, t):
            buf = pa.BufferOutputStream()
            pq.write_table(t, buf)
            self.data = buf.getvalue().to_pybytes()

    old = pa.table({"path": ["x"], "sha256": ["h"]})
    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("status", pa.string()),
                        ("scored_at", pa.timestamp("us", tz="UTC"))])
    both = committed_table([F(old), F(rows.select(["path", "sha256", "status", "scored_at"]))], schema,
                           fill={"status": "ok"})
    assert both.schema == schema and both.num_rows == 1 + rows.num_rows and both.slice(0, 1).to_pylist() == [
        {"path": "x", "sha256": "h", "status": "ok", "scored_at": None}]


def test_the_commit_builds_withdrawals_and_new_versions_from_the_one_table():
    """Pure on the committed table (no file read again): a withdrawal copies each latest row of a
    gone file; an unchanged file's rows are copied with its new size and version; the staged
    UNCHANGED rows are split off the scored ones."""
    from braintumor_ray.score._commit import _reversioned_rows, _take_unchanged, _withdrawal_rows
    from braintumor_ray.score._layout import UNCHANGED, committed_rows, output_schema

    names = ["glioma", "meningioma", "no_tumor", "pituitary"]
    t1, now = T0 + timedelta(hours=1), T0 + timedelta(days=1)
    schema = output_schema(names)
    base = {"sha256": "s", "size": 10, "version": "v1", "model_id": "m1", "status": "ok", "scored_at": T0}
    rows = pa.Table.from_pylist([base | {"path": "a"}, base | {"path": "a", "scored_at": t1, "sha256": "s2"},
                                 base | {"path": "b", "slice_index": 0}, base | {"path": "b", "slice_index": 1},
                                 base | {"path": "c"}], schema=schema)
    gone = _withdrawal_rows(rows, ("a", "b"), now)
    assert gone.schema == schema and gone.column("path").to_pylist() == ["a", "b", "b"]
    assert set(gone.column("status").to_pylist()) == {WITHDRAWN} and gone.column("sha256").to_pylist()[0] == "s2"
    assert set(gone.column("scored_at").to_pylist()) == {now} and gone.column("slice_index").to_pylist() == [None, 0, 1]
    moved = _reversioned_rows(rows, {"b": (11, "v2")}, now)
    assert moved.column("status").to_pylist() == ["ok", "ok"] and set(moved.column("version").to_pylist()) == {"v2"}
    assert set(moved.column("size").to_pylist()) == {11}

    staged = {"x.parquet": pa.Table.from_pylist([base | {"path": "b", "status": UNCHANGED, "size": 11, "version": "v2"},
                                                 base | {"path": "d"}], schema=schema),
              "y.parquet": pa.Table.from_pylist([base | {"path": "c", "status": UNCHANGED}], schema=schema)}
    kept, found = _take_unchanged(staged)
    assert list(kept) == ["x.parquet"] and kept["x.parquet"].column("path").to_pylist() == ["d"]
    assert found == {"b": (11, "v2"), "c": (10, "v1")}
    assert committed_rows([], names).schema == schema


def test_derived_files_stand_only_while_their_bytes_and_sources_match():
    """A run with nothing to commit keeps the series table and report only when each listed file is
    there with its listed bytes, was built from the files the manifest lists now, under this run's
    settings, and no unlisted one is there; otherwise it says why they are built again."""
    from braintumor_ray.core import files_digest
    from braintumor_ray.score._plan import DerivedFacts, derived_settings, derived_stale

    files = {"a.parquet": {"sha256": "1"}, "b.parquet": {"sha256": "2"}}
    rows = files_digest(files)
    settings = derived_settings(class_names=("glioma", "no_tumor"), series_review_threshold=0.6, output_uri="/o")
    entry = {"of": rows, "settings": settings}
    listed = {"_report.html": entry | {"sha256": "r"}, "_series/series.parquet": entry | {"sha256": "s"}}
    present = {"_report.html": "r", "_series/series.parquet": "s"}

    def why(listed=listed, present=present, rows=rows, settings=settings):
        return derived_stale(DerivedFacts(listed=listed, present=present, rows=rows), settings, report="_report.html")

    assert why() is None
    assert "gone" in why(present=present | {"_report.html": None})
    assert "sha256 differs" in why(present=present | {"_series/series.parquet": "forged"})
    assert "other committed files" in why(rows=files_digest(files | {"c.parquet": {"sha256": "3"}}))
    assert files_digest(files | {"b.parquet": {"sha256": "9"}}) != rows  # a file's bytes count, not only its name
    other = derived_settings(class_names=("glioma", "no_tumor"), series_review_threshold=0.7, output_uri="/o")
    assert other != settings and "other settings" in why(settings=other)
    assert "no report" in why(listed={}, present={"_report.html": None, "_series/series.parquet": None})
    only_report = {"_report.html": listed["_report.html"]}
    assert why(listed=only_report, present={"_report.html": "r", "_series/series.parquet": None}) is None
    assert "not listed" in why(listed=only_report)  # a table there that no commit listed


def test_the_summary_is_a_typed_frozen_object_that_reads_as_the_dict_did():
    import dataclasses

    from braintumor_ray.score import ScoringSummary, format_summary

    counts = dict(input="/in", output="/out", model_id="m", files_seen=3, skipped_already_scored=0, scored=3, errors=0,
                  not_selected=0, withdrawn=0, errors_retried=0, errors_final=0, committed_runs=0, dropped_runs=0,
                  wall_s=1.0, images_per_s=3.0, lease={"owner": "r"}, notes=["n"])
    s = ScoringSummary.of(counts)
    assert s.scored == s["scored"] == 3 and s.get("dicom") is None and s.run_id is None and s.notes == ("n",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.scored = 4  # type: ignore[misc]
    with pytest.raises(KeyError):
        s["scord"]
    with pytest.raises(TypeError):  # a count the type does not name is a bug, not a key that goes unread
        ScoringSummary.of(counts | {"scord": 1})
    assert s.to_dict()["notes"] == ["n"] and "note: n" in format_summary(s)
    assert format_summary(s) == format_summary(s.to_dict())


def test_the_engine_is_the_plans_pure_choice(package, old_package):
    """The rule that picks the engine is a pure function of the setting and model.json (the driver
    then checks and pins the files of the engine it names)."""
    from braintumor_ray.models import verify_package
    from braintumor_ray.score._plan import plan_engine

    meta, old = verify_package(package), verify_package(old_package)
    assert plan_engine("auto", meta, use_gpu=False, model="m") == ("onnxruntime", ())
    assert plan_engine("auto", meta, use_gpu=True, model="m") == ("torch", ())
    engine, notes = plan_engine("auto", old, use_gpu=False, model="m")
    assert engine == "torch" and "not covered by its model id" in notes[0]
    with pytest.raises(ConfigError, match="m: .*not covered by its model id.*--engine auto or torch"):
        plan_engine("onnxruntime", old, use_gpu=False, model="m")


def test_the_identifiers_claim_is_the_plans_pure_decision(package):
    """The plan decides, from the record's bytes and whether rows are committed (the facts), whether
    the output's names are this run's, whether its record must be written, or why the run is refused;
    the read is the facts' and the write the commit's. Refused in plan_scoring, before anything runs."""
    import json
    from datetime import datetime, timezone

    from braintumor_ray.core import Identifiers
    from braintumor_ray.models import pin_package, verify_package
    from braintumor_ray.score import ScoreConfig, plan_scoring
    from braintumor_ray.score._plan import IdentifiersFound, claim_identifiers

    full = Identifiers()
    hashed = Identifiers.from_env("hashed", "hashed", env={"BRAINTUMOR_PATH_KEY": "k" * 32})
    other_key = Identifiers.from_env("hashed", "hashed", env={"BRAINTUMOR_PATH_KEY": "z" * 32})
    record = json.dumps(full.describe() | {"manifest": 1}).encode()
    hashed_record = json.dumps(hashed.describe() | {"manifest": 1}).encode()

    def claim(ids, record=None, has_rows=False):
        return claim_identifiers(IdentifiersFound(record=record, has_rows=has_rows), ids, output="/o")

    assert claim(full) == full.describe() | {"manifest": 1}  # a new output: written
    assert claim(full, record) is None and claim(hashed, hashed_record) is None  # it stands: nothing written
    assert claim(full, has_rows=True) == full.describe() | {"manifest": 1}  # rows from before records: full names
    old = json.dumps(full.describe()).encode()  # a record from before manifests: written again with the era
    assert claim(full, old) == full.describe() | {"manifest": 1}
    with pytest.raises(ConfigError, match="path_mode=full, uid_mode=full.*--path-mode full --uid-mode full"):
        claim(hashed, has_rows=True)
    with pytest.raises(ConfigError, match="path_mode=full.*asks for path_mode=hashed"):
        claim(hashed, record)
    with pytest.raises(ConfigError, match="another key.*run with the key") as e:
        claim(other_key, hashed_record)
    assert "k" * 32 not in str(e.value) and "z" * 32 not in str(e.value)
    with pytest.raises(ConfigError, match="not readable JSON"):
        claim(full, b"{not json")

    # plan_scoring takes the decision: the record to write, or the refusal.
    meta = verify_package(package)
    cfg = ScoreConfig(model=package, input="/nonexistent/in", output="/o")
    args = dict(config=cfg, run_id="r", input_uri=cfg.input, output_uri=cfg.output, uri_prefix="",
                pin=pin_package(resolve(package), meta, with_onnx=False), engine="torch", meta=meta,
                preprocess=meta.preprocess, diff=rerun_diff({}, {}, {}, model_id=meta.model_id, selection="",
                                                             retry_errors=0),
                refused={}, explain_stage_uri="/s", explain_final_uri="/f", cluster=None,
                scored_at=datetime.now(timezone.utc))
    assert plan_scoring(**args, identifiers=full).identifiers_record == full.describe() | {"manifest": 1}
    found = IdentifiersFound(record=record)
    assert plan_scoring(**args, identifiers=full, identifiers_found=found).identifiers_record is None
    with pytest.raises(ConfigError, match="every file would be scored again under a second name"):
        plan_scoring(**args, identifiers=hashed, identifiers_found=found)


def test_an_old_maps_manifest_is_migrated_into_the_one_manifest_and_deleted(tmp_path, caplog):
    """OUTPUT_explain/_manifest.json of the layout before: its maps whose bytes match (adopted ones
    too) are listed in OUTPUT/_manifest.json's objects, a rewritten or missing one and a name that
    reaches outside are not, and the old manifest is deleted; maps of an output adopted from
    before any manifest are adopted with its rows; nothing happens once no old manifest is left."""
    import json

    from braintumor_ray.core import StagedWriter
    from braintumor_ray.score._explain import migrate_explain_manifest
    from braintumor_ray.score._layout import OBJECT_SIBLINGS

    def writer_of(out):  # scoring's writer, less its description of Parquet rows (these are not)
        return StagedWriter(resolve(str(out)), what="score", manifest=True, objects=OBJECT_SIBLINGS)

    out, maps = tmp_path / "preds", tmp_path / "preds_explain"
    writer = writer_of(out)
    run = writer.stage("run1")
    run.join("a.parquet").write_bytes(b"a")
    writer.commit(run)
    maps.mkdir()
    (tmp_path / "victim.png").write_bytes(b"theirs")
    for n in ("good.png", "adopted.png", "rewritten.png"):
        (maps / n).write_bytes(n.encode())
    old = {n: {"sha256": hashlib.sha256(n.encode()).hexdigest()} for n in ("good.png", "adopted.png", "rewritten.png",
                                                                         "gone.png")}
    old["adopted.png"]["adopted"] = True
    old["../victim.png"] = {"sha256": hashlib.sha256(b"theirs").hexdigest()}
    (maps / "rewritten.png").write_bytes(b"other")
    (maps / "_manifest.json").write_text(json.dumps({"format": 1, "files": old}))
    assert migrate_explain_manifest(writer) == 2
    objects = Manifest(resolve(str(out))).read_doc()["objects"]
    assert sorted(objects) == ["_explain/adopted.png", "_explain/good.png"]
    assert objects["_explain/good.png"]["sha256"] == hashlib.sha256(b"good.png").hexdigest()
    assert not (maps / "_manifest.json").exists() and (tmp_path / "victim.png").read_bytes() == b"theirs"
    assert "3 maps named in" in caplog.text
    assert migrate_explain_manifest(writer) == 0  # nothing left to migrate: nothing read

    # An output from before manifests: its maps adopted with its rows, as they are.
    early, early_maps = tmp_path / "early", tmp_path / "early_explain"
    early.mkdir()
    early_maps.mkdir()
    (early / "r.parquet").write_bytes(b"r")
    (early_maps / "m.png").write_bytes(b"m")
    w = writer_of(early)
    assert w.adopt() == 1 and migrate_explain_manifest(w, adopt_found=True) == 1
    assert sorted(Manifest(resolve(str(early))).read_doc()["objects"]) == ["_explain/m.png"]


def test_a_replica_stages_each_batch_once_under_its_rows_keys(tmp_path):
    """The replica writes its own rows into the run's staging folder (no Ray Data write stage):
    a batch scored again (its replica died after writing) overwrites its own file, another batch
    gets another file, and nothing but whole Parquet files is left there."""
    from braintumor_ray.score._execute import _ScoreAndStage

    class Echo:  # the model side: one output row per input row
        def __init__(self, plan):
            self.plan = plan

        def __call__(self, batch, files=None):
            return pa.table({"path": batch.column("path"), "p": [float(len(p)) for p in batch.column("path").to_pylist()]})

    staging = resolve(str(tmp_path / "stage"))
    staging.make_folder()  # by the driver, before any replica or task writes
    runner = _ScoreAndStage("plan", staging, Echo)
    a = pa.table({"path": ["a.dcm", "a.dcm", "b.jpg"], "slice_index": [0, 1, None]})
    b = pa.table({"path": ["a.dcm", "a.dcm"], "slice_index": [2, 3]})  # the same volume's other slices
    assert runner(a).column("rows").to_pylist() == [3]
    runner(a)
    runner(b)
    files = sorted(os.listdir(tmp_path / "stage"))
    assert len(files) == 2 and all(f.startswith("part-") and f.endswith(".parquet") for f in files), files
    rows = pa.concat_tables(pq.read_table(tmp_path / "stage" / f) for f in files)
    assert sorted(rows.column("path").to_pylist()) == ["a.dcm"] * 4 + ["b.jpg"]
    # A worker that outlived its run (its driver killed, the next run dropped the staging) fails
    # to write rather than bring the dropped staging back.
    staging.remove()
    with pytest.raises(StorageError, match="cannot write .*FileNotFoundError"):
        runner(b)
    assert not os.path.exists(tmp_path / "stage")
