"""What every driver in jobs/ shares: its parser (generated from the stage's config class), the
job-level flags, logging, joining Ray, the demo data and one clear error line.

A job is three calls (torchvision's references' shape)::

    def get_args_parser():
        return job_parser(TrainConfig, __doc__, flags=("config", "smoke_test", "resume", "ray_address"))

    def main(args):
        cfg = build_config(TrainConfig, args)
        ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from ..core import BraintumorError, Config, ConfigError, add_config_args, given_settings, read_yaml

# The few flags that are not settings of a stage, declared once for every job.
JOB_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "config": (
        ("--config",),
        dict(
            metavar="FILE.yaml",
            default=None,
            help="settings from a YAML file (local or s3://), e.g. the config.yaml a run saved; "
            "command-line options override it",
        ),
    ),
    "smoke_test": (
        ("--smoke-test",),
        dict(action="store_true", help="tiny and fast: the stage's smoke preset (options given still apply)"),
    ),
    "resume": (
        ("--resume",),
        dict(action="store_true", help="continue the run storage/name from its latest checkpoint"),
    ),
    "ray_address": (
        ("--ray-address",),
        dict(default=None, help="Ray cluster to join (default: $RAY_ADDRESS or a local Ray)"),
    ),
}


def job_parser(cls: type, doc: str | None, *, flags: tuple[str, ...]) -> argparse.ArgumentParser:
    """A job's parser: ``flags`` (names from :data:`JOB_FLAGS`), then one option per setting of ``cls``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("job")
    for name in flags:
        names, kw = JOB_FLAGS[name]
        g.add_argument(*names, dest=name, **kw)
    add_config_args(p, cls, title=f"settings ({cls.__module__.split('._')[0]}.{cls.__name__})")
    return p


def config_dict(
    cls: type[Config], args: argparse.Namespace, *, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The settings as a mapping, in timm's order: job defaults < smoke preset < ``--config`` < options."""
    merged: dict[str, Any] = dict(defaults or {})
    if getattr(args, "smoke_test", False):
        merged = cls.merge(merged, dict(cls.SMOKE))
    if getattr(args, "config", None):
        merged = cls.merge(merged, read_yaml(args.config, s3_endpoint_url=getattr(args, "s3_endpoint_url", None)))
    return cls.merge(merged, given_settings(args, cls))


def build_config(cls: type[Config], args: argparse.Namespace, *, defaults: dict[str, Any] | None = None) -> Any:
    """The stage's config object from ``--config`` and the options (see :func:`config_dict`)."""
    return cls.from_dict(config_dict(cls, args, defaults=defaults))


def join_ray(address: str | None) -> None:
    """Join the cluster at ``address``; with None the stage itself joins $RAY_ADDRESS or starts a local Ray."""
    if address:
        import ray

        ray.init(address=address)


DEMO_DIR = "demo"  # the embedded default lives here, relative to the working directory


def demo_data(*, small: bool) -> str:
    """The embedded default: generate a sample and ingest it (as jobs/preprocess.py does) into ./demo.

    Returns the preprocessed folder. ``small``: 64 px and fewer images, for smoke tests.
    """
    import os

    from ..imaging import MRIPreprocess, make_sample_dataset
    from ..ingest import IngestConfig, run_ingest

    sample = os.path.abspath(os.path.join(DEMO_DIR, "sample"))
    out = os.path.abspath(os.path.join(DEMO_DIR, "preprocessed"))
    make_sample_dataset(sample, per_class=24 if small else 60, test_per_class=6 if small else 15)
    run_ingest(
        IngestConfig(
            input=sample, output=out, overwrite=True, preprocess=MRIPreprocess(image_size=64 if small else 128)
        )
    )
    return out


def refuse_demo_into(settings: dict[str, Any], *, input: str, outputs: tuple[str, ...]) -> None:
    """The embedded default (a generated sample under ./demo) stands in for a missing ``input``
    only when the user named none of ``outputs`` either: a forgotten --input must not fill an
    output someone chose (the ingest's demo once replaced it, --overwrite and all)."""
    named = [k for k in outputs if settings.get(k) is not None]
    if settings.get(input) is None and named:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        raise ConfigError(
            f"{flag(named[0])} {settings[named[0]]} is given but {flag(input)} is not: give {flag(input)}. The generated "
            f"sample is used only when no {' or '.join(flag(k) for k in outputs)} is given, and then only under ./{DEMO_DIR}"
        )


def run_job(work: Callable[[], str]) -> int:
    """Run a job's work and print its summary; a BraintumorError becomes one ``error:`` line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("braintumor_ray").setLevel(logging.INFO)
    try:
        summary = work()
    except BraintumorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0
