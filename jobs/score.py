"""Score an MRI archive with an exported model package; only new or changed files are scored.

    python jobs/score.py --model s3://bucket/runs/r1/model --input s3://bucket/archive --output s3://bucket/predictions

Run it on a schedule (cron, a Kubernetes CronJob): each run commits its rows atomically file by
file, and finishes or redoes whatever a cut-off earlier run left. DICOM files and NIfTI volumes
are scored slice by slice, with a per-series table in OUTPUT_series/. See docs/scoring.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from braintumor_ray.cli import join_ray, run_job
from braintumor_ray.imaging import SeriesSelector, add_selector_args
from braintumor_ray.score import ScoreConfig, format_summary, run_scoring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ScoreConfig.__dataclass_fields__
    p.add_argument("--model", required=True, help="exported model package folder, local or s3://")
    p.add_argument("--input", required=True, help="folder or prefix of images (any depth, any names), local or s3://")
    p.add_argument("--output", required=True, help="Parquet folder of predictions, local or s3://")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="images per model call (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=None, help="model replicas (default: GPUs, or half the CPUs)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per model replica")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint")
    add_selector_args(p)
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> str:
        config = ScoreConfig(
            model=args.model,
            input=args.input,
            output=args.output,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            use_gpu=args.use_gpu,
            s3_endpoint_url=args.s3_endpoint_url,
            select=SeriesSelector.from_args(args),
        )
        join_ray(args.ray_address)
        return format_summary(run_scoring(config))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
