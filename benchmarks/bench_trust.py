"""Trust on the real data: calibration, out-of-distribution detection, abstention (docs/benchmarks.md).

    .venv/bin/python benchmarks/bench_trust.py --data /work/real/preprocessed \\
        --model /work/real/runs/lite0/model --out /tmp/trust [--raw ../shared/data/sartaj-brain-mri]

Everything is chosen on the validation split carved from Training (the temperature, the OOD
detector and its threshold, the review threshold); the official Testing split and test_clean
(Testing images with no twin in Training) only report. The OOD set is assembled offline from
what ships with installed packages: scikit-image's sample photographs, pydicom's test files
(CT, CR, US, NM, MR of other body parts...), rendered text pages, noise and gradients; it is
split in two halves: the detector is chosen on half A, and half B reports.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from braintumor_ray import CLASS_NAMES, MRIPreprocess  # noqa: E402
from braintumor_ray.imaging import NO_GUARD, InputGuard  # noqa: E402
from braintumor_ray.models import WithFeatures, load_model_package  # noqa: E402
from braintumor_ray.train import decode_batch  # noqa: E402
from braintumor_ray.trust import (  # noqa: E402
    DETECTORS,
    TrustConfig,
    auroc,
    calibration_report,
    fit_trust,
    softmax,
)


def read_split(data: str, split: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(data, "images", f"split={split}", "*.parquet")))
    t = pq.ParquetFile(files[0]).read(columns=["image", "image_height", "image_width", "label_index", "leaked"])
    import pyarrow as pa

    t = pa.concat_tables([pq.read_table(f, columns=t.column_names) for f in files])
    return decode_batch(t)


def run_model(pkg, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    import torch

    net = WithFeatures(pkg.model).eval()
    logits, feats = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            lo, fe = net(pkg.prepare(images[i:i + batch]))
            logits.append(lo.numpy())
            feats.append(fe.numpy())
    if not logits:
        return np.zeros((0, len(pkg.class_names))), np.zeros((0, 1))
    return np.concatenate(logits), np.concatenate(feats)


def ood_files() -> list[tuple[str, str, bytes]]:
    """(kind, name, file bytes) of every OOD item, in a fixed order."""
    from PIL import Image, ImageDraw, ImageFont

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    out = []
    import skimage.data as skd

    for name in ("astronaut", "brick", "camera", "cat", "chelsea", "checkerboard", "clock", "coffee", "coins",
                 "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                 "microaneurysms", "moon", "page", "retina", "rocket", "text", "cell", "stereo_motorcycle"):
        try:
            a = getattr(skd, name)()
        except Exception:  # a sample that needs a download
            continue
        a = a[0] if isinstance(a, tuple) else a
        a = np.asarray(a)
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 4:
            a = a[..., :3]
        out.append(("photo", f"skimage.{name}", png(a)))
    faces = skd.lfw_subset()
    for i in range(0, len(faces), 10):
        out.append(("photo", f"skimage.lfw_subset[{i}]", png((faces[i] * 255).astype(np.uint8))))
    rng = np.random.default_rng(0)
    font = ImageFont.load_default()
    for i in range(12):
        img = Image.new("L", (512, 512), 255 if i % 2 == 0 else 0)
        d = ImageDraw.Draw(img)
        for line in range(0, 500, 14):
            words = " ".join("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(8))
            d.text((10, line), words, fill=0 if i % 2 == 0 else 255, font=font)
        out.append(("text", f"text[{i}]", png(np.asarray(img))))
    for i in range(8):
        out.append(("noise", f"uniform_noise[{i}]", png(rng.integers(0, 256, (256, 256), dtype=np.uint8))))
        g = np.clip(rng.normal(128, 40, (256, 256)), 0, 255).astype(np.uint8)
        out.append(("noise", f"gaussian_noise[{i}]", png(g)))
        ramp = np.tile(np.linspace(0, 255, 256, dtype=np.float32), (256, 1))
        out.append(("gradient", f"gradient[{i}]", png(np.rot90(ramp, i % 4).astype(np.uint8))))
    for v in (0, 128, 255):
        out.append(("blank", f"blank[{v}]", png(np.full((256, 256), v, np.uint8))))
    import pydicom.data

    for f in sorted(pydicom.data.get_testdata_files()):
        if os.path.isfile(f) and os.path.getsize(f) < 200_000_000:
            out.append(("dicom", "pydicom:" + os.path.basename(f), open(f, "rb").read()))
    return out


# Detectors within this AUROC of the best on validation count as equally good.
TIE = 0.005


def choose_detector(choice: dict) -> str:
    """The detector with the best AUROC on validation vs OOD half A; among those within ``TIE``
    of it, one that keeps no per-image training features in the package (k-NN's bank is
    derived from 4096 patients' scans and would travel to every scoring cluster)."""
    top = max(v["auroc_val_vs_ood_A"] for v in choice.values())
    near = [k for k, v in choice.items() if v["auroc_val_vs_ood_A"] >= top - TIE]
    private = [k for k in near if not DETECTORS[k].stores_training_features]
    pool = private or near
    return max(pool, key=lambda k: choice[k]["auroc_val_vs_ood_A"])


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> list[dict]:
    rows = []
    for t in (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        keep = conf >= t
        rows.append({"threshold": t, "coverage": float(keep.mean()),
                     "accuracy_kept": float(correct[keep].mean()) if keep.any() else None,
                     "errors_caught": float((~correct & ~keep).sum() / max((~correct).sum(), 1))})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    pkg = load_model_package(args.model)
    split = {s: read_split(args.data, s) for s in ("train", "val", "test")}
    labels = {s: d["label"] for s, d in split.items()}
    clean = ~split["test"]["leaked"]
    cache = os.path.join(args.out, f"features_{pkg.model_id}.npz")  # the model pass is most of the time
    if os.path.exists(cache):
        z = np.load(cache)
        res = {s: (z[s + "_logits"], z[s + "_features"]) for s in split}
    else:
        res = {s: run_model(pkg, d["image"]) for s, d in split.items()}
        np.savez(cache, **{f"{s}_{k}": v for s, (lo, fe) in res.items() for k, v in (("logits", lo), ("features", fe))})

    # The OOD set through the same preprocessing (with and without the input guards).
    pre = pkg.preprocess
    items = ood_files()
    guard = InputGuard()
    refused, reach = [], []  # reach: (kind, name, pixels) that the model sees with the guards on
    for kind, name, data in items:
        r = pre.try_slices(data, name=name, guard=guard)
        if not r.slices:
            refused.append((kind, name, "skipped" if r.skipped else "error", (r.skipped or r.error or "")[:60]))
            continue
        reach.append((kind, name, r.slices[len(r.slices) // 2].image.pixels))
    ood_px = np.stack([x[2] for x in reach]) if reach else np.zeros((0, pre.image_size, pre.image_size), np.uint8)
    ood_logits, ood_feats = run_model(pkg, ood_px)
    half_a = np.arange(len(reach)) % 2 == 0

    # Detector choice on validation vs OOD half A.
    choice = {}
    fits = {}
    for name in DETECTORS:
        tr = fit_trust(TrustConfig(ood_detector=name), train_features=res["train"][1], train_labels=labels["train"],
                       val_logits=res["val"][0], val_features=res["val"][1], val_labels=labels["val"])
        fits[name] = tr
        s_val = tr.assess(*res["val"]).ood_score
        s_ood = tr.assess(ood_logits, ood_feats).ood_score
        s_test = tr.assess(*res["test"]).ood_score
        choice[name] = {"auroc_val_vs_ood_A": auroc(s_val, s_ood[half_a]),
                        "auroc_test_vs_ood_B": auroc(s_test, s_ood[~half_a]),
                        "auroc_test_vs_ood_all": auroc(s_test, s_ood),
                        "test_flagged": float((s_test > tr.ood_threshold).mean()),
                        "ood_flagged": float((s_ood > tr.ood_threshold).mean())}
    best = choose_detector(choice)
    trust = fits[best]

    report: dict = {"model_id": pkg.model_id, "detector_chosen_on_validation": best, "tie_auroc": TIE, "detectors": choice,
                    "temperature": trust.temperature, "review_threshold": trust.review_threshold,
                    "ood_threshold": trust.ood_threshold, "ood_items": len(items), "ood_refused_by_guards": len(refused),
                    "ood_reaching_model": len(reach), "refused": refused}
    for s, mask in (("val", None), ("test", None), ("test_clean", clean)):
        lo, fe = res["val" if s == "val" else "test"]
        y = labels["val" if s == "val" else "test"]
        if mask is not None:
            lo, fe, y = lo[mask], fe[mask], y[mask]
        a = trust.assess(lo, fe)
        correct = a.probs.argmax(1) == y
        flagged = np.array([r is not None for r in a.review_reason])
        report[s] = {
            **calibration_report(lo, y, trust.temperature),
            "accuracy": float(correct.mean()),
            "per_class_accuracy": {c: float(correct[y == k].mean()) for k, c in enumerate(CLASS_NAMES) if (y == k).any()},
            "flagged": float(flagged.mean()),
            "flagged_ood": float(a.ood.mean()),
            "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
            "errors_caught": float((~correct & flagged).sum() / max((~correct).sum(), 1)),
            "risk_coverage": risk_coverage(a.confidence, correct),
        }
    a_ood = trust.assess(ood_logits, ood_feats)
    report["ood_outcomes"] = {
        "flagged_out_of_distribution": int(a_ood.ood.sum()),
        "flagged_low_confidence": int(sum(r == "low_confidence" for r in a_ood.review_reason)),
        "missed": [n for (k, n, _), r in zip(reach, a_ood.review_reason) if r is None],
    }
    report["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "trust.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    _plot(report, trust, res, labels, clean, os.path.join(args.out, "risk_coverage.png"))
    print(json.dumps({k: v for k, v in report.items() if k not in ("refused",)}, indent=1, default=float))
    return 0


def _plot(report, trust, res, labels, clean, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for s, mask in (("test", None), ("test_clean", clean)):
        lo, fe = res["test"]
        y = labels["test"]
        if mask is not None:
            lo, fe, y = lo[mask], fe[mask], y[mask]
        conf = softmax(lo, trust.temperature).max(1)
        correct = softmax(lo, trust.temperature).argmax(1) == y
        order = np.argsort(-conf)
        cov = np.arange(1, len(conf) + 1) / len(conf)
        risk = 1 - np.cumsum(correct[order]) / np.arange(1, len(conf) + 1)
        ax[0].plot(cov, risk, label=s)
    ax[0].set_xlabel("coverage (share of rows kept)")
    ax[0].set_ylabel("risk (error rate of kept rows)")
    ax[0].set_title("risk-coverage, calibrated confidence")
    ax[0].legend()
    names = list(report["detectors"])
    ax[1].bar(names, [report["detectors"][n]["auroc_test_vs_ood_B"] for n in names])
    ax[1].set_ylim(0.5, 1.0)
    ax[1].set_title("OOD AUROC, Testing vs OOD half B")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
