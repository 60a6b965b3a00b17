"""Soak: score an archive with ~5% hostile files while the job is killed at random points.

    .venv/bin/python benchmarks/soak.py [--files 2000] [--hostile 0.05] [--kills 3] [--seed 0]
        [--work /tmp/soak] [--lease-ttl-s 8]

What it does, in order:

1. Writes an archive of ``--files`` files: generated MRI-like JPEGs (256 px) and, as ~``--hostile``
   of them, hostile ones: gzip bombs (a 0.3 MB ``.nii.gz`` holding an 8x8x1 header and 300 MB of
   zeros), deflated-DICOM bombs (a 300 MB private element), truncated JPEGs, dangling links,
   directory links, links to a file outside the archive, folder chains 100 deep (past
   ``max_folder_depth``), plus files that vanish, turn into a directory or are swapped for a link
   to a file outside the archive after the last run listed them; and compressed-frame bombs (JPEG,
   JPEG lossless, JPEG-LS, JPEG 2000 frame headers declaring 30000 x 30000 in a 64 x 64 DICOM, a
   64-fold RLE frame) and a GIF of 100,000 frames (``frame_and_page_bombs``); issue 35's: a file
   name that is not UTF-8, progressive JPEGs of 8000 scans (plain and as a DICOM frame) and a
   flat PNG just under ``guard.max_pixels`` (``round_three_bombs``).
2. Runs ``jobs/score.py`` (its own local Ray, as cron would) and SIGKILLs the whole process tree at
   ``--kills`` random points (uniform in ``--kill-window`` seconds after the run's scoring
   started); each next run waits out the dead run's lease (``--wait``) and finishes or redoes
   what it left. While one run is live a second run is started once: it must be refused. The
   files that vanish or turn into folders are written only before the last run, which lists
   them and then loses them.
3. Checks the output: one row per file listed by the completing run, no duplicate rows, every good
   file ``ok``, every hostile file an ``error`` row; and reports the peak RSS (``VmHWM``) of the Ray
   worker processes that ran the decode stage.
4. Scores two more archives on their own: one small JPEG (a decode worker's own footprint) and
   the largest volume the default limits let through (a 512 x 512 x 511 int16 ``.nii.gz``), and
   reports the peak RSS of their decode workers: the bound on a decode task's memory.

The model is a small randomly initialised ResNet (64 px): what is soaked is the job, not the model.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.dataset as pads
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BOMB_BYTES = 300 * 1024 * 1024


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def nifti_bomb() -> bytes:
    """A NIfTI-1 header declaring 8x8x1 int16, followed by 300 MB of zeros, gzip-compressed."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 8, 8, 1, 1, 1, 1, 1)
    struct.pack_into("<h", hdr, 70, 4)  # int16
    struct.pack_into("<h", hdr, 72, 16)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    hdr[344:348] = b"n+1\0"
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as z:
        z.write(bytes(hdr) + b"\0" * 4)
        chunk = b"\0" * (1 << 20)
        for _ in range(BOMB_BYTES >> 20):
            z.write(chunk)
    return out.getvalue()


def dicom_bomb() -> bytes:
    """A deflated-transfer-syntax MR DICOM whose dataset carries a 300 MB private element."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "MR", 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 128
    # Built once (300 MB held for a moment here); pydicom deflates the body on writing.
    ds.add_new(0x00091010, "OB", b"\0" * BOMB_BYTES)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def frame_and_page_bombs() -> dict[str, tuple[bytes, str]]:
    """Issue 26's decode cases, {kind: (bytes, suffix)}: a DICOM of 64 x 64 whose one compressed
    frame's header declares 30000 x 30000 (JPEG, JPEG lossless, JPEG-LS, J2K), an RLE frame that
    expands 64-fold, and a 1.7 MB GIF of 100,000 1x1 frames (over guard.max_slices)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests.generators.hostile_frames import frame_bombs, many_page_gif

    out = {name.removesuffix(".dcm"): (data, ".dcm") for name, data in frame_bombs().items()}
    return {**out, "gif_page_bomb": (many_page_gif(), ".gif")}


