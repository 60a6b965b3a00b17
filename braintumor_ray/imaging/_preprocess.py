"""MRI preprocessing shared by the ingest, training and scoring.

:class:`MRIPreprocess` turns the bytes of one image file into a square 8-bit greyscale
array: decode safely, convert to one channel, crop the black background around the head,
resize keeping aspect by padding. The ingest stores its output; scoring calls the very same
object on raw files, so a model never sees pixels prepared differently from its training data.
DICOM files and NIfTI volumes become 8-bit grey slices by :func:`~braintumor_ray.imaging.read_medical`,
then take the same crop and resize (:meth:`MRIPreprocess.slices`).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core import Config, ConfigError, ImageDecodeError, setting
from ._guard import NO_GUARD, NO_INFO, InputGuard, MedicalDecodeError, NotSelected, SeriesSelector, SliceInfo
from ._inflate import GZIP_MAGIC, inflate
from ._medical import read_medical, sniff_kind

logger = logging.getLogger(__name__)
# PIL's own bomb guard (89 Mpx warning, 179 Mpx error) is global state; ours is the input guard's
# (InputGuard.max_pixels, max_file_bytes) and is checked before any pixel is decoded.

_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}

# The mask is computed on a copy no larger than this, which keeps the crop cheap on large scans.
_MASK_SIDE = 128
# Large images go to grey in bands of rows of about this many pixels: the float arrays of the
# conversion (8 bytes a pixel) stay small whatever the image's size.
_BAND_PIXELS = 4_000_000
_SPREAD_BLOCK = 2**20


@dataclass(frozen=True)
class PreprocessedImage:
    """One preprocessed image and what was done to it."""

    pixels: np.ndarray  # (image_size, image_size) uint8
    orig_width: int
    orig_height: int
    orig_mode: str
    crop_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in original pixels, x1/y1 exclusive
    cropped: bool  # False when no head was found and the whole image was kept
    # Share of the original image that the head covers: slices at the top or bottom of a head
    # have little, and their vote in a series verdict counts less (score/_series.py).
    head_fraction: float = 1.0


@dataclass(frozen=True)
class PreprocessedSlice:
    """One preprocessed image of a file and where in the file it came from (UIDs, slice)."""

    image: PreprocessedImage
    info: SliceInfo


@dataclass(frozen=True)
class SkippedSlice:
    """A slice of a DICOM or NIfTI file left out by the content or head check, and why."""

    info: SliceInfo
    reason: str


class NoContent(ImageDecodeError):
    """An image the input guard's content or head check refuses: the file's error when it is the
    file's only image, a skipped slice when it is one slice of a volume or series."""


# What a skipped slice's reason starts with (the series table counts such rows as skipped slices).
SLICE_SKIP_REASONS = ("no content", "no head found")


@dataclass(frozen=True)
class FileResult:
    """What became of one file: its slices, or why it has none (an error, or left out by the
    series selector). ``info`` holds the UIDs known even when the file failed.
    ``skipped_slices``: the slices of a DICOM or NIfTI file with no content or no head (a
    volume's empty top and bottom slices), left out one by one while the rest are kept."""

    slices: tuple[PreprocessedSlice, ...] = ()
    error: str | None = None
    skipped: str | None = None
    info: SliceInfo = NO_INFO
    skipped_slices: tuple[SkippedSlice, ...] = ()


