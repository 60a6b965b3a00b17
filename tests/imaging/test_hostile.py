"""Hostile input: decompression bombs, over-limit files, and files that turn bad between listing
and reading. Each becomes an error row naming its cause; the rest of the run commits.

The bombs are the two of issue 14: a 0.3 MB ``.nii.gz`` holding an 8x8x1 header and 300 MB of
zeros, and a deflated-transfer-syntax DICOM with a 300 MB private element. They are built here
without ever holding the zeros (one compressed MiB of zeros, repeated).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from braintumor_ray import MRIPreprocess
from braintumor_ray.core import Listing, Location, resolve
from braintumor_ray.imaging import InputGuard, encode_png, read_medical
from braintumor_ray.ingest._run import preprocess_batch
from braintumor_ray.score import ScoreConfig, decode_batch, run_scoring
from braintumor_ray.score._decode import KILL_DECODE_ENV, KILLED_TWICE
from braintumor_ray.score._layout import ATTEMPTS_DIR

from conftest import KILL_DECODE_FILE, mri_like
from generators.medical import dicom_bytes, head12, nifti_bytes

import pydicom  # noqa: E402  (a core dependency: a missing one fails, never skips)
import nibabel as nib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRE = MRIPreprocess(image_size=64)
GUARD = InputGuard()
BOMB_MIB = 300
_MIB = b"\0" * 2**20


# --- the bombs ----------------------------------------------------------------------------------


def _deflate(prefix: bytes, mib_of_zeros: int, suffix: bytes = b"") -> bytes:
    """A raw deflate stream of prefix + zeros + suffix: one compressed MiB of zeros (a part
    that ends in a full flush, so it stands alone) repeated, never the zeros themselves."""

    def part(data: bytes, final: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    return part(prefix, False) + part(_MIB, False) * mib_of_zeros + part(suffix, True)


def nifti_gz_bomb(mib: int = BOMB_MIB) -> bytes:
    """A valid gzip of a NIfTI-1 header declaring 8x8x1 int16, then ``mib`` MiB of zeros."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 8, 1))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    prefix = hdr.binaryblock + b"\0" * 4
    crc = zlib.crc32(prefix)
    for _ in range(mib):
        crc = zlib.crc32(_MIB, crc)
    size = len(prefix) + mib * 2**20
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + _deflate(prefix, mib) + struct.pack("<II", crc, size & 0xFFFFFFFF)


