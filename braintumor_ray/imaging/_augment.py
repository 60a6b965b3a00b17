"""Train-time augmentation of preprocessed MRI batches (uint8 greyscale in, uint8 greyscale out).

The classic brain-MRI notebooks' ``ImageDataGenerator``: small rotations, width/height shifts,
zoom, horizontal flips, brightness and contrast. It runs on the ingest's preprocessed pixels and
returns the same kind of pixels, so training then calls the very ``prepare_input`` that scoring
calls; evaluation and scoring never augment.

    aug = TrainAugment()                      # the default preset
    pixels = aug(pixels_uint8_nhw, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..core import Config, ConfigError, setting


@dataclass(frozen=True, kw_only=True)
class TrainAugment(Config):
    """Random affine + flip + brightness/contrast, per image, on a batch.

    Args:
        rotate: largest rotation, degrees (uniform in +-rotate).
        shift: largest translation, fraction of the side (each axis, uniform in +-shift).
        zoom: largest scale change, fraction (uniform in 1 +- zoom).
        flip: probability of a horizontal (left-right) flip; brains are near-symmetric.
        brightness: largest brightness factor change (x * (1 +- brightness)).
        contrast: largest gamma change (gamma in 1 +- contrast).

        skull_strip: probability of a crude skull strip: the head (pixels above the crop
            threshold) eroded by ``strip_depth`` of the side, everything outside it set to black,
            as skull-stripped research volumes (BraTS) look.
        renormalise: probability of stretching the head's own 0.5..99.5 percentiles to 0..255,
            what a z-scored or bias-corrected volume looks like after scoring's head window.

    Black stays black: the background the affine uncovers, brightness and gamma all keep the
    scans' black background. The two archive-shift augmentations are on by default (0.3 each),
    chosen on validation: on skull-stripped copies of the validation images a model trained with
    them scores 90.7% against 63.8%, on the unshifted ones the same 90.7% (docs/benchmarks.md).
    """

    rotate: float = setting(15.0, help="largest rotation, degrees (uniform in +-rotate)")
    shift: float = setting(0.1, help="largest translation, fraction of the side (each axis)")
    zoom: float = setting(0.1, help="largest scale change, fraction (uniform in 1 +- zoom)")
    flip: float = setting(0.5, help="probability of a left-right flip; brains are near-symmetric")
    brightness: float = setting(0.2, help="largest brightness factor change (x * (1 +- brightness))")
    contrast: float = setting(0.2, help="largest gamma change (gamma in 1 +- contrast)")
    skull_strip: float = setting(
        0.3,
        help="probability of a crude skull strip (the head mask eroded by strip_depth, "
        "outside set black), as skull-stripped research volumes look; 0: off",
    )
    strip_depth: float = setting(
        0.06,
        help="how deep the skull strip erodes the head, fraction of the side (the "
        "generated heads' skull is about 3% of it; deeper also takes the brain's rim)",
    )
    renormalise: float = setting(
        0.3,
        help="probability of stretching the head's 0.5..99.5 percentiles to 0..255, as "
        "z-scored volumes look after scoring's head window; 0: off",
    )

    def __post_init__(self) -> None:
        checks = {
            "rotate": (0.0, 180.0),
            "shift": (0.0, 0.5),
            "zoom": (0.0, 0.5),
            "flip": (0.0, 1.0),
            "brightness": (0.0, 1.0),
            "contrast": (0.0, 1.0),
            "skull_strip": (0.0, 1.0),
            "strip_depth": (0.0, 0.25),
            "renormalise": (0.0, 1.0),
        }
        for name, (lo, hi) in checks.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f"augmentation {name}={v} is out of range: use {lo}..{hi}")

    @classmethod
    def none(cls) -> TrainAugment:
        return cls(
            rotate=0, shift=0, zoom=0, flip=0, brightness=0, contrast=0, skull_strip=0, strip_depth=0, renormalise=0
        )

    def scaled(self, strength: float) -> TrainAugment:
        """This preset with every magnitude times ``strength`` (0 = off); flip stays as is unless 0."""
        if strength < 0:
            raise ConfigError(f"augmentation strength={strength} must be >= 0")
        if strength == 0:
            return TrainAugment.none()
        return replace(
            self,
            rotate=min(180.0, self.rotate * strength),
            shift=min(0.5, self.shift * strength),
            zoom=min(0.5, self.zoom * strength),
            brightness=min(1.0, self.brightness * strength),
            contrast=min(1.0, self.contrast * strength),
        )

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, f.name) == 0 for f in fields(self) if f.name != "strip_depth")

    def __call__(self, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, H, W) uint8 -> (N, H, W) uint8, each image with its own random draw."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 3:
            raise ConfigError(f"TrainAugment takes (N, H, W) uint8 batches, got {pixels.dtype} {tuple(pixels.shape)}")
        if self.is_identity or pixels.shape[0] == 0:
            return pixels
        n = pixels.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) * (hi - lo) + lo

        x = pixels.to(torch.float32)[:, None]  # N, 1, H, W
        # Drawn only when on, so that the other augmentations keep their random streams.
        if self.skull_strip:
            x = _skull_strip(x, torch.rand(n, generator=generator) < self.skull_strip, self.strip_depth)
        if self.renormalise:
            x = _renormalise(x, torch.rand(n, generator=generator) < self.renormalise)
        angle = u(-self.rotate, self.rotate) * (math.pi / 180.0)
        scale = u(1 - self.zoom, 1 + self.zoom)
        tx, ty = u(-self.shift, self.shift) * 2, u(-self.shift, self.shift) * 2  # grid units span 2
        flip = torch.where(torch.rand(n, generator=generator) < self.flip, -1.0, 1.0)
        if self.rotate or self.zoom or self.shift or self.flip:
            # Output -> input sampling matrix: inverse zoom, rotation, flip, then shift.
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.contrast:
            # A gamma curve: black stays black (the background) and white stays white.
            gamma = u(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
            x = (x.clamp(0, 255) / 255.0).pow(gamma) * 255.0
        if self.brightness:
            # Multiplicative, like Keras' brightness_range: the background stays black.
            x = x * u(1 - self.brightness, 1 + self.brightness).view(n, 1, 1, 1)
        return x[:, 0].round_().clamp_(0, 255).to(torch.uint8)


# Grey level above which a pixel is head: the crop's threshold (MRIPreprocess.threshold).
_HEAD_LEVEL = 20.0


def _skull_strip(x: torch.Tensor, which: torch.Tensor, depth: float) -> torch.Tensor:
    """``x`` (N, 1, H, W) float with the chosen images' heads eroded by ``depth`` of the side and
    the rest black: the bright skull ring at the head's edge goes, the brain stays (the head's
    holes, dark ventricles and CSF, are filled first so the erosion only eats from outside).

    The stripped image is then cropped and resized again with the preprocessing's own crop, as
    scoring crops a skull-stripped scan: the brain fills the frame. Without it training saw a
    small brain in a black ring that no stripped scan shows (the skull-stripped Testing copies
    scored 58% with a model trained without the strip; docs/benchmarks.md)."""
    if not bool(which.any()) or depth <= 0:
        return x
    from ._preprocess import find_head, resize_pad, scipy_ndimage

    ndimage = scipy_ndimage()

    r = max(1, round(depth * x.shape[-1]))
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    out = x.clone()
    side = x.shape[-1]
    for i in torch.nonzero(which).flatten().tolist():
        head = ndimage.binary_fill_holes(x[i, 0].numpy() > _HEAD_LEVEL)
        keep = ndimage.binary_erosion(head, structure=disk)
        stripped = (x[i, 0].numpy() * keep).clip(0, 255).astype(np.uint8)
        box, _ = find_head(stripped, threshold=int(_HEAD_LEVEL))
        if box is not None and x.shape[-2] == side:
            x0, y0, x1, y1 = box
            stripped = resize_pad(stripped[y0:y1, x0:x1], side)
        out[i, 0] = torch.from_numpy(stripped.astype(np.float32))
    return out


def _renormalise(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The chosen images' head pixels (above black) stretched from their 0.5 and 99.5
    percentiles to 0..255, the background kept black."""
    out = x.clone()
    for i in torch.nonzero(which).flatten().tolist():
        img = x[i]
        head = img[img > 0]
        if head.numel() < 2:
            continue
        lo, hi = torch.quantile(head, torch.tensor([0.005, 0.995]))
        if hi <= lo:
            continue
        out[i] = torch.where(img > 0, ((img - lo) * (255.0 / (hi - lo))).clamp(0, 255), img)
    return out
