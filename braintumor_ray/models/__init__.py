"""Model factory: timm backbones with a head for our classes, weights that load offline, packages.

model = create_model("tf_efficientnet_lite0", transfer="last-2")   # offline ImageNet weights
opt = torch.optim.AdamW(param_groups(model, lr=1e-3, backbone_lr_scale=0.1))
export_model_package(model, "s3://bucket/models/run1", preprocess=MRIPreprocess())
pkg = load_model_package("s3://bucket/models/run1"); pkg.logits(pixels)
meta = verify_package("s3://bucket/models/run1")   # model.json parsed and checked once: a PackageMeta
model = load_inference_model("s3://bucket/models/run1", engine="auto"); model.probabilities(pixels)
"""

from ._engine import (
    ENGINES,
    TTA_MODES,
    Engine,
    InferenceModel,
    choose_engine,
    load_inference_model,
    package_has_onnx,
    prepare_input_np,
)
from ._format import (
    FORMAT_VERSION,
    ONNX_FILE,
    PACKAGE_JSON,
    TRUST_FILE,
    WEIGHTS_FILE,
    PackageMeta,
    onnx_unbound_note,
    package_model_id,
)
from ._onnx import ONNX_OPSET, ONNX_TOLERANCE, export_onnx, onnx_session, verify_onnx
from ._package import (
    ModelPackage,
    PackagePin,
    load_model_package,
    pin_package,
    prepare_input,
    read_package_meta,
    read_trust,
    verify_package,
)
from ._registry import resolve_registered_model
from ._writer import export_model_package

# torch and timm take seconds and ~1 GB to import; a model replica that runs ONNX Runtime never
# needs them (nor does anything that only reads a package): these load on first use.
_LAZY = {
    **{
        name: "._factory"
        for name in (
            "PRESETS",
            "Transfer",
            "apply_transfer",
            "backbone_stages",
            "count_parameters",
            "create_model",
            "data_config",
            "has_cam",
            "linear_head",
            "param_groups",
            "WithFeatures",
        )
    },
    **{
        name: "._ensemble"
        for name in ("EnsembleNet", "check_members", "ensemble_from_meta", "member_build", "member_source")
    },
    **{name: "._lite" for name in ("CACHE_ENV", "LITE_CHECKPOINTS", "convert_lukemelas_lite", "lite_offline_weights")},
    **{name: "._weights" for name in ("load_state_dict_into", "read_weights")},
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TRUST_FILE",
    "read_trust",
    "CACHE_ENV",
    "ENGINES",
    "TTA_MODES",
    "EnsembleNet",
    "check_members",
    "ensemble_from_meta",
    "member_build",
    "member_source",
    "Engine",
    "InferenceModel",
    "ONNX_FILE",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "PACKAGE_JSON",
    "PRESETS",
    "WEIGHTS_FILE",
    "ModelPackage",
    "PackageMeta",
    "FORMAT_VERSION",
    "PackagePin",
    "Transfer",
    "WithFeatures",
    "apply_transfer",
    "backbone_stages",
    "choose_engine",
    "convert_lukemelas_lite",
    "count_parameters",
    "create_model",
    "data_config",
    "export_model_package",
    "export_onnx",
    "has_cam",
    "linear_head",
    "lite_offline_weights",
    "LITE_CHECKPOINTS",
    "load_inference_model",
    "load_model_package",
    "load_state_dict_into",
    "onnx_session",
    "onnx_unbound_note",
    "package_has_onnx",
    "pin_package",
    "package_model_id",
    "read_package_meta",
    "resolve_registered_model",
    "param_groups",
    "prepare_input",
    "prepare_input_np",
    "read_weights",
    "verify_onnx",
    "verify_package",
]
