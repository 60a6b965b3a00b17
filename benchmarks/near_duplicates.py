"""Why the near-duplicate threshold is 2 bits: pHash distances between pairs of real images.

    .venv/bin/python benchmarks/near_duplicates.py [--data ../shared/data/sartaj-brain-mri]

For each Hamming distance, the number of image pairs at that distance, how many of them are
byte-identical, how many cross a class label, and the mean absolute pixel difference of the
preprocessed 64 px images (0 = the same picture re-encoded; ~10+ = different slices).
"""

from __future__ import annotations

import argparse
import glob
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from braintumor_ray import MRIPreprocess
from braintumor_ray.imaging import phash, sha256_hex

HERE = os.path.dirname(os.path.abspath(__file__))
PRE = MRIPreprocess()
SMALL = MRIPreprocess(image_size=64)


def one(path: str):
    data = open(path, "rb").read()
    return sha256_hex(data), phash(PRE(data).pixels), SMALL(data).pixels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "*", "*", "*")))
    with ProcessPoolExecutor() as ex:
        rows = list(ex.map(one, files, chunksize=64))
    sha = [r[0] for r in rows]
    h = np.array([r[1] for r in rows], dtype=np.uint64)
    small = np.stack([r[2] for r in rows]).astype(np.int16)
    label = [f.split(os.sep)[-2] for f in files]
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    print(f"{len(files)} images; pHash of the preprocessed image; even distances only (median split of 64 values)")
    print("distance  pairs  byte-identical  cross-label  mean-abs-pixel-diff (median, 90th pct)")
    for d in range(0, 9, 2):
        ii, jj = np.nonzero(np.triu(dist == d, 1))
        same = sum(sha[i] == sha[j] for i, j in zip(ii, jj))
        cross = sum(label[i] != label[j] for i, j in zip(ii, jj))
        mad = np.abs(small[ii] - small[jj]).mean(axis=(1, 2)) if len(ii) else np.zeros(1)
        print(f"{d:>8} {len(ii):>6} {same:>15} {cross:>12}   {np.median(mad):5.1f}, {np.percentile(mad, 90):5.1f}")


if __name__ == "__main__":
    main()
