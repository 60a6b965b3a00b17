"""Accuracy of model packages (single or ensemble) with 95% bootstrap intervals (issue 38).

    .venv/bin/python benchmarks/accuracy_report.py --package runs/lite0/model [--package runs/ens1 ...] \\
        --data /work/shared/preprocessed [--out docs/accuracy.md] [--resamples 2000] [--seed 0]

For each package, on each split of the preprocessed data that the training job reports
(``val``; ``test``, the official Testing folder; ``test_clean``, Testing without the images that
leak from Training, as ``metrics.json`` names them): accuracy, macro-F1 and each class's
recall, each with a percentile bootstrap interval (rows resampled with replacement,
``--resamples`` times, seeded). Predictions are the argmax of the package's logits (its
temperature does not move an argmax), run on the package's own engine choice (ONNX Runtime on
CPU when it has ``model.onnx``). Prints a Markdown table (and writes it to ``--out``).

``--sweep-offset CLASS``: a study of one class's decision threshold, for a class a shifted source
under-calls (glioma on the official Testing folder): the class's logit raised by each of
:data:`OFFSETS`, accuracy, macro-F1 and that class's recall on every split, and the offset
validation picks (the highest macro-F1 there, the smallest offset on a tie). Testing's columns
are reported, never used to pick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

SPLITS = ("val", "test", "test_clean")  # as train/_trust.py and metrics.json name them
LEVEL = 0.95
OFFSETS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def confusion_counts(labels: np.ndarray, preds: np.ndarray, k: int, index: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrices (rows true, columns predicted): (k, k) for all rows, or (B, k, k) for
    each row of ``index`` (B, n), the resampled row numbers."""
    codes = np.asarray(labels, np.int64) * k + np.asarray(preds, np.int64)
    if index is None:
        return np.bincount(codes, minlength=k * k).reshape(k, k)
    b = index.shape[0]
    flat = codes[index] + (np.arange(b, dtype=np.int64) * k * k)[:, None]
    return np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k)


