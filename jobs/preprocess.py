"""Ingest MRI image folders into preprocessed Parquet shards.

    python jobs/preprocess.py --input s3://bucket/raw --output s3://bucket/preprocessed
    python jobs/preprocess.py            # embedded default: a generated sample under ./demo

Submit to a cluster with ``ray job submit --working-dir . -- python jobs/preprocess.py ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

from braintumor_ray import MRIPreprocess, make_sample_dataset
from braintumor_ray.cli import DEMO_DIR, join_ray, run_job
from braintumor_ray.imaging import SeriesSelector, add_selector_args
from braintumor_ray.ingest import IngestConfig, format_summary, run_ingest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = IngestConfig.__dataclass_fields__
    pp = MRIPreprocess()
    p.add_argument("--input", help="folder of <split>/<class>/<image> or <class>/<image> (DICOM and NIfTI files "
                   "at any depth below <class>), local or s3:// "
                   "(default: a generated sample in ./demo/sample)")
    p.add_argument("--output", help="folder for Parquet shards and report.json, local or s3:// "
                   "(default with no --input: ./demo/preprocessed)")
    p.add_argument("--image-size", type=int, default=pp.image_size, help="side of the square output (default %(default)s)")
    p.add_argument("--crop-threshold", type=int, default=pp.threshold, help="grey level that counts as head (default %(default)s)")
    p.add_argument("--crop-margin", type=float, default=pp.margin, help="margin around the head, fraction (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=pp.max_pixels, help="refuse larger images (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"].default, help="default %(default)s")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="default %(default)s")
    p.add_argument("--near-dup-distance", type=int, default=d["near_dup_distance"].default,
                   help="pHash bits for a near duplicate, -1 to disable (default %(default)s)")
    p.add_argument("--images-per-block", type=int, default=d["images_per_block"].default,
                   help="unit of parallel work and most rows per Parquet file (default %(default)s)")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                   help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    add_selector_args(p)
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overwrite = args.overwrite
    if args.input is None:
        sample = os.path.abspath(os.path.join(DEMO_DIR, "sample"))
        make_sample_dataset(sample, per_class=24, test_per_class=6)
        args.input = sample
        args.output = args.output or os.path.abspath(os.path.join(DEMO_DIR, "preprocessed"))
        overwrite = True
    if args.output is None:
        print("error: --output is required with --input", file=sys.stderr)
        return 2

    def work() -> str:
        config = IngestConfig(
            input=args.input,
            output=args.output,
            preprocess=MRIPreprocess(
                image_size=args.image_size, threshold=args.crop_threshold, margin=args.crop_margin, max_pixels=args.max_pixels
            ),
            val_fraction=args.val_fraction,
            seed=args.seed,
            near_dup_distance=args.near_dup_distance,
            s3_endpoint_url=args.s3_endpoint_url,
            overwrite=overwrite,
            images_per_block=args.images_per_block,
            select=SeriesSelector.from_args(args),
        )
        join_ray(args.ray_address)
        return format_summary(run_ingest(config))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
