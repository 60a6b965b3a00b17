"""The settings the ingest and scoring both read an input with, declared once.

:class:`InputSettings` is a base of ``IngestConfig`` and ``ScoreConfig`` (as Ray's libraries
share config pieces by inheritance): each field below is the one declaration of its option, YAML
key, default, help and check, so the two stages cannot drift apart (the same file gets the same
token in both stages' outputs only while their ``path_mode`` means the same). A stage's own
fields come first on its command line and in ``config.yaml`` (:func:`~._config.config_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import Config, setting
from ._paths import PathMode, UidMode, check_modes
from ._storage import MAX_FOLDER_DEPTH, check_folder_depth


@dataclass(frozen=True, kw_only=True)
class InputSettings(Config):
    """Where an input lives and how the outputs made from it name its files."""

    s3_endpoint_url: str | None = setting(None, help="S3-compatible endpoint", env="AWS_ENDPOINT_URL")
    path_mode: PathMode = setting(
        "full",
        help="how outputs (the ingest's shards, errors.parquet and report.json; scoring's predictions and "
        "reports) name input files: full = the URI; relative = the path below input; hashed = an HMAC-SHA256 "
        "token keyed by $BRAINTUMOR_PATH_KEY (same file, same token, in both stages; for folder names that "
        "identify patients). Fixed for an output",
    )
    uid_mode: UidMode = setting(
        "full",
        help="DICOM UIDs in outputs: full, or hashed (a 2.25. UID keyed as path_mode's; series still group, "
        "and the ingest's split still keeps a series together). Fixed for an output",
    )
    max_folder_depth: int = setting(
        MAX_FOLDER_DEPTH,
        help="folders a listing descends below the input; a folder deeper than this is "
        "an error row naming it, its files unread",
    )

    def __post_init__(self) -> None:
        """The checks of these fields: a stage's own ``__post_init__`` ends with ``super().__post_init__()``."""
        check_modes(self.path_mode, self.uid_mode)
        check_folder_depth(self.max_folder_depth)
