"""Infrastructure every stage shares: errors, class names, storage (local or ``s3://``), configs.

Nothing here imports torch, timm or Ray: the ingest's Ray workers and the jobs' argument
parsing stay light.
"""

from ._config import CONFIG_FILE, CliOption, Config, add_config_args, cli_options, deep_merge, given_settings, read_yaml, setting
from ._errors import BraintumorError, ConfigError, ImageDecodeError, InputError, StorageError
from ._labels import CLASS_NAMES, SPLIT_ALIASES, canonical_label, canonical_split
from ._staging import DONE_MARKER, STAGING_SUFFIX, StagedWriter, posix_basename
from ._storage import Location, resolve, s3_filesystem

__all__ = [
    "CONFIG_FILE",
    "CliOption",
    "Config",
    "add_config_args",
    "cli_options",
    "deep_merge",
    "given_settings",
    "read_yaml",
    "setting",
    "CLASS_NAMES",
    "SPLIT_ALIASES",
    "BraintumorError",
    "ConfigError",
    "ImageDecodeError",
    "InputError",
    "Location",
    "StorageError",
    "canonical_label",
    "canonical_split",
    "resolve",
    "s3_filesystem",
    "DONE_MARKER",
    "STAGING_SUFFIX",
    "StagedWriter",
    "posix_basename",
]
