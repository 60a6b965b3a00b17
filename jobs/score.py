"""Score an MRI archive with an exported model package; only new or changed files are scored.

    python jobs/score.py --model s3://bucket/runs/r1/model --input s3://bucket/archive --output s3://bucket/predictions

Run it on a schedule (cron, a Kubernetes CronJob): each run commits its rows atomically file by
file, and finishes or redoes whatever a cut-off earlier run left. DICOM files and NIfTI volumes
are scored slice by slice, with a per-series table in OUTPUT_series/. The effective settings go
to OUTPUT/_config.yaml (for --config; Parquet readers skip the underscore). See docs/scoring.md.
"""

from __future__ import annotations

import argparse
import sys

from braintumor_ray.cli import build_config, job_parser, join_ray, run_job
from braintumor_ray.score import ScoreConfig, format_summary, run_scoring


def get_args_parser() -> argparse.ArgumentParser:
    return job_parser(ScoreConfig, __doc__, flags=("config", "ray_address"))


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)

    def work() -> str:
        cfg = build_config(ScoreConfig, args)
        join_ray(args.ray_address)
        return format_summary(run_scoring(cfg))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
