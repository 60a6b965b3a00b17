"""Scoring throughput: the Ray Data job against a plain PyTorch DataLoader loop, same run.

    .venv/bin/python benchmarks/bench_score.py [--data ../shared/data/sartaj-brain-mri] [--model URI]
        [--rounds 3] [--layouts 1x1,1x1.5,2x0.75]

Both sides use the same model package (default: Lite0 with the offline ImageNet weights and a
new head, exported to a temporary folder; a package without ``model.onnx`` is re-exported with
it, which keeps its model id), the same MRIPreprocess and the same CPUs. The plain loop is what
a user's own script would be: eager PyTorch (channels_last) on one thread in the main process,
decoding in one DataLoader worker process. The job runs with its defaults (``engine auto``: ONNX
Runtime on CPU) on a Ray of all the machine's CPUs. The sides alternate in rounds and each
ratio is taken within its round (the machine is shared and drifts). One more job run with
``engine torch`` gives the reference labels: every image's label must be identical and every
probability within 1e-4. ``--layouts`` also times other replica layouts (replicas x CPUs
each) of the ONNX Runtime job, each once, for the threads decision. With --use-gpu both sides
put the model on the GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import pyarrow.dataset as pads
import torch

from braintumor_ray import MRIPreprocess, create_model, export_model_package, load_model_package
from braintumor_ray.models import ONNX_TOLERANCE, package_has_onnx
from braintumor_ray.score import PROB_PREFIX, ScoreConfig, format_summary, run_scoring

HERE = os.path.dirname(os.path.abspath(__file__))


class Files(torch.utils.data.Dataset):
    def __init__(self, files, preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(self.preprocess(open(self.files[i], "rb").read()).pixels)
        except Exception:
            return torch.zeros((self.preprocess.image_size,) * 2, dtype=torch.uint8)


def plain_loop(files, pkg, batch_size: int, device: str) -> float:
    loader = torch.utils.data.DataLoader(Files(files, pkg.preprocess), batch_size=batch_size, num_workers=1)
    model = pkg.model.to(device)
    t = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for pixels in loader:
            x = pkg.prepare(pixels).to(device)
            torch.softmax(model(x).float(), 1).cpu()
            n += len(pixels)
    return n / (time.perf_counter() - t)


def job(model_uri: str, data: str, out: str, n_files: int, **kw) -> tuple[float, dict]:
    t = time.perf_counter()
    summary = run_scoring(ScoreConfig(model=model_uri, input=data, output=out, **kw))
    rate = n_files / (time.perf_counter() - t)
    assert summary["scored"] + summary["errors"] == n_files, summary
    return rate, summary


def start_warm_ray(model_uri: str, files: list[str], tmp: str, **kw) -> None:
    """Ray on every core, then one small scoring run, so that the measured runs find the actor
    processes started (as a scheduled job on a standing cluster would find them)."""
    import ray

    # Ray starts its workers at nice 15. On this shared machine that would make the job's
    # workers yield to every other process while the plain loop runs at nice 0: measure speed,
    # not priority (on a dedicated node the two are the same).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    warm = os.path.join(tmp, "warm")
    os.makedirs(warm)
    for f in files[:8]:
        os.link(f, os.path.join(warm, os.path.basename(f)))
    run_scoring(ScoreConfig(model=model_uri, input=warm, output=os.path.join(tmp, "warm-out"), **kw))


def compare(a_dir: str, b_dir: str) -> dict:
    """Labels and probabilities of two prediction folders, image by image."""
    cols = ["path", "status", "predicted_label", *[c for c in pads.dataset(a_dir).schema.names if c.startswith(PROB_PREFIX)]]
    a = pads.dataset(a_dir).to_table(columns=cols).to_pandas().set_index("path").sort_index()
    b = pads.dataset(b_dir).to_table(columns=cols).to_pandas().set_index("path").sort_index()
    assert list(a.index) == list(b.index), "the two runs scored different files"
    ok = (a["status"] == "ok") & (b["status"] == "ok")
    probs = [c for c in cols if c.startswith(PROB_PREFIX)]
    diff = float(np.abs(a.loc[ok, probs].to_numpy() - b.loc[ok, probs].to_numpy()).max())
    return {
        "images": int(len(a)),
        "ok_both": int(ok.sum()),
        "status_identical": bool((a["status"] == b["status"]).all()),
        "labels_identical": int((a.loc[ok, "predicted_label"] == b.loc[ok, "predicted_label"]).sum()),
        "labels_differ": int((a.loc[ok, "predicted_label"] != b.loc[ok, "predicted_label"]).sum()),
        "max_abs_prob_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--model", default=None, help="model package URI (default: Lite0, offline weights, new head)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (plain loop, job)")
    ap.add_argument("--layouts", default="", help="extra job layouts to time once each, e.g. 1x1,1x1.5,2x0.75 "
                    "(model replicas x CPUs each)")
    ap.add_argument("--no-torch-check", action="store_true", help="skip the engine torch run (labels check)")
    ap.add_argument("--use-gpu", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = os.path.abspath(args.data)
    files = sorted(f for f in glob.glob(os.path.join(data, "**", "*"), recursive=True) if os.path.isfile(f))
    device = "cuda" if args.use_gpu else "cpu"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = args.model
        if model_uri is None:
            model_uri = os.path.join(tmp, "lite0")
            export_model_package(create_model("tf_efficientnet_lite0"), model_uri, preprocess=MRIPreprocess())
        pkg = load_model_package(model_uri, channels_last=not args.use_gpu)
        if not package_has_onnx(pkg.meta):  # a package from before ONNX: the same model, re-exported with it
            model_uri = os.path.join(tmp, "with-onnx")
            again = export_model_package(pkg.model, model_uri, preprocess=pkg.preprocess, class_names=pkg.class_names,
                                         metrics=pkg.metrics)
            assert again.model_id == pkg.model_id
        print(json.dumps({"files": len(files), "model": pkg.backbone, "model_id": pkg.model_id, "package": args.model or "lite0 (ImageNet backbone, new head)",
                          "cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(), "device": device,
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)

        start_warm_ray(model_uri, files, tmp, use_gpu=args.use_gpu)

        common = dict(batch_size=args.batch_size, use_gpu=args.use_gpu)
        rounds, summary = [], {}
        for r in range(args.rounds):
            base = plain_loop(files, pkg, args.batch_size, device)
            rate, summary = job(model_uri, data, os.path.join(tmp, f"preds-{r}"), len(files), **common)
            rounds.append({"plain_loop_img_s": round(base, 1), "job_img_s": round(rate, 1), "ratio": round(rate / base, 2)})
            print(json.dumps({"round": r + 1, **rounds[-1], "engine": summary["engine"], "replicas": summary["replicas"],
                              "cpus_per_replica": summary["cpus_per_replica"]}), flush=True)
        print(format_summary(summary), flush=True)
        result = {
            "rounds": rounds,
            "median_ratio": statistics.median(r["ratio"] for r in rounds),
            "engine": summary["engine"],
            "replicas": summary["replicas"],
            "cpus_per_replica": summary["cpus_per_replica"],
        }
        layouts = []
        for spec in filter(None, args.layouts.split(",")):
            n, c = spec.split("x")
            base = plain_loop(files, pkg, args.batch_size, device)
            rate, s = job(model_uri, data, os.path.join(tmp, f"layout-{spec}"), len(files), concurrency=int(n),
                          cpus_per_replica=float(c), **common)
            layouts.append({"layout": spec, "plain_loop_img_s": round(base, 1), "job_img_s": round(rate, 1), "ratio": round(rate / base, 2)})
            print(json.dumps(layouts[-1]), flush=True)
        if layouts:
            result["layouts"] = layouts
        if not args.no_torch_check:
            rate, _ = job(model_uri, data, os.path.join(tmp, "preds-torch"), len(files), engine="torch", **common)
            result["job_engine_torch_img_s"] = round(rate, 1)
            check = compare(os.path.join(tmp, "preds-0"), os.path.join(tmp, "preds-torch"))
            check["within_tolerance"] = check["max_abs_prob_diff"] <= ONNX_TOLERANCE and check["labels_differ"] == 0
            result["vs_engine_torch"] = check
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
