"""Prediction sets on the real data: per-class coverage and set size, marginal vs class-conditional.

    .venv/bin/python benchmarks/bench_conformal.py --data /work/real/preprocessed \\
        --model /work/real/runs/lite0/model --out /work/real/conformal [--seeds 200]

The sets are fitted as training fits them (``fit_trust``): the validation split carved from
Training is cut in two per class by a seeded draw; half A fits the temperature (and the review
threshold), half B calibrates the sets. For each of ``--seeds`` draws, at each alpha and
score (LAC, APS), both the marginal sets (one threshold) and the class-conditional ones (one
per class) are fitted on half B and measured on half A (held out from the sets' calibration),
the official Testing split and test_clean (Testing images with no twin in Training); the
figures are means over the draws (the spread of one draw is given for validation). Testing is
shifted (its gliomas come from another source): it is reported as it is, not covered by the
guarantee. Only the model's logits are needed (cached in ``--out``); the OOD part of the trust
is not measured here (bench_trust.py), so the energy detector stands in for it.

``--package-out DIR --raw SARTAJ``: also fit the whole trust as training does (``fit_trust``
with every default: Mahalanobis on the training split's features, seed 0), export the model
again with it (``DIR/model``, ONNX included), and score the raw Testing folder with both
engines (``jobs/score.py``'s ``run_scoring``, one local Ray), comparing their sets row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_trust import read_split, run_model  # noqa: E402
from braintumor_ray import CLASS_NAMES  # noqa: E402
from braintumor_ray.models import load_model_package  # noqa: E402
from braintumor_ray.trust import TrustConfig, fit_conformal, fit_trust, softmax, split_calibration  # noqa: E402

ALPHAS = (0.05, 0.1, 0.2)
SCORES = ("lac", "aps")
METHODS = (("marginal", False), ("class-conditional", True))


def measure(cp, probs: np.ndarray, y: np.ndarray) -> dict:
    keep = cp.in_set(probs)
    size = keep.sum(axis=1)
    covered = keep[np.arange(len(y)), y]
    out = {"coverage": float(covered.mean()), "size": float(size.mean()),
           "hist": [int((size == k).sum()) for k in range(1, len(CLASS_NAMES) + 1)]}
    for c, name in enumerate(CLASS_NAMES):
        m = y == c
        out[name] = (float(covered[m].mean()), float(size[m].mean())) if m.any() else (None, None)
    return out


def mean_of(runs: list[dict]) -> dict:
    out = {"coverage": float(np.mean([r["coverage"] for r in runs])), "size": float(np.mean([r["size"] for r in runs])),
           "hist": [float(np.mean([r["hist"][k] for r in runs])) for k in range(len(CLASS_NAMES))]}
    for name in CLASS_NAMES:
        cov = [r[name][0] for r in runs if r[name][0] is not None]
        size = [r[name][1] for r in runs if r[name][1] is not None]
        out[name] = (float(np.mean(cov)), float(np.mean(size)), float(np.std(cov))) if cov else (None, None, None)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--package-out", help="re-export the model with prediction sets here and score --raw's Testing")
    p.add_argument("--raw", help="the raw dataset (Training/, Testing/) for --package-out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    pkg = load_model_package(args.model)
    cache = os.path.join(args.out, f"logits_{pkg.model_id}.npz")
    if os.path.exists(cache):
        z = dict(np.load(cache))
    else:
        z = {}
        for s in ("val", "test"):
            d = read_split(args.data, s)
            z[s + "_logits"], z[s + "_features"] = run_model(pkg, d["image"])
            z[s + "_labels"], z[s + "_leaked"] = d["label"], d["leaked"]
        np.savez(cache, **z)
    vy, ty, clean = z["val_labels"].astype(int), z["test_labels"].astype(int), ~z["test_leaked"].astype(bool)
    print(f"model {pkg.model_id}; val {len(vy)} {np.bincount(vy, minlength=4).tolist()}, test {len(ty)}, "
          f"test_clean {int(clean.sum())}; accuracy val {np.mean(z['val_logits'].argmax(1) == vy):.3f}, "
          f"test {np.mean(z['test_logits'].argmax(1) == ty):.3f}, test_clean "
          f"{np.mean(z['test_logits'][clean].argmax(1) == ty[clean]):.3f}", flush=True)

    runs: dict[tuple, list[dict]] = {}
    temps = []
    for seed in range(args.seeds):
        cal = split_calibration(vy, TrustConfig().conformal_fraction, seed=seed)
        # fit_trust as training calls it; its temperature (half A) and its class-conditional LAC
        # sets at the default alpha are those a package would carry for this draw.
        trust = fit_trust(TrustConfig(ood_detector="energy"), train_features=z["val_features"], train_labels=vy,
                          val_logits=z["val_logits"], val_features=z["val_features"], val_labels=vy, seed=seed)
        temps.append(trust.temperature)
        pv, pt = softmax(z["val_logits"], trust.temperature), softmax(z["test_logits"], trust.temperature)
        for alpha in ALPHAS:
            for score in SCORES:
                for method, cc in METHODS:
                    cp = fit_conformal(pv[cal], vy[cal], alpha=alpha, score=score, class_conditional=cc)
                    if cc and score == "lac" and alpha == TrustConfig().conformal_alpha:
                        assert cp.thresholds == trust.conformal.thresholds  # the library's fit, the same
                    for split, probs, y in (("val (held out)", pv[~cal], vy[~cal]), ("test", pt, ty),
                                            ("test_clean", pt[clean], ty[clean])):
                        runs.setdefault((alpha, score, method, split), []).append(measure(cp, probs, y))
    res = {k: mean_of(v) for k, v in runs.items()}
    print(f"\n{args.seeds} draws; temperature (half A) {np.mean(temps):.3f} +- {np.std(temps):.3f}; "
          f"{time.time() - t0:.0f} s\n", flush=True)
    names = list(CLASS_NAMES)
    for split in ("val (held out)", "test", "test_clean"):
        print(f"\n**{split}**\n")
        print("| alpha | score | sets | coverage | mean size | " + " | ".join(f"{c} cov / size" for c in names)
              + " | sizes 1/2/3/4 |")
        print("|---:|---|---|---:|---:|" + "---:|" * len(names) + "---|")
        for alpha in ALPHAS:
            for score in SCORES:
                for method, _ in METHODS:
                    r = res[(alpha, score, method, split)]
                    cells = []
                    for c in names:
                        cov, size, sd = r[c]
                        goal = "" if split != "val (held out)" or cov is None or cov >= 1 - alpha - 0.02 else " ✗"
                        cells.append("-" if cov is None else f"{cov:.3f}{goal} / {size:.2f}")
                    hist = "/".join(f"{h:.0f}" for h in r["hist"])
                    print(f"| {alpha} | {score} | {method} | {r['coverage']:.3f} | {r['size']:.2f} | "
                          + " | ".join(cells) + f" | {hist} |")
    # One draw's spread: what a single package's figures may differ from the mean by.
    print("\nstd over draws of the held-out validation per-class coverage (class-conditional LAC):")
    for alpha in ALPHAS:
        r = res[(alpha, "lac", "class-conditional", "val (held out)")]
        print(f"  alpha {alpha}: " + ", ".join(f"{c} {r[c][2]:.3f}" for c in names))
    with open(os.path.join(args.out, "conformal.json"), "w") as f:
        json.dump({" | ".join(map(str, k)): v for k, v in res.items()}, f, indent=1)
    if args.package_out and args.raw:
        score_both_engines(pkg, args, z, vy)
    return 0


def score_both_engines(pkg, args, z: dict, vy: np.ndarray) -> None:
    import pandas as pd
    import ray

    from braintumor_ray import export_model_package
    from braintumor_ray.score import ScoreConfig, run_scoring

    train = read_split(args.data, "train")
    _, train_features = run_model(pkg, train["image"])
    trust = fit_trust(TrustConfig(), train_features=train_features, train_labels=train["label"],
                      val_logits=z["val_logits"], val_features=z["val_features"], val_labels=vy)
    uri = os.path.join(args.package_out, "model")
    meta = export_model_package(pkg.model, uri, preprocess=pkg.preprocess, metrics=pkg.metrics, trust=trust)
    print(f"\nre-exported with sets: model {meta.model_id} (was {pkg.model_id}); temperature {trust.temperature:.3f}, "
          f"review threshold {trust.review_threshold:.3f}, LAC thresholds {trust.conformal.to_meta()['thresholds']} "
          f"from {trust.conformal.counts} calibration images", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    frames = {}
    for engine in ("onnxruntime", "torch"):
        out = os.path.join(args.package_out, f"testing_{engine}")
        t = time.time()
        run_scoring(ScoreConfig(model=uri, input=os.path.join(args.raw, "Testing"), output=out, engine=engine,
                                explain="none"))
        frames[engine] = pd.read_parquet(out).query("status == 'ok'").set_index("path").sort_index()
        print(f"{engine}: {len(frames[engine])} rows in {time.time() - t:.0f} s", flush=True)
    ray.shutdown()
    a, b = frames["onnxruntime"], frames["torch"]
    same = [list(x) == list(y) for x, y in zip(a.prediction_set, b.prediction_set)]
    print(f"sets equal in both engines: {sum(same)}/{len(same)}; labels equal: {(a.predicted_label == b.predicted_label).sum()}"
          f"; review reasons equal: {(a.review_reason.fillna('-') == b.review_reason.fillna('-')).sum()}")
    truth = a.index.map(lambda p: next(c for c in CLASS_NAMES if f"/{c.split('_')[0]}" in p.lower()))
    covered = [t in list(s) for t, s in zip(truth, a.prediction_set)]
    print(f"Testing scored from raw files: coverage {np.mean(covered):.3f}, set sizes {a.set_size.value_counts().sort_index().to_dict()}, "
          f"review reasons {a.review_reason.fillna('none').value_counts().to_dict()}")
    for c in CLASS_NAMES:
        m = np.asarray(truth == c)
        print(f"  {c}: n {m.sum()}, coverage {np.mean(np.asarray(covered)[m]):.3f}, mean set size {a.set_size[m].mean():.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
