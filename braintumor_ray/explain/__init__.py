"""Class-activation maps (Grad-CAM) of a model package's backbone: what the model looked at.

    ex = Explainer.from_package("s3://bucket/runs/r1/model")    # or Explainer(model, mean=..., std=...)
    maps = ex.heatmaps(pixels)             # MRIPreprocess output (N, H, W) uint8 -> (N, H, W) 0..1
    png = overlay_png(pixels[0], maps[0])  # the scan in grey, the map blended on top
    y, x = heatmap_peak(maps[0])           # in the preprocessed image; imaging.original_xy maps it back
"""

from ._cam import DEFAULT_BATCH, Explainer, colorize, heatmap_peak, overlay, overlay_png, target_layer

__all__ = ["DEFAULT_BATCH", "Explainer", "colorize", "heatmap_peak", "overlay", "overlay_png", "target_layer"]
