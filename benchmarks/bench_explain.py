"""Heat maps on the real data: a montage of Testing images with their Grad-CAM maps, and what
``--explain`` costs a scoring run (docs/benchmarks.md, docs/scoring.md).

    .venv/bin/python benchmarks/bench_explain.py --model /work/real/runs/lite0/model \\
        [--data ../shared/data/sartaj-brain-mri] [--rounds 2] [--montage docs/explain_montage.png]

1. Montage: 4 Testing images of each class (the first by file name), as the model saw them
   (the crop), with the map of the class it predicted, the true and predicted class and the
   calibrated confidence.
2. The explainer against plain pytorch-grad-cam on the same model (``GradCAM`` on the package's
   model as it is, backward through the whole backbone), 64 images, interleaved rounds: the
   maps must agree, and the ratio says what cutting the backward pass at the target layer buys.
3. Scoring the official Testing split (394 files) into a fresh output with ``--explain none``,
   ``flagged`` and ``all``, in rounds, each round in another order; each ratio against ``none``
   is taken within its round (the machine drifts). One Ray session for all runs, as a
   long-lived cluster would have.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from braintumor_ray import CLASS_NAMES, canonical_label, load_model_package  # noqa: E402
from braintumor_ray.explain import Explainer, heatmap_peak, overlay  # noqa: E402
from braintumor_ray.score import ScoreConfig, run_scoring  # noqa: E402
from braintumor_ray.trust import softmax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def testing_files(data: str) -> list[tuple[str, str]]:
    """(path, canonical label) of every Testing image, sorted."""
    out = []
    for path in sorted(glob.glob(os.path.join(data, "Testing", "*", "*"))):
        out.append((path, canonical_label(os.path.basename(os.path.dirname(path)))))
    return out


def montage(pkg, files: list[tuple[str, str]], path: str, per_class: int = 4) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    chosen = [(p, lab) for c in CLASS_NAMES for p, lab in [f for f in files if f[1] == c][:per_class]]
    images = np.stack([pkg.preprocess(open(p, "rb").read()).pixels for p, _ in chosen])
    with torch.inference_mode():
        logits = pkg.model(pkg.prepare(images))
    probs = softmax(logits.numpy(), pkg.trust.temperature if pkg.trust is not None else 1.0)  # calibrated
    predicted = probs.argmax(1)
    maps = Explainer(pkg.model, mean=pkg.data_config["mean"], std=pkg.data_config["std"]).heatmaps(images, classes=list(predicted))
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(2.6 * per_class, 2.9 * len(CLASS_NAMES)))
    for ax, (p, lab), im, heat, k, pr in zip(axes.ravel(), chosen, images, maps, predicted, probs):
        ax.imshow(overlay(im, heat))
        y, x = heatmap_peak(heat)
        ax.plot([x], [y], marker="+", color="white", markersize=10, mew=1.5)
        right = CLASS_NAMES[k] == lab
        ax.set_title(f"true {lab}\npred {CLASS_NAMES[k]} {pr[k]:.2f}", fontsize=8, color="black" if right else "firebrick")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Official Testing images, the crop the model saw, Grad-CAM of the predicted class (+: peak)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    from PIL import Image

    # A 256-colour palette: a third of the bytes, no visible loss at this size.
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)
    return {"images": len(chosen), "correct": int(sum(CLASS_NAMES[k] == lab for (_, lab), k in zip(chosen, predicted)))}


def cut_vs_plain(pkg, files: list[tuple[str, str]], rounds: int, n: int = 64) -> dict:
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from braintumor_ray.explain import target_layer

    images = np.stack([pkg.preprocess(open(p, "rb").read()).pixels for p, _ in files[:n]])
    ex = Explainer(pkg.model, mean=pkg.data_config["mean"], std=pkg.data_config["std"])
    with torch.inference_mode():
        classes = pkg.model(pkg.prepare(images)).argmax(1).tolist()
    # The same memory format as the explainer's (channels_last on CPU): the ratio is the cut alone.
    plain_model = pkg.model.eval().to(memory_format=torch.channels_last)
    plain = GradCAM(model=plain_model, target_layers=[target_layer(plain_model)[1]])
    x = pkg.prepare(images).contiguous(memory_format=torch.channels_last)
    rows, diff = [], 0.0
    for r in range(rounds):
        t = time.perf_counter()
        a = ex.heatmaps(images, classes=classes)
        t_cut = time.perf_counter() - t
        t = time.perf_counter()
        b = np.concatenate([plain(input_tensor=x[s : s + 32], targets=[ClassifierOutputTarget(c) for c in classes[s : s + 32]])
                            for s in range(0, n, 32)])
        t_plain = time.perf_counter() - t
        diff = max(diff, float(np.abs(a - b).max()))
        rows.append({"round": r + 1, "cut_images_per_s": round(n / t_cut, 2), "plain_images_per_s": round(n / t_plain, 2),
                     "ratio": round(t_plain / t_cut, 2)})
    return {"images": n, "rounds": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
            "max_map_difference": diff}


def scoring_cost(model: str, data: str, rounds: int, work: str) -> dict:
    inp = os.path.join(data, "Testing")
    modes = ["none", "flagged", "all"]
    rows = []
    for r in range(rounds):
        order = modes[r % 3:] + modes[: r % 3]
        timing = {}
        for mode in order:
            out = os.path.join(work, f"preds-{mode}-{r}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out + "_explain", ignore_errors=True)
            t = time.perf_counter()
            s = run_scoring(ScoreConfig(model=model, input=inp, output=out, explain=mode))
            timing[mode] = {"wall_s": round(time.perf_counter() - t, 1), "scored": s["scored"], "heatmaps": s.get("heatmaps", 0)}
        rows.append({"round": r + 1, "order": order, **timing,
                     **{f"{m}_vs_none": round(timing[m]["wall_s"] / timing["none"]["wall_s"], 2) for m in ("flagged", "all")}})
    return {"rounds": rows, **{f"median_{m}_vs_none": statistics.median(r[f"{m}_vs_none"] for r in rows)
                               for m in ("flagged", "all")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model package trained on the real data")
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--montage", default=os.path.join(HERE, "..", "docs", "explain_montage.png"))
    ap.add_argument("--json", help="write the figures here as JSON too")
    a = ap.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    files = testing_files(a.data)
    pkg = load_model_package(a.model)
    figures = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
               "model": a.model, "model_id": pkg.model_id, "testing_files": len(files)}
    figures["montage"] = montage(pkg, files, a.montage) | {"path": a.montage}
    figures["cut_vs_plain_grad_cam"] = cut_vs_plain(pkg, files, a.rounds)
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="bench-explain-")
    try:
        figures["scoring"] = scoring_cost(a.model, a.data, a.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    print(json.dumps(figures, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
