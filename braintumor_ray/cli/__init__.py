"""What every driver in ``jobs/`` shares: generated parsers, job flags, logging, Ray, one error line."""

from ._jobs import (
    DEMO_DIR,
    JOB_FLAGS,
    build_config,
    config_dict,
    demo_data,
    job_parser,
    join_ray,
    refuse_demo_into,
    run_job,
)

__all__ = [
    "DEMO_DIR",
    "JOB_FLAGS",
    "build_config",
    "config_dict",
    "demo_data",
    "job_parser",
    "join_ray",
    "refuse_demo_into",
    "run_job",
]
