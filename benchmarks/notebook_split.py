"""The notebooks' protocol on the real data: every image of Training and Testing pooled, then a
random stratified split (80/20 by default), near-duplicates and the other source's gliomas spread
over both sides. It writes the same ``Training/<class>/`` and ``Testing/<class>/`` layout as the
data set (hard links, or copies across file systems), so the pipeline runs on it unchanged:

    .venv/bin/python benchmarks/notebook_split.py --data ../shared/data/sartaj-brain-mri --out /tmp/notebook-split
    .venv/bin/python jobs/preprocess.py --input /tmp/notebook-split --output /tmp/notebook-pre
    .venv/bin/python jobs/train.py --data /tmp/notebook-pre --storage /tmp/runs --name notebook
    .venv/bin/python benchmarks/accuracy_report.py --package /tmp/runs/notebook/model --data /tmp/notebook-pre

The figure the notebooks publish is the accuracy on this ``Testing`` (``test`` in the report);
``test_clean`` drops the images that the ingest finds near-duplicated in Training, which is what
the honest protocol keeps out. File names get the folder they came from (``Training-``,
``Testing-``), since both folders reuse names.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil

SIDES = ("Training", "Testing")


def split(files_by_class: dict[str, list[str]], *, test_fraction: float, seed: int) -> dict[str, dict[str, list[str]]]:
    """{"Training": {class: files}, "Testing": {class: files}}: each class shuffled with its own
    seeded generator and cut at ``test_fraction`` (rounded), so a class's split does not depend on
    the others'."""
    if not 0 < test_fraction < 1:
        raise SystemExit(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    out: dict[str, dict[str, list[str]]] = {side: {} for side in SIDES}
    for cls, files in sorted(files_by_class.items()):
        files = sorted(files)
        random.Random(f"{seed}-{cls}").shuffle(files)
        k = round(len(files) * test_fraction)
        out["Testing"][cls], out["Training"][cls] = sorted(files[:k]), sorted(files[k:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/sartaj-brain-mri")
    ap.add_argument("--out", default="/tmp/notebook-split")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files: dict[str, list[str]] = {}
    for side in SIDES:
        for cls in sorted(os.listdir(os.path.join(args.data, side))):
            folder = os.path.join(args.data, side, cls)
            files.setdefault(cls, []).extend(os.path.join(side, cls, f) for f in sorted(os.listdir(folder)))
    parts = split(files, test_fraction=args.test_fraction, seed=args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    for side, by_class in parts.items():
        for cls, names in by_class.items():
            os.makedirs(os.path.join(args.out, side, cls))
            for rel in names:
                dst = os.path.join(args.out, side, cls, rel.split(os.sep)[0] + "-" + os.path.basename(rel))
                try:
                    os.link(os.path.join(args.data, rel), dst)
                except OSError:
                    shutil.copy2(os.path.join(args.data, rel), dst)
    print(json.dumps({side: {c: len(v) for c, v in by_class.items()} for side, by_class in parts.items()}))


if __name__ == "__main__":
    main()