@dataclass(frozen=True, kw_only=True)
class MRIPreprocess(Config):
    """Decode, greyscale, crop to the head, pad to a square of ``image_size``.

    Args:
        image_size: side of the square output, in pixels.
        threshold: grey level (0-255) above which a blurred pixel counts as part of the head.
            The classic notebooks use 45, which loses dark scans; see :func:`find_head_box`.
        margin: border kept around the head's box, as a fraction of the box's longer side.

    The limits on a file's size (pixels, bytes) are the input guard's, a setting of the job
    that reads the files (:class:`~braintumor_ray.imaging.InputGuard`), not of the model.
    """

    image_size: int = setting(224, help="side of the square output, pixels", aliases=("--image-size",))
    threshold: int = setting(
        20, help="grey level (0-255) above which a blurred pixel counts as head", aliases=("--crop-threshold",)
    )
    margin: float = setting(
        0.02, help="border kept around the head, fraction of the box's longer side", aliases=("--crop-margin",)
    )

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 4096:
            raise ConfigError(f"image_size={self.image_size} is out of range: use 16..4096 pixels")
        if not 0 <= self.threshold <= 254:
            raise ConfigError(f"threshold={self.threshold} is out of range: use a grey level in 0..254")
        if not 0 <= self.margin <= 0.5:
            raise ConfigError(f"margin={self.margin} is out of range: use a fraction in 0..0.5")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, where: str = "") -> Any:
        # Packages and ingest reports written before the limits moved to the input guard carry
        # max_pixels here: the limit is now guard.max_pixels, a setting of the job reading files.
        if isinstance(d, Mapping) and "max_pixels" in d:
            d = {k: v for k, v in d.items() if k != "max_pixels"}
        return super().from_dict(d, where=where)

    def __call__(self, data: bytes, *, name: str = "") -> PreprocessedImage:
        """One image file (JPEG, PNG..., a single-frame DICOM) -> its preprocessed image.

        ``name`` (the file's name or path) only helps tell DICOM and NIfTI files apart when
        their bytes do not; a volume is refused here: :meth:`slices` returns all its slices.
        """
        out = self.slices(data, name=name)
        if len(out) != 1:
            raise ImageDecodeError(
                f"a volume of {len(out)} slices where one image was expected: use MRIPreprocess.slices"
            )
        return out[0].image

    def slices(
        self,
        data: bytes,
        *,
        name: str = "",
        select: SeriesSelector | None = None,
        guard: InputGuard | None = None,
        pages: bool = True,
        skipped: list[SkippedSlice] | None = None,
    ) -> list[PreprocessedSlice]:
        """Every image of one file, preprocessed: one for an image file, one per page of a
        multi-page TIFF, GIF, WebP or APNG (``pages=False``: such a file is an error instead), one
        per slice (or frame) for DICOM and NIfTI. Raises ImageDecodeError, or NotSelected when
        ``select`` or ``guard`` leaves the file out. ``guard`` (default: none) refuses what the
        model is not for.

        A DICOM or NIfTI slice the guard finds empty or headless is left out on its own and
        appended to ``skipped``: every real volume has empty slices at its ends (a skull-stripped
        one dozens), which must not cost the volume its other slices. With ``skipped`` None, a
        file whose every slice is left out raises the first slice's reason."""
        guard = guard or NO_GUARD
        if err := guard.too_many_bytes("the file holds", len(data)):
            raise ImageDecodeError(err)
        kind = sniff_kind(data, name)
        if kind == "image" and data[:2] == GZIP_MAGIC:  # a gzipped DICOM or image (a .nii.gz is "nifti")
            data, name = _gunzip(data, guard), name[:-3] if name.lower().endswith(".gz") else name
            kind = sniff_kind(data, name)
        if kind == "image":
            return self._pages(data, guard, pages)
        greys = read_medical(data, kind, select=select, guard=guard)
        out, left_out = [], []
        for g in greys:
            try:
                out.append(PreprocessedSlice(self._finish(g.gray, g.mode, guard), g.info))
            except NoContent as e:
                left_out.append(SkippedSlice(g.info, str(e)))
            except ImageDecodeError as e:
                raise MedicalDecodeError(str(e), g.info) from None
        if skipped is not None:
            skipped.extend(left_out)
        elif left_out and not out:
            raise MedicalDecodeError(left_out[0].reason, left_out[0].info)
        return out

    def _pages(self, data: bytes, guard: InputGuard, pages: bool) -> list[PreprocessedSlice]:
        """An image file's pages, one slice each (``slice_index`` = page), like a DICOM's frames;
        a single-page file is one slice with no index, as before."""
        # All pages to grey first (1 byte a pixel, all pages within guard.max_pixels), then the
        # crop: a file over guard.max_slices pages is refused before any page is cropped.
        greys, multi, fmt = [], False, ""
        for image, mode in image_pages(data, guard=guard, multi_page=pages):
            multi, fmt = multi or bool(getattr(image, "is_animated", False)), image.format
            greys.append((to_gray_u8(image), mode))
        if not multi:
            return [PreprocessedSlice(self._finish(greys[0][0], greys[0][1], guard), NO_INFO)]
        out = []
        for k, (gray, mode) in enumerate(greys):
            try:
                out.append(PreprocessedSlice(self._finish(gray, mode, guard), SliceInfo(slice_index=k)))
            except ImageDecodeError as e:
                raise ImageDecodeError(f"page {k + 1} of this multi-page {fmt}: {e}") from None
        return out

    def _finish(self, gray: np.ndarray, mode: str, guard: InputGuard = NO_GUARD) -> PreprocessedImage:
        """The part every source shares: crop to the head, pad to a square of ``image_size``."""
        if guard.min_contrast and (spread := grey_spread(gray)) < guard.min_contrast:
            raise NoContent(
                f"no content: the image is near-constant (grey-level spread {spread:.1f} < {guard.min_contrast:g})"
            )
        box, fraction = find_head(gray, threshold=self.threshold, margin=self.margin)
        if box is None and guard.require_head:
            raise NoContent(
                f"no head found: nothing in the image is brighter than the crop threshold ({self.threshold})"
            )
        h, w = gray.shape
        cropped = box is not None
        x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
        pixels = resize_pad(gray[y0:y1, x0:x1], self.image_size)
        return PreprocessedImage(pixels, w, h, mode, (x0, y0, x1, y1), cropped, fraction)

    def try_slices(
        self,
        data: bytes,
        *,
        name: str = "",
        select: SeriesSelector | None = None,
        guard: InputGuard | None = None,
        pages: bool = True,
    ) -> FileResult:
        """:meth:`slices` that never raises: what jobs use so one odd file never stops them."""
        left_out: list[SkippedSlice] = []
        try:
            kept = self.slices(data, name=name, select=select, guard=guard, pages=pages, skipped=left_out)
            return FileResult(slices=tuple(kept), skipped_slices=tuple(left_out))
        except NotSelected as e:
            return FileResult(skipped=str(e), info=e.info)
        except MedicalDecodeError as e:
            return FileResult(error=str(e), info=e.info)
        except ImageDecodeError as e:
            return FileResult(error=str(e))
        except Exception as e:  # a decoder bug on a strange file is still that file's problem
            return FileResult(error=f"could not preprocess: {type(e).__name__}: {e}")

    def try_call(self, data: bytes) -> tuple[PreprocessedImage | None, str | None]:
        """``self(data)``, or None and the reason: what jobs use so one odd file never stops them."""
        try:
            return self(data), None
        except ImageDecodeError as e:
            return None, str(e)
        except Exception as e:  # a decoder bug on a strange file is still that file's problem
            return None, f"could not preprocess: {type(e).__name__}: {e}"


