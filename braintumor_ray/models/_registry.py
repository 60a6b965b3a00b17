"""``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``: a registered model's package folder,
fetched where every node of a job can read it when the registry keeps it in its own store.

The registry's lookup is :mod:`braintumor_ray.tracking`'s; the files and the check that they are
the registered package are this package's. mlflow is imported only for a ``models:/`` URI
(scoring by folder never imports it)."""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from typing import Any

from ..core import ConfigError, Location, resolve
from ..tracking import MODELS_SCHEME, MLflowConfig, RegisteredVersion, find_registered_version
from ._package import read_package_meta

logger = logging.getLogger(__name__)


def resolve_registered_model(config: Any, *, fetch_to: Location | None = None) -> tuple[Any, dict[str, str] | None]:
    """``config`` with ``model`` a package folder. ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``
    is looked up in the registry at ``config.mlflow.tracking_uri``: its source folder is used as it is
    when local or ``s3://``, otherwise (a server-side artifact store, ``mlflow-artifacts:/``)
    downloaded into ``fetch_to``, a folder every node of the job can read (scoring: beside its
    output; the caller removes it), or a temporary folder without one; the package's ``model_id``
    must be the one the version is tagged with. Returns the config and the version's description."""
    if not str(config.model).startswith(MODELS_SCHEME):
        return config, None
    mc: MLflowConfig = config.mlflow
    found = find_registered_version(config.model, mc)
    path = _package_folder(found, mc, fetch_to)
    meta = read_package_meta(resolve(path, s3_endpoint_url=config.s3_endpoint_url))
    if meta.model_id != found.model_id:
        raise ConfigError(
            f"{config.model}: the package at {found.source} has model_id {meta.model_id}, "
            f"but the version is tagged {found.model_id}: not the registered package"
        )
    logger.info(
        "MLflow: %s is version %s of %s (%s), at %s", config.model, found.version, found.name, meta.model_id, path
    )
    return config.replace(model=path), {
        "uri": config.model,
        "name": found.name,
        "version": found.version,
        "source": found.source,
        "model_id": found.model_id,
        "fetched_to": path,
    }


def _package_folder(found: RegisteredVersion, mc: MLflowConfig, fetch_to: Location | None) -> str:
    """The version's package folder: its source when a job's nodes can read it (a folder, s3://),
    else a copy fetched into ``fetch_to`` (or a temporary folder without one)."""
    src = found.source.removeprefix("file://")
    if src.startswith("s3://") or os.path.isdir(src):
        return src
    if fetch_to is not None:
        return _fetch(src, mc, fetch_to)
    import mlflow.artifacts

    dst = tempfile.mkdtemp(prefix=f"braintumor-{found.name}-v{found.version}-")
    return mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=dst, tracking_uri=mc.tracking_uri)


def _fetch(src: str, mc: MLflowConfig, dest: Location) -> str:
    """A registered package's artifacts copied into ``dest`` (local or ``s3://``): its folder."""
    import mlflow.artifacts

    if not dest.is_s3:
        os.makedirs(dest.path, exist_ok=True)
        return mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=dest.path, tracking_uri=mc.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="braintumor-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=tmp, tracking_uri=mc.tracking_uri)
        folder = dest.join(posixpath.basename(local.rstrip(os.sep)))
        for root, _, names in os.walk(local):
            for n in names:
                p = os.path.join(root, n)
                with open(p, "rb") as f:
                    folder.join(os.path.relpath(p, local).replace(os.sep, "/")).write_bytes(f.read())
    return folder.uri
