"""Ingest MRI image folders into preprocessed Parquet shards.

    python jobs/preprocess.py --input s3://bucket/raw --output s3://bucket/preprocessed
    python jobs/preprocess.py            # embedded default: a generated sample under ./demo

Writes under --output: images/split=*/*.parquet, errors.parquet, config.yaml (the effective
settings, for --config) and report.json (last). Submit to a cluster with
``ray job submit --working-dir . -- python jobs/preprocess.py ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

from braintumor_ray.cli import DEMO_DIR, config_dict, job_parser, join_ray, refuse_demo_into, run_job
from braintumor_ray.imaging import make_sample_dataset
from braintumor_ray.ingest import IngestConfig, format_summary, run_ingest


def get_args_parser() -> argparse.ArgumentParser:
    return job_parser(IngestConfig, __doc__, flags=("config", "ray_address"))


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)

    def work() -> str:
        settings = config_dict(IngestConfig, args)
        refuse_demo_into(settings, input="input", outputs=("output",))
        demo = settings.get("input") is None  # the embedded default: a generated sample under ./demo
        if demo:
            settings = settings | {"output": os.path.abspath(os.path.join(DEMO_DIR, "preprocessed")),
                                   "input": os.path.abspath(os.path.join(DEMO_DIR, "sample")), "overwrite": True}
        cfg = IngestConfig.from_dict(settings)
        if demo:
            make_sample_dataset(cfg.input, per_class=24, test_per_class=6)
        join_ray(args.ray_address)
        return format_summary(run_ingest(cfg))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
