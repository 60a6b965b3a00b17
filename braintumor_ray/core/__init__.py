"""Infrastructure every stage shares: errors, class names, storage (local or ``s3://``), configs.

Nothing here imports torch, timm or Ray: the ingest's Ray workers and the jobs' argument
parsing stay light.
"""

from ._config import CONFIG_FILE, CliOption, Config, add_config_args, cli_options, deep_merge, given_settings, parse_yaml, setting
from ._config_io import load_config, read_yaml
from ._errors import BraintumorError, ConfigError, ImageDecodeError, InputError, StorageError
from ._paths import PATH_KEY_ENV, Identifiers, PathMode, UidMode, check_modes
from ._labels import CLASS_NAMES, SPLIT_ALIASES, canonical_label, canonical_split
from ._lease import LEASE_SUFFIX, Lease, LeaseError, current_lease, lease_location
from ._staging import (DONE_MARKER, MANIFEST_FILE, STAGING_SUFFIX, CommittedFile, Manifest, StagedWriter, committed_table,
                       latest_mask, latest_rows, posix_basename, remove_child)
from ._storage import (LINK_OUTSIDE, MAX_FOLDER_DEPTH, Listing, Location, check_disjoint, check_folder_depth,
                       folder_depth_setting, is_no_space, local_version, no_space_message, resolve, s3_filesystem,
                       same_version, unreadable_reason)

__all__ = [
    "CONFIG_FILE",
    "CliOption",
    "Config",
    "add_config_args",
    "cli_options",
    "deep_merge",
    "given_settings",
    "load_config",
    "parse_yaml",
    "read_yaml",
    "setting",
    "CLASS_NAMES",
    "SPLIT_ALIASES",
    "BraintumorError",
    "ConfigError",
    "ImageDecodeError",
    "InputError",
    "Identifiers",
    "LINK_OUTSIDE",
    "MAX_FOLDER_DEPTH",
    "check_folder_depth",
    "folder_depth_setting",
    "Listing",
    "Location",
    "PATH_KEY_ENV",
    "PathMode",
    "UidMode",
    "check_modes",
    "StorageError",
    "canonical_label",
    "canonical_split",
    "check_disjoint",
    "resolve",
    "s3_filesystem",
    "unreadable_reason",
    "DONE_MARKER",
    "MANIFEST_FILE",
    "CommittedFile",
    "Manifest",
    "is_no_space",
    "local_version",
    "no_space_message",
    "same_version",
    "STAGING_SUFFIX",
    "StagedWriter",
    "LEASE_SUFFIX",
    "Lease",
    "LeaseError",
    "current_lease",
    "lease_location",
    "posix_basename",
    "remove_child",
    "committed_table",
    "latest_mask",
    "latest_rows",
]
