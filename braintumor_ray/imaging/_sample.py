"""A small generated MRI-like dataset: the embedded default for demos, smoke runs and tests.

Each image is a black frame around an off-centre "head" (bright skull ring, textured brain),
a burnt-in marker in a corner that a crop must leave out, and a class-specific lesion, so a
model can learn the classes and the crop has something real to find.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Folder names of the real (Sartaj Bhuvaji) dataset, so the sample exercises the alias mapping.
SAMPLE_FOLDERS = {
    "glioma": "glioma_tumor",
    "meningioma": "meningioma_tumor",
    "no_tumor": "no_tumor",
    "pituitary": "pituitary_tumor",
}


@dataclass(frozen=True)
class SampleHead:
    """Where the head was drawn, so tests can check the crop: x0, y0, x1, y1 (x1/y1 exclusive);
    and the lesion's box, so they can check a heat map (None for no_tumor)."""

    box: tuple[int, int, int, int]
    marker: tuple[int, int, int, int]
    lesion_box: tuple[int, int, int, int] | None = None


def render_mri(label: str, rng: np.random.Generator, size: int = 160) -> tuple[np.ndarray, SampleHead]:
    """One synthetic axial slice (uint8, size x size) and where its head and marker are."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ry = rng.uniform(0.26, 0.34) * size
    rx = ry * rng.uniform(0.75, 0.9)
    cy = rng.uniform(0.45, 0.55) * size
    cx = rng.uniform(0.42, 0.58) * size
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    img = np.zeros((size, size), np.float32)
    brain = r < 0.9
    # Smooth random tissue contrast, so no two heads look alike to a perceptual hash.
    k = rng.uniform(2, 6, size=(2, 3))
    ph = rng.uniform(0, 2 * np.pi, size=(2, 3))
    u, v = (xx - cx) / rx, (yy - cy) / ry
    tissue = sum(np.sin(k[0, i] * u + ph[0, i]) * np.cos(k[1, i] * v + ph[1, i]) for i in range(3))
    img[brain] = (95 + 30 * tissue + 12 * rng.standard_normal(size * size).reshape(size, size))[brain]
    for side in (-1, 1):  # ventricles
        vy, vx = cy + rng.uniform(-0.15, 0.05) * ry, cx + side * rng.uniform(0.08, 0.2) * rx
        vr = rng.uniform(0.06, 0.14) * ry
        img[((yy - vy) / (1.8 * vr)) ** 2 + ((xx - vx) / vr) ** 2 < 1] = 30
    img[(r >= 0.9) & (r < 1.0)] = 200  # skull
    lesion = None
    if label == "glioma":  # large diffuse mass inside one hemisphere
        side = rng.choice([-1, 1])
        lesion = (cy + rng.uniform(-0.2, 0.2) * ry, cx + side * 0.4 * rx, 0.3 * ry, 235)
    elif label == "meningioma":  # round mass against the skull
        ang = rng.uniform(0, 2 * np.pi)
        lesion = (cy + 0.72 * ry * np.sin(ang), cx + 0.72 * rx * np.cos(ang), 0.18 * ry, 250)
    elif label == "pituitary":  # small bright spot low on the midline
        lesion = (cy + 0.45 * ry, cx, 0.1 * ry, 255)
    lesion_box = None
    if lesion is not None:
        ly, lx, lr, val = lesion
        disc = ((yy - ly) ** 2 + (xx - lx) ** 2) < lr**2
        img[disc] = val
        ys, xs = np.nonzero(disc)
        lesion_box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    m = max(3, size // 32)
    my, mx = 2, size - 2 - m
    img[my : my + m, mx : mx + m] = 255  # burnt-in marker, outside the head
    box = (int(np.floor(cx - rx)), int(np.floor(cy - ry)), int(np.ceil(cx + rx)) + 1, int(np.ceil(cy + ry)) + 1)
    return img.clip(0, 255).astype(np.uint8), SampleHead(box, (mx, my, mx + m, my + m), lesion_box)


def make_sample_dataset(
    root: str, *, per_class: int = 12, test_per_class: int = 4, size: int = 160, leaks: int = 2, seed: int = 0
) -> dict[str, SampleHead]:
    """Write ``root/{Training,Testing}/<class>/*.jpg``; return each file's head box.

    ``leaks`` Training images per class are also copied byte for byte into Testing, as the
    real dataset does, so the leakage report has something to find.
    """
    rng = np.random.default_rng(seed)
    if os.path.exists(root):
        shutil.rmtree(root)
    heads: dict[str, SampleHead] = {}
    for label, folder in SAMPLE_FOLDERS.items():
        for split, n in (("Training", per_class), ("Testing", test_per_class)):
            d = os.path.join(root, split, folder)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                pixels, head = render_mri(label, rng, size)
                path = os.path.join(d, f"{label}_{i:03d}.jpg")
                buf = io.BytesIO()
                Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG", quality=92)
                with open(path, "wb") as f:
                    f.write(buf.getvalue())
                heads[path] = head
        for i in range(min(leaks, per_class)):
            src = os.path.join(root, "Training", folder, f"{label}_{i:03d}.jpg")
            dst = os.path.join(root, "Testing", folder, f"copy_of_{label}_{i:03d}.jpg")
            shutil.copyfile(src, dst)
            heads[dst] = heads[src]
    return heads
