"""Class-activation maps of a model package's backbone: what the model looked at.

    maps = cam_heatmaps(cam, classes, size=(224, 224))  # the model's ``cam`` output (same forward pass)
    ex = Explainer.from_package("s3://bucket/runs/r1/model")    # or Grad-CAM: Explainer(model, mean=..., std=...)
    maps = ex.heatmaps(pixels)             # MRIPreprocess output (N, H, W) uint8 -> (N, H, W) 0..1
    png = overlay_png(pixels[0], maps[0])  # the scan in grey, the map blended on top
    y, x = heatmap_peak(maps[0])           # in the preprocessed image; imaging.original_xy maps it back

Grad-CAM (:class:`Explainer`) needs PyTorch; the rest is numpy and OpenCV, and importing this
package does not import PyTorch (a model replica that runs ONNX Runtime stays without it).
"""

from ._maps import cam_heatmaps, colorize, heatmap_peak, overlay, overlay_png

_LAZY = ("DEFAULT_BATCH", "Explainer", "target_layer")


def __getattr__(name: str):
    if name in _LAZY:
        from . import _cam

        return getattr(_cam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BATCH",
    "Explainer",
    "cam_heatmaps",
    "colorize",
    "heatmap_peak",
    "overlay",
    "overlay_png",
    "target_layer",
]
