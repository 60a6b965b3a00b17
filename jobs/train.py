"""Fine-tune a timm backbone on preprocessed MRI Parquet with Ray Train (DDP over workers).

    python jobs/train.py --data s3://bucket/preprocessed --model tf_efficientnet_lite0 \\
        --num-workers 2 --epochs 8 --storage s3://bucket/runs --name lite0
    python jobs/train.py --smoke-test     # embedded default: generated sample, tiny model, ~1 min
    python jobs/train.py ... --resume     # continue a stopped run from its latest checkpoint

Writes under --storage/--name: Ray Train checkpoints (best kept by validation macro-F1),
metrics.json, curves.png, confusion_*.png and the model package in model/.
Submit to a cluster with ``ray job submit --working-dir . -- python jobs/train.py ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from braintumor_ray.cli import DEMO_DIR, demo_data, join_ray, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from braintumor_ray.train import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="output of jobs/preprocess.py, local or s3:// (default: a generated sample, "
                   "preprocessed into ./demo)")
    p.add_argument("--model", default=None, help=f"timm name or preset (default {d.model})")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", default=None, help="backbone weights file, local or s3:// (safetensors or state dict)")
    w.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")
    p.add_argument("--weights-sha256", default=None, help="expected sha256 of --weights")
    p.add_argument("--transfer", default=None, help="feature, full or last-N (default last-3 with pretrained weights, full from random init)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=None, help=f"per worker (default {d.batch_size})")
    p.add_argument("--grad-accum-steps", type=int, default=None,
                   help=f"micro-batches per optimizer step, for batches that do not fit (default {d.grad_accum_steps})")
    p.add_argument("--lr", type=float, default=None, help=f"head learning rate (default {d.lr})")
    p.add_argument("--backbone-lr-scale", type=float, default=None, help="backbone lr = lr x this (default 0.1 with pretrained weights, 1 from random init)")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW (default {d.weight_decay})")
    p.add_argument("--warmup-epochs", type=float, default=None, help=f"linear warm-up, then cosine (default {d.warmup_epochs})")
    p.add_argument("--label-smoothing", type=float, default=None, help=f"default {d.label_smoothing}")
    p.add_argument("--dropout", type=float, default=None, help=f"before the classifier (default {d.drop_rate})")
    p.add_argument("--augment-strength", type=float, default=None,
                   help=f"scales rotation/shift/zoom/brightness/contrast; 0 = off (default {d.augment_strength})")
    p.add_argument("--class-weighting", choices=["sqrt", "inverse", "none"], default=None,
                   help=f"loss weights from class counts: 1/sqrt(n), 1/n or none (default {d.class_weighting})")
    p.add_argument("--no-class-weighting", action="store_true", help="same as --class-weighting none")
    p.add_argument("--early-stop-patience", type=int, default=None,
                   help=f"epochs without a better val macro-F1 before stopping, 0 = off (default {d.early_stop_patience})")
    p.add_argument("--num-workers", type=int, default=None, help=f"Ray Train workers (default {d.num_workers})")
    p.add_argument("--cpus-per-worker", type=float, default=None, help=f"default {d.cpus_per_worker}")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, mixed precision")
    p.add_argument("--storage", default=None, help=f"runs folder, local or s3:// (default ./{d.storage})")
    p.add_argument("--name", default=None, help="run name (default: train-<UTC date-time>)")
    p.add_argument("--resume", action="store_true", help="continue the run --storage/--name from its latest checkpoint")
    p.add_argument("--num-to-keep", type=int, default=None, help=f"checkpoints kept, best by val macro-F1 (default {d.num_to_keep})")
    p.add_argument("--max-failures", type=int, default=None, help=f"worker failures to recover from (default {d.max_failures})")
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                   help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny and fast: small random-init model, few epochs (options given still apply)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or a local Ray)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace):
    from braintumor_ray.train import TrainConfig

    given = {
        "data": args.data,
        "model": args.model,
        "weights": args.weights,
        "weights_sha256": args.weights_sha256,
        "transfer": args.transfer,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum_steps": args.grad_accum_steps,
        "lr": args.lr,
        "backbone_lr_scale": args.backbone_lr_scale,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "drop_rate": args.dropout,
        "augment_strength": args.augment_strength,
        "early_stop_patience": args.early_stop_patience,
        "class_weighting": args.class_weighting,
        "num_workers": args.num_workers,
        "cpus_per_worker": args.cpus_per_worker,
        "storage": args.storage,
        "name": args.name,
        "num_to_keep": args.num_to_keep,
        "max_failures": args.max_failures,
        "seed": args.seed,
        "s3_endpoint_url": args.s3_endpoint_url,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.no_pretrained:
        given["pretrained"] = False
    if args.no_class_weighting:
        given["class_weighting"] = "none"
    if args.use_gpu:
        given["use_gpu"] = True
    if args.smoke_test:
        if "model" in given and "pretrained" not in given:
            given["pretrained"] = True  # a named model keeps its weights
        return TrainConfig.smoke_test(**given)
    return TrainConfig(**given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> str:
        from braintumor_ray.train import format_table, run_training

        join_ray(args.ray_address)
        if args.data is None:
            args.data = demo_data(small=args.smoke_test)
            args.storage = args.storage or os.path.abspath(os.path.join(DEMO_DIR, "runs"))
        if args.name is None and not args.resume:
            args.name = time.strftime("train-%Y%m%d-%H%M%S", time.gmtime())
        return format_table(run_training(make_config(args), resume=args.resume))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
