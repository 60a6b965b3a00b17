"""Configs meet storage: a ``--config`` file read from local disk or ``s3://``.

Apart from ``_config`` (which parses text and knows no storage) so that ``_storage``, whose
settings are declared with ``_config.setting``, and ``_config`` form no cycle.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._config import Config, parse_yaml
from ._storage import resolve

C = TypeVar("C", bound=Config)


def read_yaml(uri: str, *, s3_endpoint_url: str | None = None) -> dict[str, Any]:
    """A YAML mapping from a local path or ``s3://`` URI (:func:`parse_yaml`'s bounds)."""
    return parse_yaml(resolve(uri, s3_endpoint_url=s3_endpoint_url).read_bytes(), uri)


def load_config(cls: type[C], uri: str, *, s3_endpoint_url: str | None = None) -> C:
    """A ``cls`` from the YAML file at ``uri`` (a saved ``config.yaml``, or a ``--config`` file)."""
    return cls.from_dict(read_yaml(uri, s3_endpoint_url=s3_endpoint_url), where="")
