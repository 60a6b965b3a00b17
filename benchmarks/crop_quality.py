"""How often a crop cuts into the head, on the real data: ours against the classic notebooks' crop.

    .venv/bin/python benchmarks/crop_quality.py [--data ../shared/data/sartaj-brain-mri] [--every 3]

There is no hand-drawn ground truth, so the reference box is a deliberately generous one:
everything above grey level 12 after a 3-step opening, keeping regions of at least 2% of the
largest. A crop "cuts into the head" when its box covers less than 70% of the reference box.
The cases where ours disagrees with the reference were inspected by eye (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np
from scipy import ndimage

from braintumor_ray.imaging import MRIPreprocess, decode_image, find_head_box, to_gray_u8

HERE = os.path.dirname(os.path.abspath(__file__))


def reference_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    mask = ndimage.binary_opening(gray > 12, iterations=3)
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    ys, xs = np.nonzero(np.isin(labels, np.nonzero(sizes > 0.02 * sizes.max())[0]))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def cover(box, ref) -> float:
    ix = max(0, min(box[2], ref[2]) - max(box[0], ref[0]))
    iy = max(0, min(box[3], ref[3]) - max(box[1], ref[1]))
    return ix * iy / ((ref[2] - ref[0]) * (ref[3] - ref[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--every", type=int, default=3, help="use every n-th image")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "*", "*", "*")))[:: args.every]
    grays = [to_gray_u8(decode_image(open(f, "rb").read())[0]) for f in files]
    refs = [reference_box(g) for g in grays]
    ours = MRIPreprocess()
    variants = {
        "classic (grey 45, largest region only)": dict(threshold=45, min_region=1.0),
        f"ours (grey {ours.threshold}, regions >= 2% of the largest)": dict(threshold=ours.threshold),
    }
    print(f"{len(files)} images from {args.data}")
    for name, kw in variants.items():
        t = time.perf_counter()
        boxes = [find_head_box(g, margin=0.0, **kw) or (0, 0, g.shape[1], g.shape[0]) for g in grays]
        ms = (time.perf_counter() - t) / len(grays) * 1e3
        c = np.array([cover(b, r) for b, r in zip(boxes, refs)])
        print(f"{name}: box covers <70% of the head in {(c < 0.7).sum()} ({(c < 0.7).mean():.1%}), "
              f"<90% in {(c < 0.9).sum()} ({(c < 0.9).mean():.1%}); {ms:.2f} ms/image")
        worst = np.argsort(c)[:5]
        print("   lowest cover: " + ", ".join(f"{os.path.relpath(files[i], args.data)} {c[i]:.2f}" for i in worst))


if __name__ == "__main__":
    main()
