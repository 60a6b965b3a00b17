"""Fine-tune a timm backbone on preprocessed MRI Parquet with Ray Train (DDP over workers).

    python jobs/train.py --data s3://bucket/preprocessed --model tf_efficientnet_lite0 \\
        --num-workers 2 --epochs 8 --storage s3://bucket/runs --name lite0
    python jobs/train.py --smoke-test     # embedded default: generated sample, tiny model, ~1 min
    python jobs/train.py --config s3://bucket/runs/lite0/config.yaml --name lite0-b ...   # a run's saved settings
    python jobs/train.py ... --resume     # continue a stopped run from its latest checkpoint

Writes under --storage/--name: config.yaml (the effective settings), Ray Train checkpoints (best
kept by validation macro-F1), metrics.json, curves.png, confusion_*.png and the model package in model/.
Submit to a cluster with ``ray job submit --working-dir . -- python jobs/train.py ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from braintumor_ray.cli import DEMO_DIR, config_dict, demo_data, job_parser, join_ray, refuse_demo_into, run_job
from braintumor_ray.core import given_settings
from braintumor_ray.train import TrainConfig, format_table, run_training


def get_args_parser() -> argparse.ArgumentParser:
    return job_parser(TrainConfig, __doc__, flags=("config", "smoke_test", "resume", "ray_address"))


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)

    def work() -> str:
        settings = config_dict(TrainConfig, args)
        given = given_settings(args, TrainConfig)
        if not args.smoke_test:  # --smoke-test asks for the generated sample by name; anything else names --data
            refuse_demo_into(settings, input="data", outputs=("storage",))
        if args.smoke_test and "model" in given and "pretrained" not in given:
            settings["pretrained"] = True  # a model named with --smoke-test keeps its weights
        defaults = {} if args.resume else {"name": time.strftime("train-%Y%m%d-%H%M%S", time.gmtime())}
        if settings.get("data") is None:  # the embedded default: a generated sample under ./demo
            defaults["storage"] = os.path.abspath(os.path.join(DEMO_DIR, "runs"))
        cfg = TrainConfig.from_dict(defaults | settings)
        join_ray(args.ray_address)
        if cfg.data is None:
            cfg = cfg.replace(data=demo_data(small=args.smoke_test))
        return format_table(run_training(cfg, resume=args.resume))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
