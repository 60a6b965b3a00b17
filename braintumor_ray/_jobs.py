"""What every driver in jobs/ does around its work: logging, joining Ray, one clear error line."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from ._errors import BraintumorError


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

    from ._sample import make_sample_dataset
    from .ingest import IngestConfig, run_ingest
    from .transforms import MRIPreprocess

    sample = os.path.abspath(os.path.join(DEMO_DIR, "sample"))
    out = os.path.abspath(os.path.join(DEMO_DIR, "preprocessed"))
    make_sample_dataset(sample, per_class=24 if small else 60, test_per_class=6 if small else 15)
    run_ingest(IngestConfig(input=sample, output=out, overwrite=True,
                            preprocess=MRIPreprocess(image_size=64 if small else 128)))
    return out


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
