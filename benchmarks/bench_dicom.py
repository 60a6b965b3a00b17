"""What ``--dicom-out`` and ``--dicom-send`` cost a scoring run (docs/benchmarks.md).

    .venv/bin/python benchmarks/bench_dicom.py [--series 40] [--slices 4] [--model DIR]

Generates ``--series`` DICOM series of ``--slices`` MR slices each (pydicom, one study), and a
model package (a random ResNet-10t at 64 px, as the tests' one) unless ``--model`` gives one.
Then three runs on one output, on one local Ray:

1. scoring with ``--dicom-out none`` (every slice scored, ``--explain all``: every series has a map);
2. the same output with ``--dicom-out sr+sc``: nothing is left to score, so its wall time is the
   DICOM step alone (read each top slice, build the SR and SC, stage, commit);
3. again with ``--dicom-send`` to Debian's Orthanc, started here on loopback: the sending alone.

Prints one JSON object: the runs' wall times, objects written and sent, per-object costs, sizes.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from braintumor_ray.imaging import render_mri  # noqa: E402
from braintumor_ray.score import ScoreConfig, run_scoring  # noqa: E402

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_archive(root: str, series: int, slices: int, seed: int = 0) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    study = generate_uid()
    labels = ["glioma", "meningioma", "pituitary", "no_tumor"]
    for s in range(series):
        uid = generate_uid()
        for i in range(slices):
            pixels = render_mri(labels[s % 4], rng, 128)[0].astype(np.uint16) * 16
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
            ds.PatientName, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "Bench^Mark", "BENCH", study, uid
            ds.Modality, ds.InstanceNumber, ds.ImageOrientationPatient = "MR", i + 1, [1, 0, 0, 0, 1, 0]
            ds.Rows, ds.Columns = pixels.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = pixels.tobytes()
            os.makedirs(f"{root}/S{s:03d}", exist_ok=True)
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            with open(f"{root}/S{s:03d}/IM{i:04d}", "wb") as f:
                f.write(buf.getvalue())


def start_orthanc(root: str) -> tuple[subprocess.Popen, str]:
    dicom, http = _port(), _port()
    cfg = {"StorageDirectory": f"{root}/storage", "IndexDirectory": f"{root}/index", "DicomAet": "BENCHPACS",
           "DicomPort": dicom, "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "DicomAlwaysAllowStore": True, "Plugins": [DICOMWEB]}
    with open(f"{root}/orthanc.json", "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen([ORTHANC, f"{root}/orthanc.json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"dicom://BENCHPACS@127.0.0.1:{dicom}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=40)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    import ray

    work = tempfile.mkdtemp(prefix="bench-dicom-")
    try:
        model = args.model
        if model is None:
            import torch

            from braintumor_ray import MRIPreprocess, create_model, export_model_package

            torch.manual_seed(0)
            model = f"{work}/model"
            export_model_package(create_model("resnet10t", pretrained=False, drop_rate=0.0), model,
                                 preprocess=MRIPreprocess(image_size=64))
        make_archive(f"{work}/archive", args.series, args.slices)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        base = dict(model=model, input=f"{work}/archive", output=f"{work}/out", explain="all", batch_size=16)
        first = run_scoring(ScoreConfig(**base))
        written = run_scoring(ScoreConfig(**base, dicom_out="sr+sc"))
        proc, dest = start_orthanc(work)
        try:
            sent = run_scoring(ScoreConfig(**base, dicom_out="sr+sc", dicom_send=dest))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        d = written["dicom"]
        objects = d["sr"] + d["sc"]
        sizes = {k: [os.path.getsize(p) for p in glob.glob(f"{work}/out_dicom/*-{k}.dcm")] for k in ("sr", "sc")}
        (s,) = sent["dicom"]["sent"]
        print(json.dumps({
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
            "series": args.series, "slices_per_series": args.slices,
            "score_wall_s": first["wall_s"], "dicom_step_wall_s": written["wall_s"], "sr": d["sr"], "sc": d["sc"],
            "ms_per_object": round(1000 * written["wall_s"] / max(objects, 1), 1),
            "send_wall_s": sent["wall_s"], "sent": s["sent"], "failed": s["failed"],
            "ms_per_object_sent": round(1000 * sent["wall_s"] / max(s["sent"], 1), 1),
            "sr_kb": round(float(np.mean(sizes["sr"])) / 1024, 1) if sizes["sr"] else None,
            "sc_kb": round(float(np.mean(sizes["sc"])) / 1024, 1) if sizes["sc"] else None,
        }, indent=1))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
