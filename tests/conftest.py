"""The suite's environment and its shared fixtures, loaded from tests/fixtures/ (one module per
kind: the session's Ray, S3, generated data, model packages, servers). tests/README.md maps the
test folders to the package."""

from __future__ import annotations

import os

import pytest

# Fake credentials for the moto server. Set before any Ray worker starts, because workers
# inherit the environment and build their own S3 clients. Instance-metadata lookups are
# switched off so botocore never reaches for a link-local address.
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ[_k] = _v
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# No test may reach a model hub; the tests that probe one point it at loopback themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Rewritten asserts in the fixture modules too: the imports below load them before pytest_plugins does.
pytest.register_assert_rewrite("fixtures")
pytest_plugins = ["fixtures.ray_session", "fixtures.ray_head", "fixtures.s3", "fixtures.data", "fixtures.models", "fixtures.services"]

# The helpers tests import by name (`from conftest import load_job`); their homes are the fixture modules.
from fixtures.data import load_job, mri_like  # noqa: E402
from fixtures.ray_session import KILL_DECODE_FILE, TRAIN_FAILING_RUN  # noqa: E402
from fixtures.s3 import upload_tree  # noqa: E402
from fixtures.services import PACS_AET, SCORER_AET  # noqa: E402

__all__ = ["KILL_DECODE_FILE", "PACS_AET", "SCORER_AET", "TRAIN_FAILING_RUN", "load_job", "mri_like", "upload_tree"]
