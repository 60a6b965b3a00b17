"""Search hyperparameters across backbones with Ray Tune; every trial is a Ray Train run.

    ray job submit --working-dir . -- python jobs/tune.py --data s3://bucket/preprocessed \\
        --models efficientnet_b0,resnet50,vgg16,legacy_xception --num-samples 4 --max-epochs 10 \\
        --gpus-per-trial 0.5 --storage s3://bucket/runs --name search1
    python jobs/tune.py --config deploy/tune-search.yaml --data s3://bucket/preprocessed   # space: and fixed:
    python jobs/tune.py --smoke-test      # embedded default: generated sample, tiny models, ~1-2 min
    python jobs/tune.py --storage ... --name search1 --resume   # continue an interrupted search

Writes under --storage/--name: config.yaml (the effective settings), leaderboard.csv/.md,
val_macro_f1.png, best.json and the best trial's model package in best_model/; Tune's state and
each trial's checkpoints beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from braintumor_ray.cli import DEMO_DIR, config_dict, demo_data, job_parser, join_ray, refuse_demo_into, run_job
from braintumor_ray.core import ConfigError
from braintumor_ray.tune import SearchConfig, format_summary, load_search_config, run_search


def get_args_parser() -> argparse.ArgumentParser:
    return job_parser(SearchConfig, __doc__, flags=("config", "smoke_test", "resume", "ray_address"))


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)

    def work() -> str:
        settings = config_dict(SearchConfig, args)
        demo = settings.get("data") is None  # the embedded default: a generated sample under ./demo
        if not (args.resume or args.smoke_test):  # a resumed search keeps its saved data; --smoke-test asks for the sample
            refuse_demo_into(settings, input="data", outputs=("storage",))
        if args.resume:  # the search's own saved settings
            if not settings.get("name"):
                raise ConfigError("--resume needs --name (and --storage) of the search to continue")
            storage = settings.get("storage") or (os.path.join(DEMO_DIR, "runs") if demo and args.smoke_test else "runs")
            cfg = load_search_config(storage, settings["name"], s3_endpoint_url=settings.get("s3_endpoint_url"))
        else:
            defaults = {"name": time.strftime("tune-%Y%m%d-%H%M%S", time.gmtime())}
            if demo:
                defaults["storage"] = os.path.abspath(os.path.join(DEMO_DIR, "runs"))
            cfg = SearchConfig.from_dict(defaults | settings)
        join_ray(args.ray_address)
        if cfg.data is None:
            cfg = cfg.replace(data=demo_data(small=args.smoke_test))
        return format_summary(run_search(cfg, resume=args.resume))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
