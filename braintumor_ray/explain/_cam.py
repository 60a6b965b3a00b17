"""Grad-CAM on the last feature stage of a timm CNN, batched (the gradient-based maps: for heads
other than global pooling + linear, or on request; :mod:`._maps` has the forward-pass CAM).

The map is pytorch-grad-cam's ``GradCAM`` on the module that timm's ``feature_info`` names as
the backbone's last feature stage (ResNet ``layer4``, EfficientNet ``blocks.6``, VGG
``features.N``, Xception ``act4``): the finest layer that still sees the whole image, the one
Grad-CAM's authors used. Its resolution is that stage's stride (32 px for every backbone the
project trains): at 224 px a 7 x 7 grid, bilinearly upsampled, so a peak is good to one cell.

Two things differ from calling ``GradCAM`` on the model as it is:

* The network is a private copy with frozen parameters, and the target layer's output is cut
  from the graph (detached, then made a leaf that wants a gradient): the backward pass runs
  from the logits to that layer only, not through the backbone into the weights. Same map,
  4.4x faster on the CPU (Lite0, 224 px; docs/benchmarks.md), and the caller's model (a training
  model, say) keeps its gradients and ``requires_grad`` flags.
* The class each map is for is given per image (scoring passes its calibrated prediction);
  by default the model's own top class.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import ConfigError, InputError
from ..models import WithFeatures, load_model_package, prepare_input

logger = logging.getLogger(__name__)

#: Images per forward/backward pass: bounds memory at large image sizes.
DEFAULT_BATCH = 32


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if isinstance(model, WithFeatures):  # scoring's (logits, features) wrapper of a timm classifier
        model = model.model
    return model


def target_layer(model: nn.Module) -> tuple[str, nn.Module, int]:
    """(name, module, channels) of the last feature stage that timm's ``feature_info`` names."""
    model = _unwrap(model)
    info = getattr(model, "feature_info", None)
    if info is not None and not isinstance(info, (list, tuple)):
        info = getattr(info, "info", None)  # timm's FeatureInfo (features_only models)
    last = info[-1] if info else {}
    name = last.get("module")
    if not name:
        raise ConfigError(
            f"{type(model).__name__} has no feature_info naming its last feature stage, so there is no layer to "
            "take a class-activation map from: explain a timm CNN backbone (EfficientNet, ResNet, VGG, Xception...), "
            "or score with --explain none"
        )
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise ConfigError(
            f"{type(model).__name__}: feature_info names {name!r}, which is not one of its modules ({e}); "
            "score with --explain none"
        ) from e
    return name, module, int(last.get("num_chs") or 0)


class Explainer:
    """Grad-CAM heat maps of a classifier, for preprocessed uint8 images.

        ex = Explainer(model, mean=cfg["mean"], std=cfg["std"])   # or Explainer.from_package(uri)
        maps = ex.heatmaps(images)                # (N, H, W) uint8 -> (N, H, W) float32 in 0..1
        maps = ex.heatmaps(images, classes=[0, 3])  # the class each map is for (default: predicted)

    ``model`` is copied (frozen, eval mode) and left as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH,
        device: str | torch.device | None = None,
        channels_last: bool | None = None,
        copy_model: bool = True,
        layer: str | None = None,
    ) -> None:
        from pytorch_grad_cam import GradCAM

        net = _unwrap(model)
        # ``layer``: another module than the last feature stage (e.g. the final feature map, where
        # Grad-CAM is the forward pass's CAM; tests/explain/test_explain.py).
        self.layer_name, _, self.channels = target_layer(net) if layer is None else (layer, net.get_submodule(layer), 0)
        net = copy.deepcopy(net) if copy_model else net
        first = next(net.parameters(), None)
        self.device = (
            torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        )
        # NHWC is what depthwise-conv backbones (Lite0, EfficientNet) run fastest in on CPU.
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        net = net.to(self.device, torch.float32).to(memory_format=fmt).eval().requires_grad_(False)
        self.model = net
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.class_names = tuple(class_names) if class_names is not None else None
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        cut = net.get_submodule(self.layer_name)
        # Registered before GradCAM's own hooks, so theirs see (and hook the gradient of) the cut tensor.
        cut.register_forward_hook(self._cut)
        self._cam = GradCAM(model=net, target_layers=[cut], reshape_transform=self._to_nchw)

    @classmethod
    def from_package(
        cls,
        model_uri: str,
        s3_endpoint_url: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH,
        pin: Any = None,
    ) -> Explainer:
        """The explainer of an exported model package (local or ``s3://``), with its normalisation
        (``pin``: the files the job verified, see :class:`~braintumor_ray.models.PackagePin`)."""
        pkg = load_model_package(model_uri, s3_endpoint_url=s3_endpoint_url, pin=pin)
        cfg = pkg.data_config
        return cls(
            pkg.model,
            mean=cfg["mean"],
            std=cfg["std"],
            class_names=pkg.class_names,
            batch_size=batch_size,
            device=device,
            copy_model=False,
        )

    def _cut(self, module: nn.Module, args: Any, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"{type(self.model).__name__}.{self.layer_name} gives {shape}, not a 2-D feature map (N, C, H, W): "
                "Grad-CAM here needs a CNN backbone (a vision transformer's tokens are not supported); score with "
                "--explain none"
            )
        # A leaf that wants a gradient: backward stops here (see the module docstring). The
        # clone keeps an in-place op after the layer (a ReLU) legal.
        return out.detach().requires_grad_(True).clone()

    def _to_nchw(self, t: torch.Tensor) -> torch.Tensor:
        # Some timm stages (Swin-style, ConvNeXt variants) return NHWC maps.
        if self.channels and t.ndim == 4 and t.shape[1] != self.channels and t.shape[-1] == self.channels:
            return t.permute(0, 3, 1, 2)
        return t

    def _class_indices(self, classes: Sequence[int | str], n: int) -> list[int]:
        if len(classes) != n:
            raise InputError(f"{len(classes)} classes for {n} images: give one target class per image")
        out = []
        for c in classes:
            if isinstance(c, str):
                if self.class_names is None or c not in self.class_names:
                    raise InputError(
                        f"class {c!r} is not one of the model's classes {self.class_names}: give its index"
                    )
                c = self.class_names.index(c)
            out.append(int(c))
        return out

    def heatmaps(self, images: np.ndarray, classes: Sequence[int | str] | None = None) -> np.ndarray:
        """Grad-CAM of each image for its class: float32 (N, H, W), each map scaled to 0..1
        (all zeros where nothing in the layer speaks for the class).

        ``images``: uint8 (N, H, W) or (H, W), preprocessed as the model sees them
        (:class:`~braintumor_ray.imaging.MRIPreprocess` output). ``classes``: one class index or
        name per image; default, the class the model predicts.
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = np.asarray(images)
        if x.ndim == 2:
            x = x[None]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise InputError(
                f"expected uint8 greyscale images shaped (N, H, W), got {x.dtype} {x.shape}: pass MRIPreprocess output"
            )
        n = len(x)
        targets = self._class_indices(classes, n) if classes is not None else None
        out = np.zeros(x.shape, dtype=np.float32)
        with torch.inference_mode(False), torch.enable_grad():
            for s in range(0, n, self.batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(x[s : s + self.batch_size])).to(self.device)
                inp = prepare_input(chunk, mean=self.mean, std=self.std, channels_last=self.channels_last)
                tg = None if targets is None else [ClassifierOutputTarget(c) for c in targets[s : s + self.batch_size]]
                out[s : s + len(chunk)] = self._cam(input_tensor=inp, targets=tg)
        return out
