"""Ingest throughput: the Ray Data job against a plain single-process PIL loop, same run.

    .venv/bin/python benchmarks/bench_ingest.py [--data ../shared/data/sartaj-brain-mri]

The loop does what the job's workers do per image that matters for speed (read the file,
decode, greyscale, crop, resize: MRIPreprocess), with no hashing, PNG encoding or writing;
the job does all of those plus listing, duplicate grouping and Parquet output. Ray's own
start-up is timed apart: on a cluster it is paid once, not per job.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import tempfile
import logging
import time

from braintumor_ray import MRIPreprocess, make_sample_dataset
from braintumor_ray.ingest import IngestConfig, format_summary, run_ingest

HERE = os.path.dirname(os.path.abspath(__file__))


def single_process_loop(files: list[str], preprocess: MRIPreprocess) -> float:
    t = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            preprocess(f.read())
    return len(files) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray (default: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = os.path.abspath(args.data)
    files = sorted(f for f in glob.glob(os.path.join(data, "**", "*"), recursive=True) if os.path.isfile(f))
    preprocess = MRIPreprocess()
    print(f"{len(files)} files under {data}; {os.cpu_count()} CPUs; {platform.processor() or platform.machine()}")

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    ray_start = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False

    with tempfile.TemporaryDirectory() as tmp:
        # A first small job starts Ray's worker processes and imports our code in them: paid
        # once per cluster, so timed apart from the job itself.
        make_sample_dataset(os.path.join(tmp, "warm"), per_class=8, test_per_class=2)
        t = time.perf_counter()
        run_ingest(IngestConfig(input=os.path.join(tmp, "warm"), output=os.path.join(tmp, "warm-out")))
        warm_s = time.perf_counter() - t
        base1 = single_process_loop(files, preprocess)
        out = args.out or os.path.join(tmp, "out")
        t = time.perf_counter()
        report = run_ingest(IngestConfig(input=data, output=out, overwrite=True))
        job_s = time.perf_counter() - t
        base2 = single_process_loop(files, preprocess)
    base = (base1 + base2) / 2
    job = len(files) / job_s
    decode = len(files) / report["timing"]["decode_s"]
    print(format_summary(report))
    result = {
        "files": len(files),
        "ray_cpus": args.cpus,
        "ray_start_s": round(ray_start, 2),
        "first_small_job_s": round(warm_s, 2),
        "single_process_img_s": [round(base1, 1), round(base2, 1)],
        "ray_job_s": round(job_s, 2),
        "ray_job_img_s": round(job, 1),
        "ray_decode_stage_img_s": round(decode, 1),
        "job_ratio_vs_loop": round(job / base, 2),
        "decode_stage_ratio_vs_loop": round(decode / base, 2),
        "timing": report["timing"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