def _explicit_le(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def dicom_deflate_bomb(mib: int = BOMB_MIB) -> bytes:
    """A deflated-transfer-syntax MR file (8x8 pixels) whose dataset holds a ``mib`` MiB private element."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    before, after = Dataset(), Dataset()
    before.SOPClassUID, before.SOPInstanceUID, before.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    after.Rows, after.Columns, after.SamplesPerPixel, after.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    after.BitsAllocated, after.BitsStored, after.HighBit, after.PixelRepresentation = 16, 12, 11, 0
    after.PixelData = b"\0" * 128
    head = io.BytesIO(b"\0" * 128 + b"DICM")
    head.seek(0, io.SEEK_END)
    write_file_meta_info(DicomFileLike(head), meta, enforce_standard=True)
    private = struct.pack("<HH2s2xI", 0x0009, 0x1010, b"OB", mib * 2**20)
    return head.getvalue() + _deflate(_explicit_le(before) + private, mib, _explicit_le(after))


def deflated(data: bytes) -> bytes:
    """The same DICOM file saved with the deflated transfer syntax (pydicom deflates it)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs():
    return {"bomb.nii.gz": nifti_gz_bomb(), "bomb.dcm": dicom_deflate_bomb()}


# --- bounded decoding, no Ray ---------------------------------------------------------------------


def test_the_bombs_are_errors_that_name_their_limit(bombs):
    nii, dcm = bombs["bomb.nii.gz"], bombs["bomb.dcm"]
    assert len(nii) < 400_000 and len(dcm) < 400_000  # 0.3 MB each on disk
    r = PRE.try_slices(nii, name="bomb.nii.gz", guard=GUARD)
    assert not r.slices and "decompression bomb" in r.error and f"{352 + 128 + 2**20:,} bytes" in r.error, r.error
    r = PRE.try_slices(dcm, name="bomb.dcm", guard=GUARD)
    assert not r.slices and "decompression bomb" in r.error and "(0009,1010)" in r.error, r.error
    assert f"{BOMB_MIB * 2**20:,} bytes" in r.error and f"{GUARD.max_file_bytes // 16:,}" in r.error
    assert "guard.max_file_bytes" in r.error


def test_the_bombs_cost_no_memory(bombs, tmp_path):
    """In a fresh process, after the decoders are loaded: the peak RSS grows by less than 100 MB
    decoding each bomb (inflating them, as before, cost +600 MB)."""
    warm = {"warm.nii.gz": nifti_bytes(np.stack([head12(1), head12(2)], axis=-1).astype(np.int16), gz=True),
            "warm.dcm": deflated(dicom_bytes(head12(1)))}
    for name, data in {**warm, **bombs}.items():
        (tmp_path / name).write_bytes(data)
    script = """
import json, resource, sys
from braintumor_ray import MRIPreprocess
from braintumor_ray.imaging import InputGuard
pre, guard = MRIPreprocess(image_size=64), InputGuard()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
folder = sys.argv[1]
for name in ("warm.nii.gz", "warm.dcm"):
    assert pre.try_slices(open(f"{folder}/{name}", "rb").read(), name=name, guard=guard).slices
out = {}
for name in ("bomb.nii.gz", "bomb.dcm"):
    data = open(f"{folder}/{name}", "rb").read()
    before = peak()
    r = pre.try_slices(data, name=name, guard=guard)
    out[name] = {"error": r.error, "growth_mb": peak() - before}
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name, r in out.items():
        assert "decompression bomb" in r["error"] and r["growth_mb"] < 100, (name, r)


def test_deflated_dicom_decodes_like_explicit():
    plain = dicom_bytes(np.stack([head12(1), head12(2)]))
    data = deflated(plain)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    a, b = read_medical(plain, "dicom"), read_medical(data, "dicom")
    assert len(a) == len(b) == 2 and all(np.array_equal(x.gray, y.gray) for x, y in zip(a, b))
    assert a[0].info == b[0].info
    cut = PRE.try_slices(data[: len(data) - 300], guard=GUARD)
    assert not cut.slices and "deflate stream ends early" in cut.error


def test_declared_size_over_the_limits_is_refused_before_decoding():
    # A header that declares 4096 x 4096 x 100 frames over 8 KB of pixels: refused on the header.
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(head12(1))))
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 100
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = PRE.try_slices(buf.getvalue(), guard=GUARD)
    assert not r.slices and "100 frame(s) of 4096x4096" in r.error and "guard.max_pixels=134,217,728" in r.error
    assert r.info.sop_instance_uid  # the UIDs read before it failed are kept
    # A NIfTI header declaring 1024^3 voxels, with no data at all: refused before any inflating.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    r = PRE.try_slices(gzip.compress(hdr.binaryblock + b"\0" * 4), name="big.nii.gz", guard=GUARD)
    assert "1024x1024x1024 volume" in r.error and "guard.max_pixels" in r.error
    # A small .nii.gz of a float64 volume within max_pixels whose bytes are over max_file_bytes.
    small = InputGuard(max_file_bytes=20_000)
    r = PRE.try_slices(nifti_bytes(np.ones((40, 40, 2), np.float64), gz=True), name="v.nii.gz", guard=small)
    assert "40x40x2 float64 volume takes 25,952 bytes" in r.error and "guard.max_file_bytes=20,000" in r.error
    # An image whose decoded pixels (RGBA: 4 bytes each) are over max_file_bytes, from a tiny file.
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGBA", (100, 100)).save(png, format="PNG")
    assert len(png.getvalue()) < 1000
    r = PRE.try_slices(png.getvalue(), guard=InputGuard(max_file_bytes=10_000))
    assert "100x100 RGBA image decodes to 40,000 bytes" in r.error and "guard.max_file_bytes" in r.error


def test_file_over_max_file_bytes_and_gzip_limits():
    jpeg = encode_png(mri_like(1, seed=3, size=160)[0])
    assert PRE.try_slices(jpeg, guard=GUARD).slices
    r = PRE.try_slices(jpeg, guard=InputGuard(max_file_bytes=len(jpeg) - 1))
    assert f"the file holds {len(jpeg):,} bytes" in r.error and f"guard.max_file_bytes={len(jpeg) - 1:,}" in r.error
    # Truncated gzip: an error naming it, for a volume and for any gzip-wrapped file.
    gz = nifti_bytes(np.random.default_rng(0).integers(0, 4096, (32, 32, 8)).astype(np.int16), gz=True)
    assert "truncated NIfTI: the gzip stream ends early" in PRE.try_slices(gz[: len(gz) // 2], name="v.nii.gz").error
    dcm_gz = gzip.compress(dicom_bytes(head12(1)))
    assert PRE.try_slices(dcm_gz, name="x.dcm.gz", guard=GUARD).slices  # a gzipped DICOM is read
    assert "truncated gzip" in PRE.try_slices(dcm_gz[:-40], name="x.dcm.gz").error
    # A gzip-wrapped file inflates within max_file_bytes, and no further.
    bomb = gzip.compress(b"\0" * 200_000)
    r = PRE.try_slices(bomb, name="x.gz", guard=InputGuard(max_file_bytes=100_000))
    assert "decompression bomb" in r.error and "guard.max_file_bytes=100,000" in r.error


def test_listing_refuses_links_and_special_files(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"a")
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside, root / "dirlink")  # listed as a 4 KB file before
    os.symlink(root / "nothing.png", root / "dangling.png")
    os.symlink(outside / "secret.png", root / "outside.png")
    os.symlink(root / "sub" / "a.png", root / "inside.png")
    os.mkfifo(root / "pipe.png")
    listed = resolve(str(root)).listing()
    names = {os.path.relpath(p, root): listed.refused.get(p) for p in listed.files}
    assert set(names) == {"sub/a.png", "dangling.png", "outside.png", "inside.png", "pipe.png"}
    assert names["sub/a.png"] is None and names["inside.png"] is None
    assert "dangling link" in names["dangling.png"] and "FIFO" in names["pipe.png"]
    assert "refused: links outside --input" in names["outside.png"]
    assert listed.files[str(root / "inside.png")][0] == 1  # the target's size
    followed = resolve(str(root)).listing(follow_links_outside=True)
    assert str(root / "outside.png") not in followed.refused and followed.files[str(root / "outside.png")][0] == 6
    assert set(resolve(str(root)).files_with_versions()) == {str(root / "sub" / "a.png"), str(root / "inside.png")}


LATIN1 = b"M\xfcller.png"  # a Latin-1 name, as an SMB or NFS share gives it: not UTF-8
LATIN1_SHOWN = "M\\xfcller.png"


def test_a_name_that_is_not_utf8_is_refused_under_its_escaped_name(tmp_path, s3_endpoint, s3_bucket):
    """Issue 35: the listing refuses a name that is not UTF-8 (on disk) or holds control characters
    (an S3 key that the listing's XML cannot carry back), under the name with those bytes escaped,
    the same on every listing; the other files are listed as before."""
    import boto3

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"a")
    with open(os.path.join(os.fsencode(tmp_path), LATIN1), "wb") as f:
        f.write(b"latin")
    (tmp_path / "M\u00fcller-utf8.png").write_bytes(b"utf8")  # a proper UTF-8 umlaut is a name like any other
    for _ in range(2):  # stable: the same escaped name on every run
        listed = resolve(str(tmp_path)).listing()
        shown = str(tmp_path / LATIN1_SHOWN)
        assert set(listed.files) == {str(tmp_path / "sub" / "a.png"), shown, str(tmp_path / "M\u00fcller-utf8.png")}
        assert listed.files[shown][0] == 5 and "not valid UTF-8" in listed.refused[shown] and "rename" in listed.refused[shown]
        assert set(listed.refused) == {shown}
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in ("arc/ok.png", "arc/cr\r.png", "arc/bell\x07.png"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    listed = resolve(f"s3://{s3_bucket}/arc", s3_endpoint_url=s3_endpoint).listing()
    base = f"{s3_bucket}/arc/"
    assert set(listed.files) == {base + "ok.png", base + "cr\\x0d.png", base + "bell\\x07.png"}
    assert set(listed.refused) == {base + "cr\\x0d.png", base + "bell\\x07.png"}


def test_ingest_workers_read_files_themselves(tmp_path):
    """A file gone or turned into a folder since the listing is an error row of the ingest."""
    good = tmp_path / "glioma" / "a.png"
    good.parent.mkdir()
    good.write_bytes(encode_png(mri_like(1, seed=1)[0]))
    (tmp_path / "glioma" / "now_a_folder.png").mkdir()
    batch = pa.table({"path": [str(good), str(tmp_path / "glioma" / "gone.png"), str(tmp_path / "glioma" / "now_a_folder.png")]})
    rows = preprocess_batch(batch, preprocess=PRE, guard=GUARD, source=resolve(str(tmp_path))).to_pylist()
    assert [r["outcome"] for r in rows] == ["ok", "error", "error"]
    assert rows[1]["error"].startswith("vanished") and "no longer a file" in rows[2]["error"]


def test_a_file_that_kills_its_decode_task_twice_becomes_an_error_row(tmp_path, monkeypatch):
    """Ray's retries, played out in-process: os._exit (what the OOM killer does) is a raise here."""
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["a.png", "killer.png", "b.png", "c.png", "lone.png"]):
        (src / name).write_bytes(encode_png(mri_like(1, seed=i)[0]))
    source, attempts = resolve(str(src)), resolve(str(tmp_path / "out._staging")).join(ATTEMPTS_DIR)
    listed = source.listing().files

    def batch(*names):
        paths = [str(src / n) for n in names]
        return pa.table({"path": paths, "size": [listed[p][0] for p in paths], "version": [listed[p][1] for p in paths]})

    class Killed(BaseException):
        pass

    def exit_(code):
        raise Killed(code)

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setenv(KILL_DECODE_ENV, "killer.png")

    def run(b):
        deaths = 0
        while True:
            try:
                return deaths, decode_batch(b, preprocess=PRE, guard=GUARD, source=source, attempts=attempts).to_pylist()
            except Killed:
                deaths += 1
                assert deaths < 10, "retried without end"

    # Killed under the batch's marker, then twice decoding it alone; the 4th attempt gives up on it.
    deaths, rows = run(batch("a.png", "killer.png", "b.png"))
    assert deaths == 3
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert by_name["killer.png"]["status"] == "error" and by_name["killer.png"]["error"] == KILLED_TWICE
    assert by_name["a.png"]["status"] == by_name["b.png"]["status"] == "ok"
    # The whole job died before committing; the rerun's blocks differ: the file's own markers remain.
    deaths, rows = run(batch("killer.png", "c.png"))
    assert deaths == 0 and [r["status"] for r in rows] == ["error", "ok"] and rows[0]["error"] == KILLED_TWICE
    assert len([n for n in os.listdir(attempts.path) if n.startswith("f-")]) == 2  # only the killer's markers
    # A batch of one file is that file's attempt: two deaths.
    monkeypatch.setenv(KILL_DECODE_ENV, "lone.png")
    deaths, rows = run(batch("lone.png"))
    assert deaths == 2 and rows[0]["error"] == KILLED_TWICE
    # Without the fault, a batch leaves no marker of its own (the killed ones stay until the commit).
    monkeypatch.delenv(KILL_DECODE_ENV)
    left = set(os.listdir(attempts.path))
    deaths, rows = run(batch("a.png", "c.png"))
    assert deaths == 0 and [r["status"] for r in rows] == ["ok", "ok"] and set(os.listdir(attempts.path)) == left


# --- scoring with Ray: local disk and S3 ----------------------------------------------------------


def _rows(out: str, filesystem=None) -> dict[str, dict]:
    rows = pads.dataset(out, format="parquet", filesystem=filesystem).to_table(columns=["path", "status", "error"]).to_pylist()
    by = {}
    for r in rows:
        assert r["path"] not in by, f"two rows for {r['path']}"
        by[r["path"]] = r
    return by


def _after_listing(monkeypatch, root: str, hook) -> None:
    """Run ``hook(listing) -> listing`` on the listing of ``root``, after it is made and before
    any file is read: files vanish or change between the two, as they do in a live archive."""
    listing = Location.listing

    def wrapped(self, **kw):
        out = listing(self, **kw)
        return hook(out) if self.path.rstrip("/") == root.rstrip("/") else out

    monkeypatch.setattr(Location, "listing", wrapped)


def test_scoring_isolates_every_hostile_file(ray_session, package, tmp_path, monkeypatch, bombs):
    arc, outside = tmp_path / "archive", tmp_path / "outside"
    (arc / "series").mkdir(parents=True)
    outside.mkdir()
    images = mri_like(9, seed=7)
    good = [arc / "series" / f"scan{i}.png" for i in range(4)]
    named = {n: arc / n for n in (KILL_DECODE_FILE, "vanish.png", "to_dir.png", "oversize.png", "swapped.png")}
    for path, px in zip(good + list(named.values()), images):
        path.write_bytes(encode_png(px))
    (outside / "secret.png").write_bytes(encode_png(images[0]))
    (arc / "bomb.nii.gz").write_bytes(bombs["bomb.nii.gz"])
    with open(os.path.join(os.fsencode(arc), LATIN1), "wb") as f:  # issue 35: failed the whole run (UnicodeEncodeError)
        f.write(encode_png(images[0]))
    os.mkfifo(arc / "pipe.png")
    os.symlink(outside, arc / "dirlink")
    os.symlink(arc / "nothing.png", arc / "dangling.png")
    os.symlink(outside / "secret.png", arc / "outside.png")
    too_deep = arc.joinpath(*["d"] * 4)  # issue 26: below max_folder_depth=3, one error row naming the folder
    too_deep.mkdir(parents=True)
    (too_deep / "deep.png").write_bytes(encode_png(images[0]))

    def hook(listed: Listing) -> Listing:
        os.remove(named["vanish.png"])
        os.remove(named["to_dir.png"])
        os.mkdir(named["to_dir.png"])
        os.remove(named["swapped.png"])
        os.symlink(outside / "secret.png", named["swapped.png"])  # issue 26: a link to outside, after the listing
        files = dict(listed.files)
        files[str(named["oversize.png"])] = (10**12, files[str(named["oversize.png"])][1])  # not read: by its size
        return Listing(files, listed.refused)

    _after_listing(monkeypatch, str(arc), hook)
    out = str(tmp_path / "predictions")
    summary = run_scoring(ScoreConfig(model=package, input=str(arc), output=out, batch_size=8, max_folder_depth=3))

    rows = _rows(out)
    expect = {
        KILL_DECODE_FILE: KILLED_TWICE,
        "vanish.png": "vanished: listed, then gone before it was read",
        "to_dir.png": "unreadable: no longer a file",
        "oversize.png": "guard.max_file_bytes",
        "swapped.png": "changed since it was listed",
        "pipe.png": "not a regular file (a FIFO)",
        "dangling.png": "dangling link",
        "outside.png": "refused: links outside --input",
        "bomb.nii.gz": "decompression bomb",
        "d/d/d/d": "deeper than max_folder_depth=3",
        LATIN1_SHOWN: "not valid UTF-8",
    }
    assert set(rows) == {str(p) for p in good} | {str(arc / n) for n in expect}  # no row for the directory link
    for p in good:
        assert rows[str(p)]["status"] == "ok", rows[str(p)]
    for name, cause in expect.items():
        r = rows[str(arc / name)]
        assert r["status"] == "error" and cause in r["error"], (name, r)
    # The run committed: its summary, no staging left, the attempt markers gone with it.
    assert summary["scored"] == 4 and summary["errors"] == len(expect) and summary.get("run_id")
    assert not os.path.exists(out + "._staging") or not os.listdir(out + "._staging")


def test_scoring_on_s3_isolates_a_vanished_object_and_a_bomb(ray_session, package, s3_endpoint, s3_bucket, monkeypatch, bombs):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for i, px in enumerate(mri_like(2, seed=9)):
        client.put_object(Bucket=s3_bucket, Key=f"arc/scan{i}.png", Body=encode_png(px))
    client.put_object(Bucket=s3_bucket, Key="arc/vanish.png", Body=encode_png(mri_like(1, seed=11)[0]))
    client.put_object(Bucket=s3_bucket, Key="arc/bomb.nii.gz", Body=bombs["bomb.nii.gz"])
    client.put_object(Bucket=s3_bucket, Key="arc/cr\r.png", Body=encode_png(mri_like(1, seed=12)[0]))  # issue 35

    def hook(listed: Listing) -> Listing:
        client.delete_object(Bucket=s3_bucket, Key="arc/vanish.png")
        return listed

    _after_listing(monkeypatch, f"{s3_bucket}/arc", hook)
    out = f"s3://{s3_bucket}/preds"
    run_scoring(ScoreConfig(model=package, input=f"s3://{s3_bucket}/arc", output=out, batch_size=8,
                            s3_endpoint_url=s3_endpoint))
    fs = resolve(out, s3_endpoint_url=s3_endpoint).pyarrow_fs
    rows = _rows(f"{s3_bucket}/preds", filesystem=fs)
    base = f"s3://{s3_bucket}/arc/"
    assert set(rows) == {base + n for n in ("scan0.png", "scan1.png", "vanish.png", "bomb.nii.gz", "cr\\x0d.png")}
    assert rows[base + "cr\\x0d.png"]["status"] == "error" and "control characters" in rows[base + "cr\\x0d.png"]["error"]
    assert rows[base + "scan0.png"]["status"] == rows[base + "scan1.png"]["status"] == "ok"
    assert rows[base + "vanish.png"]["status"] == "error" and rows[base + "vanish.png"]["error"].startswith("vanished")
    assert rows[base + "bomb.nii.gz"]["status"] == "error" and "decompression bomb" in rows[base + "bomb.nii.gz"]["error"]