def metrics_of(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and per-class recall of confusion matrices (..., k, k); a class with no
    true row has recall 0 and a class never predicted precision 0 (as train's metrics count them)."""
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    true, pred = cm.sum(-1), cm.sum(-2)
    n = cm.sum((-2, -1))
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"accuracy": np.divide(tp.sum(-1), n, out=np.zeros_like(n), where=n > 0), "macro_f1": f1.mean(-1),
            "recall": recall}


def bootstrap(labels: np.ndarray, preds: np.ndarray, k: int, *, resamples: int = 1000, seed: int = 0,
              level: float = LEVEL) -> dict[str, Any]:
    """Point figures and percentile bootstrap intervals: ``{"n", "accuracy": (value, lo, hi),
    "macro_f1": (...), "recall": [(value, lo, hi) per class]}``."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    n = len(labels)
    if resamples < 1000:
        raise ValueError(f"resamples={resamples}: use 1000 or more for a 95% interval")
    point = metrics_of(confusion_counts(labels, preds, k))
    if n == 0:
        nan = (float("nan"),) * 3
        return {"n": 0, "accuracy": nan, "macro_f1": nan, "recall": [nan] * k}
    rng = np.random.default_rng(seed)
    boot = {key: [] for key in point}
    for start in range(0, resamples, 500):  # bounded memory: 500 x n row numbers at a time
        idx = rng.integers(0, n, size=(min(500, resamples - start), n))
        for key, v in metrics_of(confusion_counts(labels, preds, k, idx)).items():
            boot[key].append(v)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(value, samples):
        lo, hi = np.percentile(samples, [lo_q, hi_q], axis=0)
        return float(value), float(lo), float(hi)

    acc, f1, rec = (np.concatenate(boot[key]) for key in ("accuracy", "macro_f1", "recall"))
    # A class with no true row in the split has no recall ("-"), not 0 (test_clean of the official
    # split holds one no_tumor image or none); macro-F1 still counts it as train's metrics do.
    present = np.bincount(labels, minlength=k) > 0
    none = (float("nan"),) * 3
    return {"n": n, "accuracy": interval(point["accuracy"], acc), "macro_f1": interval(point["macro_f1"], f1),
            "recall": [interval(point["recall"][c], rec[:, c]) if present[c] else none for c in range(k)]}


def _cell(t: Sequence[float]) -> str:
    return "-" if t[0] != t[0] else f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def markdown_table(results: Sequence[dict[str, Any]], class_names: Sequence[str]) -> str:
    """One row per package and split: n, accuracy, macro-F1, each class's recall, with intervals."""
    head = ["model", "split", "n", "accuracy", "macro-F1", *[f"recall {c}" for c in class_names]]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        for split, m in r["splits"].items():
            out.append("| " + " | ".join([r["name"], split, str(m["n"]), _cell(m["accuracy"]), _cell(m["macro_f1"]),
                                           *[_cell(x) for x in m["recall"]]]) + " |")
    return "\n".join(out)


def split_arrays(data: str) -> dict[str, dict[str, np.ndarray]]:
    """Images, labels and leak flags of val, test and test_clean of a preprocessed dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from braintumor_ray.core import resolve
    from braintumor_ray.train import decode_batch

    loc = resolve(data)
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("val", "test"):
        files = sorted(f for f in loc.join("images").join(f"split={split}").file_sizes(missing_ok=True)
                       if f.endswith(".parquet"))
        if not files:
            continue
        table = pa.concat_tables([pq.read_table(f, filesystem=loc.pyarrow_fs,
                                                columns=["image", "image_height", "image_width", "label_index", "leaked"])
                                  for f in files])
        out[split] = decode_batch(table)
    if "test" in out:
        keep = ~out["test"]["leaked"]
        out["test_clean"] = {k: v[keep] for k, v in out["test"].items()}
    return out


def logits_of(package: str, images: np.ndarray, *, engine: str = "auto", tta: str = "none", batch: int = 64) -> np.ndarray:
    from braintumor_ray.models import load_inference_model

    model = load_inference_model(package, engine=engine, tta=tta)
    return np.concatenate([model.outputs(images[i:i + batch])[0] for i in range(0, len(images), batch)]
                          or [np.zeros((0, len(model.class_names)), np.float32)])


def offset_sweep(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], cls: int,
                 offsets: Sequence[float] = OFFSETS) -> tuple[list[dict[str, Any]], float]:
    """Each offset added to class ``cls``'s logit: per split accuracy, macro-F1 and that class's
    recall; and the offset validation picks (highest macro-F1 on ``val``, the smallest on a tie)."""
    rows = []
    for off in offsets:
        row: dict[str, Any] = {"offset": float(off)}
        for split, lg in logits.items():
            shifted = np.array(lg, dtype=np.float64, copy=True)
            shifted[:, cls] += off
            m = metrics_of(confusion_counts(labels[split], shifted.argmax(1), lg.shape[1]))
            row[split] = (float(m["accuracy"]), float(m["macro_f1"]), float(m["recall"][cls]))
        rows.append(row)
    best = max(rows, key=lambda r: (round(r["val"][1], 9), -r["offset"]))
    return rows, best["offset"]


def sweep_table(name: str, cls: str, rows: Sequence[dict[str, Any]], picked: float) -> str:
    splits = [k for k in SPLITS if k in rows[0]]
    head = "| offset | " + " | ".join(f"{k}: accuracy, macro-F1, recall {cls}" for k in splits) + " |"
    lines = [f"{name}: {cls}'s logit raised by an offset (validation picks {picked:g})", "", head,
             "|---|" + "---|" * len(splits)]
    for r in rows:
        mark = " (picked)" if r["offset"] == picked else ""
        lines.append(f"| {r['offset']:g}{mark} | " + " | ".join("%.3f, %.3f, %.3f" % r[k] for k in splits) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", required=True, help="a model package (repeat for more)")
    ap.add_argument("--name", action="append", help="the table's name of each --package (default: its folder)")
    ap.add_argument("--data", required=True, help="output of jobs/preprocess.py")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--tta", default="none", choices=("none", "flip"), help="test-time augmentation, as scoring's --tta")
    ap.add_argument("--sweep-offset", metavar="CLASS", help="also study CLASS's logit offset (see above)")
    args = ap.parse_args(argv)
    from braintumor_ray.core import CLASS_NAMES

    names = args.name or [os.path.basename(p.rstrip("/")) for p in args.package]
    if len(names) != len(args.package):
        ap.error("give one --name per --package, or none")
    splits = split_arrays(args.data)
    results, sweeps = [], []
    for name, package in zip(names, args.package):
        res = {"name": name, "splits": {}}
        logits = {split: logits_of(package, splits[split]["image"], engine=args.engine, tta=args.tta)
                  for split in SPLITS if split in splits}
        for split, lg in logits.items():
            res["splits"][split] = bootstrap(splits[split]["label"], lg.argmax(1), len(CLASS_NAMES),
                                             resamples=args.resamples, seed=args.seed)
        results.append(res)
        if args.sweep_offset:
            rows, picked = offset_sweep(logits, {k: splits[k]["label"] for k in logits},
                                        list(CLASS_NAMES).index(args.sweep_offset))
            sweeps.append(sweep_table(name, args.sweep_offset, rows, picked))
    text = (f"Accuracy with {LEVEL:.0%} percentile bootstrap intervals ({args.resamples} resamples, seed {args.seed}) "
            f"on {args.data}{', flip TTA' if args.tta == 'flip' else ''}, {time.strftime('%Y-%m-%d', time.gmtime())}\n\n"
            + markdown_table(results, CLASS_NAMES) + "".join("\n\n" + t for t in sweeps))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
