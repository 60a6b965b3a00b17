"""braintumor-ray: brain-MRI tumour classification by transfer learning on Ray."""

from ._errors import BraintumorError, ConfigError, InputError, StorageError
from ._labels import CLASS_NAMES, canonical_label
from ._sample import make_sample_dataset
from .transforms import MRIPreprocess

__all__ = [
    "CLASS_NAMES",
    "BraintumorError",
    "ConfigError",
    "InputError",
    "MRIPreprocess",
    "StorageError",
    "canonical_label",
    "make_sample_dataset",
]

__version__ = "0.1.0"
