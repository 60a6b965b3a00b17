"""Search hyperparameters across backbones with Ray Tune; every trial is a Ray Train run.

    ray job submit --working-dir . -- python jobs/tune.py --data s3://bucket/preprocessed \\
        --models efficientnet_b0,resnet50,vgg16,legacy_xception --num-samples 4 --max-epochs 10 \\
        --gpus-per-trial 0.5 --storage s3://bucket/runs --name search1
    python jobs/tune.py --smoke-test      # embedded default: generated sample, tiny models, ~1-2 min
    python jobs/tune.py --storage ... --name search1 --resume   # continue an interrupted search

Writes under --storage/--name: leaderboard.csv/.md, val_macro_f1.png, best.json and the best
trial's model package in best_model/; Tune's state and each trial's checkpoints beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from braintumor_ray.cli import DEMO_DIR, demo_data, join_ray, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from braintumor_ray.tune import SearchConfig

    d = SearchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="output of jobs/preprocess.py, local or s3:// (default: a generated sample, "
                   "preprocessed into ./demo)")
    p.add_argument("--models", default=None, help=f"comma-separated timm names or presets (default {','.join(d.models)})")
    p.add_argument("--num-samples", type=int, default=None, help=f"trials per backbone (default {d.num_samples})")
    p.add_argument("--max-epochs", type=int, default=None, help=f"epochs of a trial that ASHA never stops (default {d.max_epochs})")
    p.add_argument("--grace-period", type=int, default=None, help=f"epochs before ASHA may stop a trial (default {d.grace_period})")
    p.add_argument("--reduction-factor", type=int, default=None, help=f"ASHA keeps 1 in this many at each rung (default {d.reduction_factor})")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial; fractions share a GPU (default 0: CPU)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help=f"default {d.cpus_per_trial}")
    p.add_argument("--workers-per-trial", type=int, default=None, help=f"DDP workers of one trial (default {d.workers_per_trial})")
    p.add_argument("--max-concurrent-trials", type=int, default=None, help="default: what the cluster's CPUs/GPUs hold")
    p.add_argument("--no-pretrained", action="store_true", help="random init for every backbone")
    p.add_argument("--config", default=None, help="YAML (local or s3://) with space: (ranges), fixed: (training "
                   "settings for every trial) and any of the options above; command-line options win")
    p.add_argument("--storage", default=None, help="searches folder, local or s3:// (default ./runs; ./demo/runs with no --data)")
    p.add_argument("--name", default=None, help="search name (default: tune-<UTC date-time>)")
    p.add_argument("--resume", action="store_true", help="continue the search --storage/--name: finished trials "
                   "are not run again, unfinished ones continue from their checkpoints")
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                   help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--smoke-test", action="store_true",
                   help="about a minute on 2 CPUs: two tiny random-init backbones, 2 epochs (options given still apply)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or a local Ray)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace):
    from braintumor_ray.tune import SearchConfig, load_yaml

    given: dict = {}
    if args.config:
        given.update(load_yaml(args.config, s3_endpoint_url=args.s3_endpoint_url))
    cli = {
        "data": args.data,
        "models": tuple(args.models.split(",")) if args.models else None,
        "num_samples": args.num_samples,
        "max_epochs": args.max_epochs,
        "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor,
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
        "workers_per_trial": args.workers_per_trial,
        "max_concurrent_trials": args.max_concurrent_trials,
        "storage": args.storage,
        "name": args.name,
        "seed": args.seed,
        "s3_endpoint_url": args.s3_endpoint_url,
    }
    given.update({k: v for k, v in cli.items() if v is not None})
    if args.no_pretrained:
        given["pretrained"] = False
    if "models" in given:
        given["models"] = tuple(given["models"])
    if args.smoke_test:
        return SearchConfig.smoke_test(**given)
    return SearchConfig.from_dict(given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> str:
        from braintumor_ray.tune import format_leaderboard, load_search_config, run_search

        join_ray(args.ray_address)
        if args.resume:
            if not args.name:
                from braintumor_ray import ConfigError

                raise ConfigError("--resume needs --name (and --storage) of the search to continue")
            storage = args.storage or (os.path.join(DEMO_DIR, "runs") if args.data is None and args.smoke_test else "runs")
            cfg = load_search_config(storage, args.name, s3_endpoint_url=args.s3_endpoint_url)
        else:
            if args.data is None:
                args.data = demo_data(small=args.smoke_test)
                args.storage = args.storage or os.path.abspath(os.path.join(DEMO_DIR, "runs"))
            args.name = args.name or time.strftime("tune-%Y%m%d-%H%M%S", time.gmtime())
            cfg = make_config(args)
        s = run_search(cfg, resume=args.resume)
        lines = [
            f"search {s['search']}: {s['trials']} trials, {s['trial_epochs_run']} of {s['trial_epochs_budget']} "
            f"trial-epochs run (ASHA saved {s['asha_saved_fraction']:.0%}), {s['wall_s']:.0f} s",
            "",
            format_leaderboard(s["leaderboard"]),
            "",
            f"best: {s['best_trial']['trial']} ({s['best_trial']['backbone']}), val macro-F1 "
            f"{s['val']['macro_f1']:.3f}",
        ]
        for split in ("test", "test_clean"):
            if split in s:
                lines.append(f"  {split:<10} n={s[split]['n']:<5} accuracy {s[split]['accuracy']:.3f}  "
                             f"macro-F1 {s[split]['macro_f1']:.3f}")
        lines.append(f"  model: {s['model']['uri']} ({s['model']['model_id']})")
        lines.append(f"  leaderboard: {s['search']}/leaderboard.md, plot: {s['search']}/val_macro_f1.png")
        return "\n".join(lines)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
