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
