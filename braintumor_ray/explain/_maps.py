"""Heat maps from the forward pass (CAM), the hot spot and the PNG a person looks at: numpy and
OpenCV only, no PyTorch (what a model replica that runs ONNX Runtime loads).

For a head that is global average pooling then a linear layer (every backbone the project
trains; :func:`braintumor_ray.models.linear_head`), the gradient of a class's logit with respect
to the final feature map ``F`` is that class's weights over the map's positions, so Grad-CAM at
that layer is ``ReLU(sum_c W[class, c] F[c]) / (h w)``: the class-activation map (Zhou et al.
2016), which the model gives as one more output of the same forward pass (the ``cam`` output of
``model.onnx``, and of the PyTorch model). :func:`cam_heatmaps` then does what
pytorch-grad-cam does to a layer's map (ReLU, scale to 0..1, bilinear upsampling, scale again),
so the two agree to float rounding (tests/explain/test_explain.py).
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from ..core import InputError


def cam_heatmaps(cam: np.ndarray, classes: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Class-activation maps (N, classes, h, w), before ReLU -> the heat map of each image for
    its class (``classes``: one index per image), float32 (N, H, W) scaled to 0..1 (all zeros
    where nothing in the map speaks for the class); ``size``: (H, W) of the images."""
    import cv2

    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 4:
        raise InputError(f"expected class-activation maps shaped (N, classes, h, w), got {cam.shape}")
    if len(classes) != len(cam):
        raise InputError(f"{len(classes)} classes for {len(cam)} maps: give one target class per image")
    h, w = cam.shape[2:]
    out = np.zeros((len(cam), *size), np.float32)
    for i, c in enumerate(classes):
        m = np.maximum(cam[i, int(c)] / np.float32(h * w), 0)  # Grad-CAM's weights are the mean gradient: W / (h w)
        m = m - m.min()
        m = cv2.resize(m / (np.float32(1e-7) + m.max()), (size[1], size[0]))  # bilinear, as pytorch-grad-cam
        m = np.maximum(m, 0)
        m = m - m.min()
        out[i] = m / (np.float32(1e-7) + m.max())
    return out


