"""braintumor-ray: brain-MRI tumour classification by transfer learning on Ray.

Stages: ``braintumor_ray.ingest`` (MRI folders -> preprocessed Parquet), ``braintumor_ray.models``
(timm backbones, offline weights, model packages). Jobs in ``jobs/`` drive them.
"""

from .core import CLASS_NAMES, BraintumorError, ConfigError, InputError, StorageError, canonical_label
from .imaging import MRIPreprocess, make_sample_dataset

# torch and timm take seconds to import; the ingest's Ray workers never need them.
_LAZY = {
    name: "braintumor_ray.models"
    for name in (
        "ModelPackage",
        "create_model",
        "data_config",
        "export_model_package",
        "load_model_package",
        "param_groups",
        "prepare_input",
    )
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'braintumor_ray' has no attribute {name!r}")


__all__ = [
    "CLASS_NAMES",
    "BraintumorError",
    "ConfigError",
    "InputError",
    "MRIPreprocess",
    "ModelPackage",
    "StorageError",
    "canonical_label",
    "create_model",
    "data_config",
    "export_model_package",
    "load_model_package",
    "make_sample_dataset",
    "param_groups",
    "prepare_input",
]

__version__ = "0.1.0"
