"""A montage of real MRI originals beside the crops the ingest makes, for docs/.

    .venv/bin/python benchmarks/crop_montage.py [--data ../shared/data/sartaj-brain-mri] [--out docs/crop_montage.png]

Each pair: the original with the crop box drawn in green, then the preprocessed square image
exactly as stored in the Parquet shards. Images are picked evenly across the four classes,
including the dark scans the classic threshold-45 contour crop gets wrong (its box in red).
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from PIL import Image, ImageDraw

from braintumor_ray import MRIPreprocess
from braintumor_ray.imaging import decode_image, find_head_box, to_gray_u8

HERE = os.path.dirname(os.path.abspath(__file__))
TILE = 200


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "crop_montage.png"))
    ap.add_argument("--per-class", type=int, default=3)
    args = ap.parse_args()
    preprocess = MRIPreprocess()
    picks = []
    for folder in sorted(glob.glob(os.path.join(args.data, "Training", "*"))):
        files = sorted(glob.glob(os.path.join(folder, "*")))
        rng = np.random.default_rng(len(files))
        picks += [files[i] for i in rng.choice(len(files), args.per_class, replace=False)]
    rows = []
    for path in picks:
        data = open(path, "rb").read()
        out = preprocess(data)
        gray = to_gray_u8(decode_image(data)[0])
        classic = find_head_box(gray, threshold=45, min_region=1.0)  # the notebooks' crop
        orig = Image.fromarray(gray).convert("RGB")
        draw = ImageDraw.Draw(orig)
        w = max(2, orig.width // 150)
        if classic and classic != out.crop_box:
            draw.rectangle(classic, outline=(230, 40, 40), width=w)
        draw.rectangle(out.crop_box, outline=(40, 220, 40), width=w)
        orig.thumbnail((TILE, TILE))
        tile = Image.new("RGB", (2 * TILE + 6, TILE + 16), (255, 255, 255))
        tile.paste(orig, ((TILE - orig.width) // 2, (TILE - orig.height) // 2))
        tile.paste(Image.fromarray(out.pixels).resize((TILE, TILE)).convert("RGB"), (TILE + 6, 0))
        ImageDraw.Draw(tile).text((2, TILE + 2), os.path.relpath(path, args.data)[:60], fill=(0, 0, 0))
        rows.append(tile)
    cols = 2
    h = (len(rows) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (2 * TILE + 20), h * (TILE + 20)), (255, 255, 255))
    for i, tile in enumerate(rows):
        sheet.paste(tile, ((i % cols) * (2 * TILE + 20), (i // cols) * (TILE + 20)))
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(rows)} originals (green: our crop, red: the classic crop where it differs) and crops")


if __name__ == "__main__":
    main()