def heatmap_peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(y, x) of the map's hot spot: the centre of the region where the map is at least half its
    maximum, connected to the maximum, each pixel weighted by the map's value (or, when that
    centre is outside the region, as for a ring, the region's pixel nearest to it).

    Not the hottest pixel: the map is a 7 x 7 grid (at 224 px) upsampled bilinearly, so its
    maximum always sits on a grid cell's centre, 32 px apart, and a lesion smaller than a cell
    or between two cells is missed. On the sample generator's images (tests/explain/test_explain.py,
    Lite0 fine-tuned at 224 px, three seeds) the hottest pixel fell inside the lesion box for
    25-34% of correctly classified tumour images, this centre for 98-100%.
    """
    import cv2

    h = np.asarray(heatmap, dtype=np.float32)
    if h.ndim != 2 or h.size == 0:
        raise InputError(f"expected one 2-D heat map, got shape {h.shape}")
    if not np.isfinite(h).all():
        h = np.nan_to_num(h)
    top = np.unravel_index(int(np.argmax(h)), h.shape)
    if h[top] <= 0:
        return int(top[0]), int(top[1])
    # OpenCV's labelling and moments (4-connected, as scipy.ndimage.label's default): 0.3 ms a
    # 224 px map against 1.5 ms for the same centre with ndimage and numpy in float64, which was
    # a third of a map's cost in a scoring replica (2026-12-07).
    _, regions = cv2.connectedComponents((h >= 0.5 * h[top]).view(np.uint8), connectivity=4)
    hot = regions == regions[top]
    m = cv2.moments(np.where(hot, h, np.float32(0)))
    cy, cx = m["m01"] / m["m00"], m["m10"] / m["m00"]
    y, x = int(round(cy)), int(round(cx))
    if not hot[y, x]:  # a ring or a crescent: its centre is cold; the nearest hot pixel instead
        ys, xs = np.nonzero(hot)
        k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        y, x = int(ys[k]), int(xs[k])
    return y, x


def _unit(heatmap: np.ndarray) -> np.ndarray:
    """The map as float32 in 0..1, NaN as 0 (copied only when it has one)."""
    h = np.asarray(heatmap, np.float32)
    return np.clip(h if np.isfinite(h).all() else np.nan_to_num(h), 0, 1)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """A 0..1 map as RGB uint8 (the JET colour map that Grad-CAM figures use: blue cold, red hot)."""
    return _jet((_unit(heatmap) * 255).astype(np.uint8))


def _jet(levels: np.ndarray) -> np.ndarray:
    """uint8 levels (H, W) -> their JET colours, RGB uint8 (H, W, 3)."""
    import cv2

    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """The scan in grey with the map blended on top: RGB uint8 (H, W, 3).

    The map's weight grows with its value (``alpha`` at the peak, none where it is 0), so the
    parts the model did not look at show the plain scan, not a blue wash.
    """
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise InputError(f"expected one uint8 greyscale image (H, W), got {img.dtype} {img.shape}")
    h = _unit(heatmap)
    if h.ndim != 2:
        raise InputError(f"expected one 2-D heat map, got shape {h.shape}")
    if h.shape != img.shape:
        h = cv2.resize(h, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    # Each output pixel depends on its grey level and its map level alone: one lookup in a table
    # of the 256 x 256 blends, 0.26 ms CPU a 224 px map against 1.5 ms for OpenCV's per-pixel
    # blendLinear (at most 1 grey level apart: the weight from the map's 8-bit level; 2026-12-07).
    levels = (h * 255).astype(np.uint8)
    return np.take(_blend_table(float(alpha)), (img.astype(np.uint16) << 8) | levels, axis=0)


@functools.lru_cache(maxsize=4)
def _blend_table(alpha: float) -> np.ndarray:
    """(256 * 256, 3) uint8: row ``grey << 8 | level`` is that grey blended with the colour map's
    colour of that level, the colour's weight ``alpha * level / 255``."""
    q = np.arange(256, dtype=np.float32)
    colour = _jet(np.arange(256, dtype=np.uint8).reshape(1, 256))[0].astype(np.float32)  # (256, 3)
    w = (np.float32(alpha) * q / np.float32(255))[None, :, None]
    table = (1 - w) * q[:, None, None] + w * colour[None, :, :]
    return np.rint(table).astype(np.uint8).reshape(256 * 256, 3)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.5) -> bytes:
    """:func:`overlay` as the bytes of a PNG."""
    return rgb_png(overlay(image, heatmap, alpha=alpha))


def rgb_png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image (H, W, 3) as the bytes of a PNG: every row with PNG's "up" filter, then
    deflate by ISA-L (python-isal) at its level 1, or zlib's when isal is not installed.

    0.48 ms CPU a 224 px overlay, against 1.7 ms for OpenCV's encoder at zlib level 1 with the
    same filter (1.7 ms at level 0 too: libpng's own work, not deflate) and 1.4 ms with zlib here;
    the PNGs 7% larger (75 kB against 70 kB on Testing images; benchmarks/bench_map_cost.py,
    2026-12-07). The PNG was most of a map's cost in a scoring replica.
    """
    img = np.ascontiguousarray(rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    rows = img.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2  # the filter type of each row: "up", the difference from the row above
    raw[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wraps modulo 256, as PNG's filter does

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, adaptive filters, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", _deflate(raw.tobytes())) + chunk(b"IEND", b"")


def _deflate(data: bytes) -> bytes:
    """A zlib stream of ``data``: ISA-L's level 1 (~3x zlib's speed here), or zlib's level 1."""
    try:
        from isal import isal_zlib
    except ImportError:  # isal is a dependency; zlib keeps a checkout without it working
        return zlib.compress(data, 1)
    return isal_zlib.compress(data, 1)
