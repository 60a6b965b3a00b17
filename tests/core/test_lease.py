"""The lease on a scoring output (issue 14, item 3): one run at a time, on local disk and on S3 (moto).

Short TTLs (1-2 s) keep these fast; nothing here starts Ray (a refused run stops before any Ray work).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from braintumor_ray.core import (
    DONE_MARKER,
    STAGING_SUFFIX,
    Lease,
    LeaseError,
    LeaseHeldError,
    LeaseLostError,
    StagedWriter,
    current_lease,
    lease_location,
    resolve,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output folder that does not exist yet: local, or s3:// on the moto server."""
    if request.param == "local":
        return resolve(str(tmp_path / "preds"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return resolve(f"s3://{bucket}/preds", s3_endpoint_url=endpoint)


def _dead_lease(output, owner: str, *, expires_in: float = -5.0) -> None:
    """The lease a killed run left behind (written directly, as that run's last heartbeat did)."""
    now = datetime.now(timezone.utc)
    rec = {"owner": owner, "host": "node-gone", "pid": 4242, "started": (now - timedelta(minutes=10)).isoformat(),
           "heartbeat": (now + timedelta(seconds=expires_in - 120.0)).isoformat(),  # expires = heartbeat + ttl_s
           "expires": (now + timedelta(seconds=expires_in)).isoformat(), "ttl_s": 120.0}
    lease_location(output).write_bytes(json.dumps(rec).encode())


def _stage(output, run: str, *, done: bool = False):
    """A staging folder with one file in it, as a run writing its rows has."""
    loc = StagedWriter(output).stage(run)
    loc.join("part-0.parquet").write_bytes(b"rows of " + run.encode())
    if done:
        loc.join(DONE_MARKER).write_bytes(b"")
    return loc


def test_second_acquire_is_refused_naming_the_holder(output):
    with Lease(output, owner="run-a", ttl_s=30, what="score") as a:
        rec = current_lease(output)
        assert rec["owner"] == "run-a" and rec["pid"] == os.getpid() and rec["live"]
        assert {"host", "started", "heartbeat", "expires"} <= set(rec)
        # Beside the output, never inside it (its files are read as one Parquet dataset).
        assert lease_location(output).uri == output.uri + "._lease.json" and not output.exists()
        with pytest.raises(LeaseError) as e:
            Lease(output, owner="run-b", ttl_s=30, what="score").acquire()
        msg = str(e.value)
        for part in ("run-a", rec["host"], str(os.getpid()), rec["started"], "last heartbeat", "--wait",
                     rec["expires"]):
            assert part in msg
        # The holder as fields, for callers that handle the case (no message matching).
        held = e.value
        assert isinstance(held, LeaseHeldError) and held.output == output.uri and held.waited_s == 0
        assert (held.holder, held.host, held.pid, held.expires) == ("run-a", rec["host"], os.getpid(), rec["expires"])
        assert a.held() and current_lease(output)["owner"] == "run-a"  # the refused run changed nothing
    assert current_lease(output) is None  # released on leaving the block
    with Lease(output, owner="run-b", ttl_s=30) as b:  # and free for the next run
        assert b.held() and current_lease(output)["owner"] == "run-b"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_spelling_of_one_output_meets_the_same_lease(where, tmp_path, request):
    """Issue 35: the lease was named after the output as typed: a symlinked spelling of the same
    folder (or s3a://, a doubled or trailing slash) got a second lease, and both runs wrote. Now
    every spelling meets the one lease, beside the output's real path (bucket and key on S3)."""
    if where == "local":
        real = tmp_path / "real"
        real.mkdir()
        os.symlink(real, tmp_path / "alias")
        first = resolve(str(real / "preds"))
        others = [resolve(str(tmp_path / "alias" / "preds")), resolve(f"file://{tmp_path}/alias/./preds/")]
    else:
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        first = resolve(f"s3://{bucket}/runs/preds", s3_endpoint_url=endpoint)
        others = [resolve(f"s3a://{bucket}/runs//preds/", s3_endpoint_url=endpoint),
                  resolve(f"s3://{bucket}//runs/preds", s3_endpoint_url=endpoint)]
    with Lease(first, owner="run-a", ttl_s=30, what="score"):
        for other in others:
            assert lease_location(other).uri == lease_location(first).uri == first.uri + "._lease.json"
            with pytest.raises(LeaseError, match="run-a"):
                Lease(other, owner="run-b", ttl_s=30, what="score").acquire()
            assert current_lease(other)["owner"] == "run-a"
    with Lease(others[0], owner="run-c", ttl_s=30) as c:  # released: free for any spelling
        assert c.held() and current_lease(first)["owner"] == "run-c"


def test_heartbeat_renews_expires(output):
    # A 2 s TTL (1 s failed once on a loaded machine: a renewal, due every third of it, came late).
    with Lease(output, owner="run-a", ttl_s=2.0) as a:
        first = current_lease(output)
        time.sleep(3.0)  # longer than the TTL: only renewals keep it live
        later = current_lease(output)
        assert later["live"] and a.held()
        assert later["expires"] > first["expires"] and later["heartbeat"] > first["heartbeat"]
        assert later["started"] == first["started"]
        with pytest.raises(LeaseError, match="run-a"):
            Lease(output, owner="run-b", ttl_s=2.0).acquire()


def test_stale_lease_is_taken_over_with_a_warning(output, caplog):
    _dead_lease(output, "run-killed")
    with caplog.at_level(logging.WARNING, logger="braintumor_ray"):
        with Lease(output, owner="run-new", ttl_s=30) as b:
            assert b.held() and b.took_over["owner"] == "run-killed"
            assert current_lease(output)["owner"] == "run-new"
            assert b.describe()["took_over_from"] == "run-killed"
    assert any("run-killed" in r.getMessage() and "node-gone" in r.getMessage() for r in caplog.records)


def test_two_takeovers_of_one_stale_lease_exactly_one_wins(output):
    """Both runs read the stale lease before either writes (forced), then both try to take it."""
    _dead_lease(output, "run-killed")
    leases = [Lease(output, owner=f"taker-{i}", ttl_s=30) for i in range(2)]
    both_read = threading.Barrier(2, timeout=20)
    for lease in leases:
        real, first = lease._store.read, [True]

        def read(real=real, first=first):
            cur = real()
            if first[0]:
                first[0] = False
                both_read.wait()  # each holds the stale version now
            return cur

        lease._store.read = read
    won, refused = [], []

    def take(lease):
        try:
            lease.acquire()
            won.append(lease)
        except LeaseError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(won) == 1 and len(refused) == 1
        assert won[0].took_over["owner"] == "run-killed"
        assert current_lease(output)["owner"] == won[0].owner and won[0].owner in refused[0]
    finally:
        for lease in won:
            lease.release()


def test_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(output, request):
    """Another process on this machine holds the lease (TTL 10 min): refused while it lives; once
    it is SIGKILLed (no release), the next run takes over at once instead of waiting out the TTL."""
    endpoint = request.getfixturevalue("s3_endpoint") if output.is_s3 else None
    code = ("import sys; from braintumor_ray.core import Lease, resolve; "
            f"Lease(resolve({output.uri!r}, s3_endpoint_url={endpoint!r}), owner='run-killed', ttl_s=600).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseError, match="run-killed"):
            Lease(output, owner="run-b", ttl_s=30).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert current_lease(output)["owner"] == "run-killed"  # still there, 10 min from expiry
    t0 = time.monotonic()
    with Lease(output, owner="run-b", ttl_s=30) as b:
        assert b.took_over["owner"] == "run-killed" and time.monotonic() - t0 < 5


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_released_on_exception_and_ctrl_c(output, exc):
    with pytest.raises(exc):
        with Lease(output, owner="run-a", ttl_s=30):
            raise exc()
    assert current_lease(output) is None
    Lease(output, owner="run-b", ttl_s=30).acquire().release()


def test_wait_acquires_once_the_holder_releases(output):
    a = Lease(output, owner="run-a", ttl_s=30).acquire()
    threading.Timer(0.6, a.release).start()
    with Lease(output, owner="run-b", ttl_s=30, wait_s=20, poll_s=0.05) as b:
        assert b.held() and 0.5 <= b.waited_s < 10
        # A bounded wait: the next run gives up after its wait_s, naming the holder.
        t0 = time.monotonic()
        with pytest.raises(LeaseHeldError, match=r"after waiting .*run-b") as e:
            Lease(output, owner="run-c", ttl_s=30, wait_s=0.4, poll_s=0.05).acquire()
        assert e.value.holder == "run-b" and e.value.waited_s >= 0.4
        assert time.monotonic() - t0 >= 0.4


def test_wait_acquires_once_a_dead_holders_lease_expires(output):
    # 3 s: the refusal below must come before the lease expires, and one S3 call to moto took
    # over 0.7 s (the old figure) with the machine loaded.
    _dead_lease(output, "run-killed", expires_in=3.0)
    with pytest.raises(LeaseError, match="run-killed"):  # still live: refused without wait
        Lease(output, owner="run-b", ttl_s=30).acquire()
    with Lease(output, owner="run-b", ttl_s=30, wait_s=20, poll_s=0.05) as b:
        assert b.took_over["owner"] == "run-killed" and b.waited_s >= 0.3


def test_lost_lease_is_detected_and_blocks_the_commit(output, caplog):
    # A TTL of 3 s, not 1: at load 15 on 2 cores a 1 s lease sometimes missed its own renewal
    # before it saw the other owner, and the test then read the wrong cause.
    a = Lease(output, owner="run-a", ttl_s=3.0).acquire()
    staged = _stage(output, "run-a")
    # Another run took the lease (e.g. this one stalled past its TTL elsewhere).
    _dead_lease(output, "run-other", expires_in=60)
    with caplog.at_level(logging.ERROR, logger="braintumor_ray"):
        deadline = time.monotonic() + 10
        while a.held() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not a.held()
    with pytest.raises(LeaseError, match="run-other"):
        a.check()
    with pytest.raises(LeaseLostError, match="no longer holds the lease") as e:
        StagedWriter(output, lease=a).commit(staged)
    assert (e.value.owner, e.value.output) == ("run-a", output.uri) and "run-other" in e.value.reason
    assert not staged.join(DONE_MARKER).exists() and not output.exists()  # nothing committed
    assert any("run-other" in r.getMessage() for r in caplog.records)
    a.release()
    assert current_lease(output)["owner"] == "run-other"  # the new holder's lease is left alone


def test_recover_leaves_a_live_lease_holders_staging(output):
    live = "20260101T000000-live0000"
    with Lease(output, owner=live, ttl_s=30):
        keep = _stage(output, live)
        other = _stage(output, "20250101T000000-dead0000")  # no lease or commit record names it: not recovery's
        assert StagedWriter(output).recover() == {"committed_runs": 0, "dropped_runs": 0}
        assert keep.join("part-0.parquet").exists() and other.join("part-0.parquet").exists()


def _score_job():
    from conftest import load_job

    return load_job("score")


@pytest.fixture(scope="module")
def torch_package(tmp_path_factory):
    """A small real model package without model.onnx (0.3 s against ~6 s with the ONNX export):
    without the lease, a second run would get past it to recover()."""
    import torch

    from braintumor_ray import MRIPreprocess, create_model, export_model_package

    torch.manual_seed(0)
    uri = str(tmp_path_factory.mktemp("pkg") / "model")
    export_model_package(create_model("resnet10t", pretrained=False, drop_rate=0.0), uri,
                         preprocess=MRIPreprocess(image_size=64), onnx=False)
    return uri


def test_second_scoring_run_refuses_and_keeps_the_live_runs_staging(output, torch_package, tmp_path, capsys, request):
    """A run is writing (its lease, its staging with rows in it); a second run_scoring on that
    output must refuse, naming it, and leave the staging as it was (before the lease, the second
    run's recover() deleted it)."""
    from PIL import Image

    from braintumor_ray.score import ScoreConfig, run_scoring
    from conftest import mri_like, upload_tree

    package = torch_package
    archive = tmp_path / "archive"
    archive.mkdir()
    Image.fromarray(mri_like(1, seed=0)[0]).save(archive / "a.png")
    src, endpoint = str(archive), None
    if output.is_s3:
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), output.path.split("/", 1)[0]
        upload_tree(str(archive), endpoint, bucket, "archive")
        src = f"s3://{bucket}/archive"
    live = "20260101T000000-live0000"
    with Lease(output, owner=live, ttl_s=30, what="score"):
        staged = _stage(output, live)
        before = sorted(staged.files())
        with pytest.raises(LeaseError) as e:
            run_scoring(ScoreConfig(model=package, input=src, output=output.uri, s3_endpoint_url=endpoint,
                                    engine="torch"))
        assert live in str(e.value) and "--wait" in str(e.value)
        assert sorted(staged.files()) == before
        if not output.is_s3:  # the command line: one error line naming the holder, exit code 2
            rc = _score_job().main(["--model", package, "--input", src, "--output", output.uri, "--engine", "torch"])
            err = capsys.readouterr().err
            assert rc == 2 and err.startswith("error: ") and live in err
            assert sorted(staged.files()) == before
        assert not output.exists()  # nothing committed, no _config.yaml written
        assert staged.uri.startswith(output.uri + STAGING_SUFFIX + "/")


def test_wait_and_lease_ttl_settings():
    from braintumor_ray.cli import build_config
    from braintumor_ray.core import ConfigError
    from braintumor_ray.score import ScoreConfig

    args = _score_job().get_args_parser().parse_args(
        ["--model", "m", "--input", "in", "--output", "out", "--wait", "600", "--lease-ttl-s", "30"])
    assert (build_config(ScoreConfig, args).wait, build_config(ScoreConfig, args).lease_ttl_s) == (600.0, 30.0)
    default = ScoreConfig(model="m", input="in", output="out")
    assert (default.wait, default.lease_ttl_s) == (0.0, 120.0)  # refuse at once; a killed run's lease lasts 2 min
    for bad in ({"wait": -1}, {"lease_ttl_s": 0}):
        with pytest.raises(ConfigError):
            ScoreConfig(model="m", input="in", output="out", **bad)


# --- hand-edited records (issue 26): no time zone, a far future, garbage ---------------------------

def _edited_lease(output, **fields) -> None:
    now = datetime.now(timezone.utc)
    rec = {"owner": "run-edited", "host": "node-gone", "pid": 4242, "started": (now - timedelta(minutes=10)).isoformat(),
           "heartbeat": (now - timedelta(seconds=10)).isoformat(), "expires": (now + timedelta(seconds=110)).isoformat(),
           "ttl_s": 120.0} | fields
    lease_location(output).write_bytes(json.dumps(rec).encode())


def test_a_lease_without_a_time_zone_is_read_as_utc(tmp_path):
    output = resolve(str(tmp_path / "preds"))
    utc = datetime.now(timezone.utc).replace(tzinfo=None)  # naive, as a hand edit writes it
    _edited_lease(output, heartbeat=(utc - timedelta(seconds=10)).isoformat(), expires=(utc + timedelta(seconds=110)).isoformat())
    assert current_lease(output)["live"]  # was: TypeError, naive and aware datetimes compared
    with pytest.raises(LeaseError, match="being written by another"):
        Lease(output, owner="run-b", ttl_s=30).acquire()
    _edited_lease(output, heartbeat=(utc - timedelta(seconds=200)).isoformat(), expires=(utc - timedelta(seconds=80)).isoformat())
    assert not current_lease(output)["live"]
    with Lease(output, owner="run-b", ttl_s=30) as lease:
        assert lease.took_over["owner"] == "run-edited"


def test_a_far_future_expires_is_capped_by_the_ttl_from_the_heartbeat(tmp_path):
    output = resolve(str(tmp_path / "preds"))
    now = datetime.now(timezone.utc)
    # Last renewed 3 minutes ago with a 120 s ttl, yet "expires" in 2099: stale since a minute.
    _edited_lease(output, heartbeat=(now - timedelta(minutes=3)).isoformat(), expires="2099-01-01T00:00:00+00:00")
    assert not current_lease(output)["live"]
    with Lease(output, owner="run-b", ttl_s=30) as lease:
        assert lease.took_over["owner"] == "run-edited"
    # A heartbeat in the far future too: no live holder's clock is that far ahead.
    _edited_lease(output, heartbeat="2099-01-01T00:00:00+00:00", expires="2099-01-01T00:02:00+00:00")
    assert not current_lease(output)["live"]
    # A ttl_s beyond what any run may set is held to the longest (a day), not believed.
    _edited_lease(output, heartbeat=(now - timedelta(days=2)).isoformat(), expires="2099-01-01T00:00:00+00:00",
                  ttl_s=1e12)
    assert not current_lease(output)["live"]
    # A live record as runs write it stays live.
    _edited_lease(output)
    assert current_lease(output)["live"]


@pytest.mark.parametrize("fields", [{"expires": "soon"}, {"expires": 12}, {"heartbeat": None}, {"heartbeat": "x"}])
def test_a_garbage_lease_is_the_one_line_error(tmp_path, fields):
    output = resolve(str(tmp_path / "preds"))
    _edited_lease(output, **fields)
    for attempt in (lambda: current_lease(output), lambda: Lease(output, owner="run-b", ttl_s=30).acquire()):
        with pytest.raises(LeaseError) as e:
            attempt()
        assert "is not a lease record" in str(e.value) and "\n" not in str(e.value)
    lease_location(output).write_bytes(b"[1, 2]")
    with pytest.raises(LeaseError, match="is not a lease record"):
        current_lease(output)