def round_three_bombs() -> dict[str, tuple[bytes, str]]:
    """Issue 35's decode cases: a plain progressive JPEG of 8000 scans of 8000 x 8000 (its DICOM
    twin comes with frame_bombs) and a flat PNG of 121 M pixels, just under guard.max_pixels (the
    contrast check's float64 copy cost +1.2 GB: an error row "no content", now a few bytes a pixel)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests.generators.hostile_frames import progressive_jpeg

    buf = io.BytesIO()
    Image.new("L", (11000, 11000), 0).save(buf, format="PNG")
    return {"progressive_jpeg_plain_bomb": (progressive_jpeg(8000, 8000), ".jpg"), "flat_png": (buf.getvalue(), ".png")}


def build_archive(root: str, n: int, hostile: float, seed: int) -> dict[str, str]:
    """The archive; returns {path: expected status} for every file the last run will list
    (vanishing ones are added by the run that makes them vanish)."""
    from braintumor_ray import CLASS_NAMES
    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(seed)
    if os.path.exists(root):
        shutil.rmtree(root)
    arc, outside = os.path.join(root, "archive"), os.path.join(root, "outside")
    os.makedirs(outside)
    open(os.path.join(outside, "secret.jpg"), "wb").write(jpeg(render_mri("glioma", rng, 256)[0]))
    kinds = ["nifti_bomb", "dicom_bomb", "truncated", "dangling", "dir_link", "outside_link", "vanish", "to_dir",
             "swap_link", "deep_chain", "latin1_name"]
    decode_bombs = {**frame_and_page_bombs(), **round_three_bombs()}
    kinds += list(decode_bombs)
    n_bad = max(len(kinds), int(round(n * hostile)))
    expected: dict[str, str] = {}
    bombs = {"nifti_bomb": (nifti_bomb(), ".nii.gz"), "dicom_bomb": (dicom_bomb(), ".dcm"), **decode_bombs}
    for i in range(n):
        d = os.path.join(arc, f"patient_{i // 50:03d}", "study")
        os.makedirs(d, exist_ok=True)
        if i % max(1, n // n_bad) == 0 and i // max(1, n // n_bad) < n_bad:
            kind = kinds[(i // max(1, n // n_bad)) % len(kinds)]
            p = os.path.join(d, f"{i:05d}_{kind}")
            if kind in bombs:
                p += bombs[kind][1]
                open(p, "wb").write(bombs[kind][0])
            elif kind == "truncated":
                p += ".jpg"
                data = jpeg(render_mri(CLASS_NAMES[i % 4], rng, 256)[0])
                open(p, "wb").write(data[: len(data) * 2 // 5])
            elif kind == "latin1_name":  # issue 35: a name that is not UTF-8; its row shows it escaped
                name = f"{i:05d}_M".encode() + b"\xfcller.jpg"
                open(os.path.join(os.fsencode(d), name), "wb").write(jpeg(render_mri("glioma", rng, 256)[0]))
                p = os.path.join(d, f"{i:05d}_M\\xfcller.jpg")
            elif kind == "dangling":
                os.symlink(os.path.join(d, "no-such-file.jpg"), p + ".jpg")
                p += ".jpg"
            elif kind == "dir_link":
                os.symlink(outside, p)
                continue  # a directory: no row of its own (its files lie outside the input)
            elif kind == "outside_link":
                os.symlink(os.path.join(outside, "secret.jpg"), p + ".jpg")
                p += ".jpg"
            elif kind == "deep_chain":  # issue 26: 100 folders deep; its row names the folder past the cap
                from braintumor_ray.core import MAX_FOLDER_DEPTH

                os.makedirs(os.path.join(p, *["d"] * 100))
                open(os.path.join(p, *["d"] * 100, "deep.jpg"), "wb").write(jpeg(render_mri("glioma", rng, 256)[0]))
                below = os.path.relpath(p, arc).count(os.sep) + 1  # p's own level below the archive
                p = os.path.join(p, *["d"] * (MAX_FOLDER_DEPTH + 1 - below))
            else:  # vanish / to_dir / swap_link (issue 26: a link to outside the archive once listed): written
                # just before the last run, made hostile once it has listed them
                p += ".jpg"
            expected[p] = kind
        else:
            p = os.path.join(d, f"{i:05d}.jpg")
            open(p, "wb").write(jpeg(render_mri(CLASS_NAMES[i % 4], rng, 256)[0]))
            expected[p] = "ok"
    return expected


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc; psutil is not a dependency)."""
    children: dict[int, list[int]] = {}
    for st in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(st).read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(st.split("/")[2]))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_title(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def hwm_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Job:
    """One ``jobs/score.py`` run in its own session; watches its decode workers' peak RSS."""

    def __init__(self, args: list[str], env: dict, log: str):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "score.py"), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        self.decode_hwm_mb = 0.0
        self.decode_pids: set[int] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            for pid in tree(self.proc.pid):
                if "decode" in proc_title(pid):
                    self.decode_pids.add(pid)
            for pid in list(self.decode_pids):
                self.decode_hwm_mb = max(self.decode_hwm_mb, hwm_mb(pid))
            time.sleep(0.2)

    def kill(self) -> None:
        for pid in tree(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._stop.set()

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._stop.set()
        # Ray's own processes outlive a clean driver exit for a moment; leave none behind.
        return rc


def limit_volume() -> bytes:
    """A gzipped NIfTI as large as the default limits let through: 512 x 512 x 511 int16 voxels
    (133.9 M of guard.max_pixels' 134.2 M; 255.5 MiB of guard.max_file_bytes' 256 MiB once
    inflated), each slice a generated head."""
    import nibabel as nib

    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(1)
    heads = [render_mri("glioma", rng, 512)[0].astype(np.int16) * 4 for _ in range(8)]
    vol = np.empty((512, 512, 511), np.int16)
    for k in range(511):
        vol[:, :, k] = heads[k % 8]
    img = nib.Nifti1Image(vol, np.eye(4))
    del vol
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as z:
        z.write(img.to_bytes())
    return out.getvalue()


def decode_at_limits(work: str, model: str, env: dict, logs: str) -> dict:
    """Peak RSS (VmHWM) of the decode workers of two more scoring runs: one small JPEG (the
    worker's own footprint) and the largest volume the default limits admit."""
    from braintumor_ray.imaging import render_mri

    out = {}
    for name, data in (("one_jpeg", jpeg(render_mri("glioma", np.random.default_rng(2), 256)[0])),
                       ("limit_volume", limit_volume())):
        arc = os.path.join(work, f"archive_{name}")
        shutil.rmtree(arc, ignore_errors=True)
        os.makedirs(arc)
        open(os.path.join(arc, "scan.nii.gz" if name == "limit_volume" else "scan.jpg"), "wb").write(data)
        dst = os.path.join(work, f"predictions_{name}")
        shutil.rmtree(dst, ignore_errors=True)
        t = time.time()
        job = Job(["--model", model, "--input", arc, "--output", dst, "--explain", "none"], env,
                  os.path.join(logs, f"{name}.log"))
        rc = job.wait(timeout=1800)
        rows = pads.dataset(dst, format="parquet").to_table(columns=["status"]).column("status").to_pylist() if rc == 0 else []
        out[name] = {"rc": rc, "file_mb": round(len(data) / 2**20, 1), "rows_ok": rows.count("ok"),
                     "decode_worker_peak_rss_mb": round(job.decode_hwm_mb, 1), "wall_s": round(time.time() - t, 1)}
    return out


def wait_for(cond, job: "Job", timeout: float = 300.0) -> float:
    """Poll ``cond`` until it holds or the job ends; returns when."""
    t = time.time()
    while not cond() and job.proc.poll() is None and time.time() - t < timeout:
        time.sleep(0.05)
    return time.time()


def staged_run(out: str) -> str | None:
    """The staging folder of a run in progress (``OUTPUT._staging/<run id>``), if any."""
    root = out + "._staging"
    names = [n for n in os.listdir(root) if not n.startswith("_")] if os.path.isdir(root) else []
    return names[0] if names else None


def committed_rows(out: str) -> int:
    if not os.path.isdir(out) or not glob.glob(os.path.join(out, "*.parquet")):
        return 0
    return pads.dataset(out, format="parquet").count_rows()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--hostile", type=float, default=0.05)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/soak")
    ap.add_argument("--lease-ttl-s", type=float, default=8.0)
    ap.add_argument("--kill-window", default="1,20", help="LO,HI: each kill falls uniformly this many seconds after "
                    "the run's scoring starts (a 3000-file run scores for ~25 s here)")
    ap.add_argument("--json", help="write the figures here as JSON too")
    a = ap.parse_args(argv)
    random.seed(a.seed)

    import torch

    from braintumor_ray import MRIPreprocess, create_model, export_model_package

    t0 = time.time()
    expected = build_archive(a.work, a.files, a.hostile, a.seed)
    torch.manual_seed(0)
    model = os.path.join(a.work, "model")
    export_model_package(create_model("resnet10t", pretrained=False, drop_rate=0.0), model,
                         preprocess=MRIPreprocess(image_size=64))
    arc, out = os.path.join(a.work, "archive"), os.path.join(a.work, "predictions")
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HOME": os.path.join(a.work, "home")}
    os.makedirs(env["HOME"], exist_ok=True)
    base = ["--model", model, "--input", arc, "--output", out, "--lease-ttl-s", str(a.lease_ttl_s), "--explain", "none"]
    logs = os.path.join(a.work, "logs")
    os.makedirs(logs, exist_ok=True)
    built_s = time.time() - t0

    runs, hwm, refused = [], 0.0, None
    lo, hi = (float(v) for v in a.kill_window.split(","))
    for k in range(a.kills):
        job = Job(base + ["--wait", "900"], env, os.path.join(logs, f"killed_{k}.log"))
        if k == 1:  # the concurrent run, started once while a live run holds the lease
            wait_for(lambda: os.path.exists(out + "._lease.json"), job)
            time.sleep(1.0)
            second = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "score.py"), *base], env=env,
                                    cwd=ROOT, capture_output=True, text=True, timeout=600)
            refused = {"rc": second.returncode, "message": (second.stderr.strip().splitlines() or [""])[-1]}
        # Kill points: uniform over a window that starts when the run's scoring starts (its
        # staging folder appears; Ray's start takes ~8 s before that here).
        started = wait_for(lambda: staged_run(out) is not None, job)
        at = random.uniform(lo, hi)
        try:
            rc = job.wait(timeout=at)
            runs.append({"run": k, "killed_at_s": None, "rc": rc})  # finished before its kill point
        except subprocess.TimeoutExpired:
            job.kill()
            runs.append({"run": k, "killed_at_s": round(at, 1), "after_start_s": round(time.time() - started, 1),
                         "rows_committed": committed_rows(out), "rc": "SIGKILL"})
        hwm = max(hwm, job.decode_hwm_mb)

    # The completing run: some files vanish, some turn into a directory, after it has listed them
    # (they did not exist for the runs before, so none of those can have scored them).
    from braintumor_ray import CLASS_NAMES
    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(a.seed + 1)
    for i, (p, kind) in enumerate(expected.items()):
        if kind in ("vanish", "to_dir", "swap_link"):
            open(p, "wb").write(jpeg(render_mri(CLASS_NAMES[i % 4], rng, 256)[0]))
    cfg = os.path.join(out, "_config.yaml")
    before = os.path.getmtime(cfg) if os.path.exists(cfg) else 0.0
    job = Job(base + ["--wait", "900"], env, os.path.join(logs, "final.log"))
    while job.proc.poll() is None and (not os.path.exists(cfg) or os.path.getmtime(cfg) == before):
        time.sleep(0.05)
    for p, kind in expected.items():
        if kind == "vanish":
            os.remove(p)
        elif kind == "to_dir":
            os.remove(p)
            os.makedirs(p)
        elif kind == "swap_link":
            os.remove(p)
            os.symlink(os.path.join(a.work, "outside", "secret.jpg"), p)
    rc = job.wait(timeout=1800)
    hwm = max(hwm, job.decode_hwm_mb)
    runs.append({"run": "final", "killed_at_s": None, "rc": rc})

    rows = pads.dataset(out, format="parquet").to_table(columns=["path", "status", "error"]).to_pylist()
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    dup = sum(len(v) - 1 for v in by_path.values())
    good = [p for p, k in expected.items() if k == "ok"]
    lost = [p for p in good if [r["status"] for r in by_path.get(p, [])] != ["ok"]]
    hostile = {p: k for p, k in expected.items() if k != "ok"}
    hostile_ok = [p for p in hostile if [r["status"] for r in by_path.get(p, [])] != ["error"]]
    at_limits = decode_at_limits(a.work, model, env, logs)
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "files": len(expected),
        "hostile": len(hostile),
        "rows": len(rows),
        "rows_equal_files": len(rows) == len(expected),
        "duplicates": dup,
        "good_files_lost": len(lost),
        "hostile_without_error_row": len(hostile_ok),
        "concurrent_run": refused,
        "runs": runs,
        "decode_worker_peak_rss_mb": round(hwm, 1),
        "at_limits": at_limits,
        "build_s": round(built_s, 1),
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(figures, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = (figures["rows_equal_files"] and dup == 0 and not lost and not hostile_ok and refused is not None
          and refused["rc"] == 2 and rc == 0 and all(r["rc"] in (0, "SIGKILL") for r in runs) and at_limits["limit_volume"]["rows_ok"] == 511)
    if not ok:
        print("SOAK FAILED: " + ", ".join(f"{p}: {by_path.get(p)}" for p in (lost + hostile_ok)[:10]), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
