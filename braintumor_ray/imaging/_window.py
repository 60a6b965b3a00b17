"""Pixel values -> 8-bit grey, shared by both formats: the DICOM VOI window and the percentile window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The robust window when a file names none: these percentiles of its pixels map to 0 and 255.
PERCENTILE_WINDOW = (0.5, 99.5)
# The percentiles of a large volume are taken on an even sample of this many voxels: the same
# window to within a grey level, at a fraction of the time.
_PERCENTILE_SAMPLE = 2_000_000


def _to_u8(y: np.ndarray) -> np.ndarray:
    # Round half up: the same grey level a person gets by hand (numpy's rint rounds half to even).
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def voi_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2: values -> 0..255 through a window; ``width`` >= 1 (> 0 for LINEAR_EXACT)."""
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        return _to_u8(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width)))
    if function == "LINEAR_EXACT":
        return _to_u8(np.clip((x - center) / width + 0.5, 0.0, 1.0) * 255.0)
    if width <= 1:
        return np.where(x <= center - 0.5, 0, 255).astype(np.uint8)
    return _to_u8(np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0)


def percentile_window(x: np.ndarray, percentiles: tuple[float, float] = PERCENTILE_WINDOW) -> np.ndarray:
    """Values -> 0..255 with the given percentiles of ``x`` itself as black and white."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.ravel()
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // _PERCENTILE_SAMPLE)]
    return _stretch(x, _percentile_levels(flat, percentiles))


def _percentile_levels(
    sample: np.ndarray, percentiles: tuple[float, float] = PERCENTILE_WINDOW
) -> tuple[float, float] | None:
    """The black and white levels of :func:`percentile_window`, from its sample of the values
    (None: no usable range, all black). Volumes take it once, then window slice by slice."""
    sample = np.asarray(sample, dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if hi <= lo:  # mostly one value (an empty slab): fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else None


# The background inside the range: the most common value of the slices' edges (where a head
# volume's field of view is empty), when it also fills at least this share of the volume.
# nnU-Net's nonzero-mask normalisation leaves the background at 0 among the head's z-scores.
# Why the edges: a head's own flat value can fill that share too (a CT's bone window leaves the
# skull at one grey level over 13-19% of a Testing image) but lies inside the head, not on the
# edges. Why 10%: z-scored with the background at 0, the 3,264 JPEGs of the real data have it
# found in 3,134 of the 3,202 that have a background; it fills under 10% in most of the 68 missed
# (median 3.4%: a head cropped to the frame), where left in the window it barely moves it.
BACKGROUND_SHARE = 0.10
# The edges' most common value is counted on an even sample of at most this many of them.
_EDGE_SAMPLE = 200_000


@dataclass(frozen=True)
class HeadWindow:
    """A volume's window taken on its head: ``levels`` (black, white; None: all black) and the
    background values inside the range (``black``), which map to black whatever the window."""

    levels: tuple[float, float] | None
    black: tuple[float, ...] = ()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = _stretch(x, self.levels)
        if self.black:
            x = np.asarray(x)
            for v in self.black:
                out[x == v] = 0
        return out


def background_values(finite: np.ndarray, edges: np.ndarray, share: float = BACKGROUND_SHARE) -> tuple[float, ...]:
    """The background inside the range of ``finite`` (a volume's finite values, float64): the most
    common value of ``edges`` (its slices' edge voxels) when it lies strictly inside the range and
    fills at least ``share`` of ``finite``; else none. The minimum is left to :func:`head_levels`,
    and the maximum is never background (a head whose white saturates is still a head)."""
    edges = np.asarray(edges, dtype=np.float64)
    edges = edges[np.isfinite(edges)]
    if finite.size == 0 or edges.size == 0:
        return ()
    values, counts = np.unique(edges[:: max(1, edges.size // _EDGE_SAMPLE)], return_counts=True)
    v = values[counts.argmax()]
    if finite.min() < v < finite.max() and np.count_nonzero(finite == v) >= share * finite.size:
        return (float(v),)
    return ()


def head_levels(
    sample: np.ndarray, edges: np.ndarray | None = None, percentiles: tuple[float, float] = PERCENTILE_WINDOW
) -> HeadWindow:
    """:func:`_percentile_levels` of a volume's head: its voxels other than its background, which
    is the volume's minimum and, given the slices' ``edges``, :func:`background_values`.

    Skull-stripped, z-scored and bias-corrected volumes set their background to one value, at the
    bottom of the range (0 in a raw strip, the most negative value after z-scoring) or inside it
    (0 after nnU-Net's nonzero-mask z-score): taken with the head, it moves the percentiles with
    the share of the field of view that is empty, and one inside the range comes out grey, so the
    crop keeps the whole field of view. On the head's voxels alone, the raw and the z-scored copy
    of a volume (an affine map of the head) get the same window, and the background is black
    (below the window, or mapped to black)."""
    sample = np.asarray(sample, dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size:
        black = background_values(finite, edges) if edges is not None else ()
        head = finite[finite > finite.min()]
        for v in black:
            head = head[head != v]
        if head.size:
            return HeadWindow(_percentile_levels(head, percentiles), black)
    return HeadWindow(_percentile_levels(finite, percentiles))


def _stretch(x: np.ndarray, levels: tuple[float, float] | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if levels is None:
        return np.zeros(x.shape, np.uint8)
    lo, hi = levels
    return _to_u8(np.nan_to_num((x - lo) * (255.0 / (hi - lo)), nan=0.0))


def _frames_sample(frames, n: int, frame_size: int) -> np.ndarray:
    """:func:`percentile_window`'s sample of a stack of ``n`` frames of ``frame_size`` values,
    taken frame by frame: the same values as from the stacked (n, rows, cols) array."""
    step = -(-(n * frame_size) // _PERCENTILE_SAMPLE) if n * frame_size > _PERCENTILE_SAMPLE else 1
    parts = [np.asarray(f, dtype=np.float64).ravel()[(-k * frame_size) % step :: step] for k, f in enumerate(frames)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601-2, what Pillow's convert("L") uses for the JPEGs.
    rgb = rgb.astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
