"""Build one ensemble package from trained models' packages (any runs, same or different backbones).

    python jobs/ensemble.py --package runs/lite0/model --package runs/b0/model --data s3://bucket/preprocessed \\
        --output runs/ensemble1
    ray job submit --working-dir . -- python jobs/ensemble.py --package s3://bucket/runs/a/model \\
        --package s3://bucket/runs/b/model --data s3://bucket/preprocessed --output s3://bucket/models/ens1

Writes one model package in --output (model.json, model.safetensors with every member, model.onnx
running them all, trust.safetensors): its logits are the mean of the members', its temperature, OOD
reference, review threshold and prediction sets fitted on the ensemble's own outputs (validation;
the OOD reference on the training split). Score it as any package: jobs/score.py --model OUTPUT.
"""

from __future__ import annotations

import argparse
import sys

from braintumor_ray.cli import config_dict, job_parser, join_ray, run_job
from braintumor_ray.train import EnsembleConfig, build_ensemble, format_ensemble


class _Repeatable(argparse.Action):
    """``--package P1 --package P2``: each occurrence adds members (a plain option keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        prev = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, tuple(prev or ()) + tuple(values))


def get_args_parser() -> argparse.ArgumentParser:
    p = job_parser(EnsembleConfig, __doc__, flags=("config", "ray_address"))
    for action in p._actions:
        if action.dest == "packages":
            action.__class__ = _Repeatable
    return p


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)

    def work() -> str:
        cfg = EnsembleConfig.from_dict(config_dict(EnsembleConfig, args))
        join_ray(args.ray_address)
        return format_ensemble(build_ensemble(cfg))

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
