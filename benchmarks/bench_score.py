"""Scoring throughput: the Ray Data job against a plain PyTorch DataLoader loop, same run.

    .venv/bin/python benchmarks/bench_score.py [--data ../shared/data/sartaj-brain-mri] [--model URI]

Both sides use the same model package (default: Lite0 with the offline ImageNet weights and a
new head, exported to a temporary folder), the same MRIPreprocess, the same channels_last
inference, and the same CPUs: the loop decodes in one DataLoader worker process and runs the
model on one thread in the main process; the job gets a 2-CPU Ray with one model actor and
decode tasks on the other CPU. With --use-gpu both put the model on the GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import tempfile
import time

import numpy as np
import torch

from braintumor_ray import MRIPreprocess, create_model, export_model_package, load_model_package
from braintumor_ray.score import ScoreConfig, format_summary, run_scoring

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--model", default=None, help="model package URI (default: Lite0, offline weights)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--use-gpu", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = sorted(f for f in glob.glob(os.path.join(os.path.abspath(args.data), "**", "*"), recursive=True) if os.path.isfile(f))
    device = "cuda" if args.use_gpu else "cpu"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = args.model
        if model_uri is None:
            model_uri = os.path.join(tmp, "lite0")
            export_model_package(create_model("tf_efficientnet_lite0"), model_uri, preprocess=MRIPreprocess())
        pkg = load_model_package(model_uri, channels_last=not args.use_gpu)
        print(f"{len(files)} files; model {pkg.backbone} {pkg.model_id}; {os.cpu_count()} CPUs; {platform.machine()}; device {device}")

        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Start the actor processes once (as a scheduled job on a standing cluster would find them).
        warm = os.path.join(tmp, "warm")
        os.makedirs(warm)
        for f in files[:8]:
            os.link(f, os.path.join(warm, os.path.basename(f)))
        run_scoring(ScoreConfig(model=model_uri, input=warm, output=os.path.join(tmp, "warm-out"), use_gpu=args.use_gpu))

        base1 = plain_loop(files, pkg, args.batch_size, device)
        t = time.perf_counter()
        summary = run_scoring(
            ScoreConfig(model=model_uri, input=os.path.abspath(args.data), output=os.path.join(tmp, "preds"), batch_size=args.batch_size, use_gpu=args.use_gpu)
        )
        job_s = time.perf_counter() - t
        base2 = plain_loop(files, pkg, args.batch_size, device)
    print(format_summary(summary))
    base = (base1 + base2) / 2
    print(
        json.dumps(
            {
                "files": len(files),
                "plain_loop_img_s": [round(base1, 1), round(base2, 1)],
                "ray_job_s": round(job_s, 2),
                "ray_job_img_s": round(len(files) / job_s, 1),
                "ratio_vs_loop": round(len(files) / job_s / base, 2),
                "replicas": summary["replicas"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