def _gunzip(data: bytes, guard: InputGuard) -> bytes:
    """A gzipped file's content, inflated within guard.max_file_bytes (streamed: a bomb stops at the limit)."""
    try:
        out, complete = inflate(data, guard.max_file_bytes)
    except zlib.error as e:
        raise ImageDecodeError(f"corrupt gzip data ({e})") from None
    if len(out) > guard.max_file_bytes:
        raise ImageDecodeError(
            f"decompression bomb: the gzip content is over the limit guard.max_file_bytes={guard.max_file_bytes:,}; "
            "refused without inflating the rest (raise guard.max_file_bytes if such files are genuine)"
        )
    if not complete:
        raise ImageDecodeError(f"truncated gzip: the stream ends early (after {len(out):,} bytes)")
    return out


def _bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in the largest form the conversion to grey goes through
    (Pillow keeps RGB, RGBA, CMYK, 32-bit and palette-through-RGB images at 4)."""
    if mode in ("1", "L"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_image(
    data: bytes, *, max_pixels: int | None = None, guard: InputGuard | None = None
) -> tuple[Image.Image, str]:
    """Decode one file's bytes (the first page of a multi-page file: :func:`image_pages` gives
    them all); raise ImageDecodeError with a reason a person can act on.

    The guard's limits (``max_pixels``, here overridable, and ``max_file_bytes`` on the decoded
    pixels) are checked on the header, before any pixel is decoded.
    """
    guard = guard or NO_GUARD
    max_pixels = guard.max_pixels if max_pixels is None else max_pixels
    image = _open_image(data)
    mode = image.mode  # what the file holds (the check may ask libjpeg for luma only)
    _check_scans(image, data, guard)
    _check_page(image, max_pixels, guard)
    return _load_page(image), mode


def image_pages(data: bytes, *, guard: InputGuard | None = None, multi_page: bool = True):
    """Every page of an image file, in order, as ``(image, mode)``: one for most files, one per
    page of a multi-page TIFF, GIF, WebP or APNG (as a viewer composes it). Pages are read one
    at a time (the image is the same object, moved on to the next page) and counted as they go:
    the guard's limits (max_slices pages, max_pixels and max_file_bytes for all pages together)
    are checked before each page is decoded, so a GIF of 100,000 frames stops at the limit.
    ``multi_page=False``: a file of more than one page is an error, before any is decoded."""
    guard = guard or NO_GUARD
    image = _open_image(data)
    _check_scans(image, data, guard)
    if not multi_page and getattr(image, "is_animated", False):
        raise ImageDecodeError(
            f"a multi-page {image.format}: only single-page images are taken here (reading page one "
            "alone would drop the others silently); split it into one file per page"
        )
    # APNG and animated WebP declare their frame count (acTL, the demuxer's count): checked at once.
    # GIF and TIFF do not (Pillow's n_frames walks the whole file: 2.5 s for 100,000 GIF frames).
    declared = getattr(image, "n_frames", 1) if image.format in ("PNG", "WEBP") else None
    if declared and (err := guard.too_many_slices(f"a {image.format} of {declared:,} pages", declared)):
        raise ImageDecodeError(err)
    pixels = 0
    for k in itertools.count():
        if k:
            try:
                image.seek(k)
            except EOFError:
                return
            except Exception as e:
                raise ImageDecodeError(
                    f"corrupt or truncated {image.format or 'image'} data: page {k + 1}: {e}"
                ) from None
            if err := guard.too_many_slices(f"a {image.format} of more than {k:,} pages", k + 1):
                raise ImageDecodeError(err)
        pixels += image.width * image.height
        mode = image.mode
        _check_page(image, guard.max_pixels, guard, pixels=pixels, page=k)
        yield _load_page(image), mode
        if not getattr(image, "is_animated", False):
            return


def _open_image(data: bytes) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = next((k for magic, k in _MAGIC.items() if data.startswith(magic)), None)
        if kind:
            raise ImageDecodeError(f"corrupt {kind}: its header cannot be parsed") from None
        # Never quote the bytes: a text file in a hospital export may begin with a name.
        looks = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in data[:64]) else "binary data"
        raise ImageDecodeError(
            f"not an image: unrecognised format ({looks}, not DICOM, NIfTI or an image format)"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large (decompression bomb guard): {e}") from None
    except Exception as e:
        raise ImageDecodeError(f"corrupt or truncated image header: {type(e).__name__}: {e}") from None


def _check_scans(image: Image.Image, data: bytes, guard: InputGuard) -> None:
    """A JPEG's scan count against guard.max_jpeg_scans, before any scan is decoded (an MPO's
    later images count too: Pillow decodes the first alone, but the file is refused whole)."""
    if image.format in ("JPEG", "MPO") and (err := guard.too_many_jpeg_scans(f"a {image.format} file", data)):
        raise ImageDecodeError(err)


def _check_page(
    image: Image.Image, max_pixels: int, guard: InputGuard, *, pixels: int | None = None, page: int = 0
) -> None:
    """The guard's limits on the page ``image`` is at (``pixels``: all pages so far together),
    from its header: nothing of it is decoded yet."""
    w, h = image.size
    pixels = w * h if pixels is None else pixels
    what = f"{w}x{h}" if not page else f"{page + 1} pages up to this {w}x{h} one"
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"image too large: {what} = {pixels:,} pixels, over the limit guard.max_pixels={max_pixels:,} "
            "(decompression bomb guard; raise guard.max_pixels if such scans are genuine)"
        )
    if image.format == "JPEG" and image.mode == "RGB":
        # Ask libjpeg for the luma plane only: half the decode time, and the same values as
        # decoding to RGB and converting to L (measured identical on the real dataset).
        image.draft("L", image.size)
    n = pixels * _bytes_per_pixel(image.mode)
    if err := guard.too_many_bytes(
        f"a {w}x{h} {image.mode} image decodes to" if not page else f"{page + 1} pages of {image.mode} decode to", n
    ):
        raise ImageDecodeError(err)


def _load_page(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except Exception as e:  # PIL reports truncation and corruption as OSError, SyntaxError, ValueError...
        raise ImageDecodeError(f"corrupt or truncated {image.format or 'image'} data: {e}") from None
    if getattr(image, "is_animated", False):
        return image  # the pages of an animation are composed as they are; no EXIF turn
    try:
        # Phone photos of films carry an orientation tag; scanners' exports rarely do.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:
        pass
    return image


def to_gray_u8(image: Image.Image) -> np.ndarray:
    """One channel, 8 bits, whatever the file held (16-bit, float, alpha, palette, CMYK...).

    Large images are converted in bands of rows, so the float arrays stay small."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: stretch the values actually used to 0..255; dividing by the type's
        # maximum would leave 12-bit scans in a 16-bit container almost black.
        ends = [(float(a.min()), float(a.max())) for a in (np.asarray(b, dtype=np.float64) for b in _bands(image))]
        lo, hi = float(np.min([e[0] for e in ends])), float(np.max([e[1] for e in ends]))
        if hi <= lo:
            return np.zeros((image.height, image.width), dtype=np.uint8)
        return _by_bands(
            image, lambda b: np.round((np.asarray(b, dtype=np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        )
    return _by_bands(image, _gray_band)


def _bands(image: Image.Image):
    """The image itself when small, else its bands of rows (each a copy of only that band)."""
    w, h = image.size
    rows = max(1, _BAND_PIXELS // max(1, w))
    if rows >= h:
        yield image
        return
    for y in range(0, h, rows):
        yield image.crop((0, y, w, min(h, y + rows)))


def _by_bands(image: Image.Image, fn) -> np.ndarray:
    w, h = image.size
    if w * h <= _BAND_PIXELS:
        return fn(image)
    out = np.empty((h, w), dtype=np.uint8)
    y = 0
    for band in _bands(image):
        out[y : y + band.height] = fn(band)
        y += band.height
    return out


def _gray_band(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels become background, which in an MRI is black.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        image = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    if image.mode != "L":
        image = image.convert("RGB").convert("L") if image.mode not in ("RGB", "1") else image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def grey_spread(gray: np.ndarray) -> float:
    """The standard deviation of an 8-bit image's grey levels, from its histogram: an integer
    pass over blocks of _SPREAD_BLOCK pixels (np.bincount widens each block to 8 bytes a pixel:
    8 MB, one block at a time). ``gray.std()`` made a float64 copy of the whole image:
    +1.07 GB for a flat PNG of 134 M pixels (guard.max_pixels), refused after all that."""
    if gray.dtype != np.uint8:
        raise TypeError(f"grey_spread takes 8-bit grey pixels, not {gray.dtype}")
    flat = gray.reshape(-1)  # a view of a contiguous image; a strided one is copied at 1 byte a pixel
    if not flat.size:
        return 0.0
    hist = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, _SPREAD_BLOCK):
        hist += np.bincount(flat[start : start + _SPREAD_BLOCK], minlength=256)
    levels = np.arange(256, dtype=np.float64)
    mean = float(hist @ levels) / flat.size
    return math.sqrt(max(0.0, float(hist @ (levels - mean) ** 2) / flat.size))


def find_head_box(
    gray: np.ndarray, *, threshold: int = 20, margin: float = 0.02, min_region: float = 0.02
) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of the head, plus a margin (see :func:`find_head`)."""
    return find_head(gray, threshold=threshold, margin=margin, min_region=min_region)[0]


def scipy_ndimage() -> Any:
    """``scipy.ndimage``, imported again if a first import in this process was cut off mid-way.

    Ray cancels a failed run's tasks by raising in their threads; one that lands inside a worker's
    first ``from scipy import ndimage`` leaves the package's submodules in ``sys.modules`` without
    the package, and every later import in that long-lived worker then fails ("name
    '_ndimage_api' is not defined"): each file of the next run on that worker became an error row
    (seen in the test suite, after a run refused by its model replica). Forgetting the half-made
    modules lets the import run whole.
    """
    import sys

    try:
        from scipy import ndimage
    except (ImportError, NameError, AttributeError):
        for name in [m for m in sys.modules if m == "scipy.ndimage" or m.startswith("scipy.ndimage.")]:
            del sys.modules[name]
        from scipy import ndimage
    return ndimage


def find_head(
    gray: np.ndarray, *, threshold: int = 20, margin: float = 0.02, min_region: float = 0.02
) -> tuple[tuple[int, int, int, int] | None, float]:
    """Bounding box (x0, y0, x1, y1) of the head, plus a margin.

    Blur, threshold, open (erode then dilate) to cut noise and thin lines, then take the
    largest bright region and every region at least ``min_region`` of its size. The classic
    notebooks keep only the largest contour at grey level 45; on the real dataset that cut
    off over 30% of the head on 6% of images (dark T2/FLAIR scans fall apart into pieces),
    against 0.5% with these settings (benchmarks/crop_quality.py, docs/benchmarks.md).
    Labels, rulers and text burnt into the scan are small separate regions and fall outside.
    Returns the box, or None when nothing is brighter than ``threshold``, and the share of the
    image that the kept regions cover.
    """
    ndimage = scipy_ndimage()  # here, not at import: training from Parquet never crops, and needs no scipy

    h, w = gray.shape
    step = max(1, -(-max(h, w) // _MASK_SIDE))
    small = gray[::step, ::step].astype(np.float32)
    mask = ndimage.gaussian_filter(small, sigma=1.0) > threshold
    mask = ndimage.binary_opening(mask, iterations=2)
    labels, n = ndimage.label(mask)
    if n == 0:
        return None, 0.0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.nonzero(sizes >= min_region * sizes.max())[0]
    objects = ndimage.find_objects(labels)
    ys = [objects[k - 1][0] for k in keep]
    xs = [objects[k - 1][1] for k in keep]
    x0, x1 = min(s.start for s in xs) * step, min(w, max(s.stop for s in xs) * step)
    y0, y1 = min(s.start for s in ys) * step, min(h, max(s.stop for s in ys) * step)
    pad = int(round(margin * max(x1 - x0, y1 - y0))) + (step - 1)
    fraction = float(sizes[keep].sum()) / float(mask.size)
    return (max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)), fraction


def resize_pad(gray: np.ndarray, size: int) -> np.ndarray:
    """Scale the longer side to ``size`` and centre on a black square."""
    h, w = gray.shape
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(gray, "L").resize((nw, nh), Image.Resampling.BICUBIC))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def original_xy(x: float, y: float, *, crop_box: tuple[int, int, int, int], side: int) -> tuple[int, int]:
    """A pixel (x, y) of the preprocessed ``side`` x ``side`` image -> the original image's pixel
    it came from: undo :func:`resize_pad` (centring, then the scale) and the crop. A point in the
    black padding maps to the nearest edge of the crop."""
    x0, y0, x1, y1 = crop_box
    w, h = x1 - x0, y1 - y0
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    top, left = (side - nh) // 2, (side - nw) // 2
    # Pixel centres: (x + 0.5) in the resized image is (x + 0.5) * w / nw in the crop.
    ox = x0 + int(np.floor((x + 0.5 - left) * w / nw))
    oy = y0 + int(np.floor((y + 0.5 - top) * h / nh))
    return min(max(ox, x0), x1 - 1), min(max(oy, y0), y1 - 1)


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))
