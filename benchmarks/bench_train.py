"""Training throughput: Ray Train's per-worker images/s against a plain single-process PyTorch loop.

    .venv/bin/python benchmarks/bench_train.py --data /tmp/sartaj-pre [--images 384 --epochs 2]

Same model (Lite0, default transfer mode, channels_last on CPU), same images, same augmentation,
batch size and optimizer: the plain loop calls the very ``train_one_epoch`` the Ray worker
calls, on batches held in memory, with as many torch threads as a Ray worker gets CPUs. The
last epoch of each is timed (the first pays for warm-up). Prints one JSON line per measurement
and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from braintumor_ray.models import create_model, data_config, param_groups, prepare_input  # noqa: E402
from braintumor_ray.train import TrainConfig, TrainData, build_trainer, load_train_data, train_one_epoch  # noqa: E402
from braintumor_ray.train._loop import class_weights  # noqa: E402


def plain_loop(cfg: TrainConfig, pixels: np.ndarray, labels: np.ndarray, class_counts, threads: int, epochs: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, transfer=cfg.transfer_mode, channels_last=cfg.use_channels_last)
    dc = data_config(model)
    opt = torch.optim.AdamW(param_groups(model, lr=cfg.lr, backbone_lr_scale=cfg.backbone_lr, weight_decay=cfg.weight_decay))
    crit = torch.nn.CrossEntropyLoss(weight=class_weights(class_counts, cfg.class_weighting) if cfg.class_weighting != "none" else None, label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(labels))
        batches = (
            {"image": torch.from_numpy(pixels[order[i : i + cfg.batch_size]]), "label": torch.from_numpy(labels[order[i : i + cfg.batch_size]])}
            for i in range(0, len(order), cfg.batch_size)
        )
        r = train_one_epoch(
            model, batches, criterion=crit, optimizer=opt, scheduler=None,
            prepare=lambda p: prepare_input(p, mean=dc["mean"], std=dc["std"], channels_last=cfg.use_channels_last),
            augment=cfg.train_augment, generator=gen, device=torch.device("cpu"),
        )
        rates.append(r["seen"] / r["seconds"])
        print(json.dumps({"what": "plain", "threads": threads, "epoch": epoch + 1, "images": r["seen"], "img_s": round(rates[-1], 2),
                          "epoch_s": round(r["seconds"], 2), "data_wait_s": round(r["data_wait_s"], 2)}), flush=True)
    return rates


def _plain_worker(args) -> float:
    cfg_dict, npz, counts, epochs = args
    d = np.load(npz)
    return plain_loop(TrainConfig.from_dict(cfg_dict), d["pixels"], d["labels"], counts, 1, epochs)[-1]


def plain_concurrent(cfg: TrainConfig, pixels: np.ndarray, labels: np.ndarray, counts, procs: int, epochs: int) -> list[float]:
    """``procs`` plain 1-thread loops at once, each on its share of the images: the per-process
    rate when every core is busy (what a Ray worker gets when all workers run), minus Ray and DDP."""
    import multiprocessing as mp
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = []
        for k in range(procs):
            path = os.path.join(d, f"part{k}.npz")
            np.savez(path, pixels=pixels[k::procs], labels=labels[k::procs])
            paths.append(path)
        with mp.get_context("spawn").Pool(procs) as pool:
            rates = pool.map(_plain_worker, [(cfg.to_dict(), p, counts, epochs) for p in paths])
    print(json.dumps({"what": "plain_concurrent", "processes": procs, "img_s_per_process": [round(r, 2) for r in rates]}), flush=True)
    return rates


def ray_train(cfg: TrainConfig, data: TrainData, workers: int, epochs: int, storage: str) -> list[float]:
    c = cfg.replace(num_workers=workers, epochs=epochs, storage=storage, name=f"bench-{workers}w-{int(time.time())}",
                    early_stop_patience=0, warmup_epochs=0)
    result = build_trainer(c, data=data).fit()
    hist = result.return_value["history"]
    rates = [h["train_images_per_s_per_worker"] for h in hist]
    for i, h in enumerate(hist):
        print(json.dumps({"what": "ray", "workers": workers, "epoch": i + 1, "img_s_per_worker": round(rates[i], 2),
                          "epoch_s": round(h["epoch_s"], 2), "data_wait_s": round(h["data_wait_s"], 2)}), flush=True)
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="output of jobs/preprocess.py (224 px)")
    p.add_argument("--model", default=TrainConfig().model)
    p.add_argument("--images", type=int, default=384, help="training images per run (per worker: images / workers)")
    p.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    p.add_argument("--storage", default="/tmp/bench-train-runs")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = TrainConfig(model=args.model, data=args.data, eval_batch_size=64)
    full = load_train_data(args.data)
    train = full.datasets["train"].limit(args.images).materialize()
    val = full.datasets["val"].limit(64).materialize()
    batch = next(iter(train.iter_batches(batch_size=args.images, batch_format="numpy")))
    pixels, labels = np.ascontiguousarray(batch["image"]), batch["label"].astype(np.int64)
    counts = np.bincount(labels, minlength=4).tolist()
    data = TrainData(datasets={"train": train, "val": val}, counts={"train": len(labels), "val": 64},
                     class_counts=counts, report=full.report, image_size=full.image_size)
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                      "model": cfg.model, "transfer": cfg.transfer_mode, "image_size": full.image_size, "batch_size": cfg.batch_size,
                      "channels_last": cfg.use_channels_last, "images": len(labels), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    out = {}
    threads_per_worker = max(1, int(cfg.cpus_per_worker))
    out["plain_1"] = plain_loop(cfg, pixels, labels, counts, threads_per_worker, args.epochs)[-1]
    for w in [int(x) for x in args.workers.split(",")]:
        out[f"ray_{w}"] = ray_train(cfg, data, w, args.epochs, args.storage)[-1]
    n = os.cpu_count()
    out[f"plain_{n}"] = plain_loop(cfg, pixels, labels, counts, n, args.epochs)[-1]
    out[f"plain_concurrent_{n}"] = float(np.mean(plain_concurrent(cfg, pixels, labels, counts, n, args.epochs)))
    base = out["plain_1"]
    print(f"\n{'run':<34}{'img/s':>8}{'per worker':>12}{'vs plain 1 thread':>19}")
    print(f"{'plain loop, 1 process, 1 thread':<34}{base:>8.2f}{base:>12.2f}{1.0:>19.2f}")
    for w in [int(x) for x in args.workers.split(",")]:
        r = out[f"ray_{w}"]
        print(f"{f'Ray Train, {w} worker(s) x 1 CPU':<34}{r * w:>8.2f}{r:>12.2f}{r / base:>19.2f}")
    print(f"{f'plain loop, 1 process, {n} threads':<34}{out[f'plain_{n}']:>8.2f}{out[f'plain_{n}']:>12.2f}{out[f'plain_{n}'] / base:>19.2f}")
    c = out[f"plain_concurrent_{n}"]
    print(f"{f'plain loop, {n} processes x 1 thread':<34}{c * n:>8.2f}{c:>12.2f}{c / base:>19.2f}")
    if f"ray_{n}" in out:
        print(f"Ray Train {n} workers per worker / plain {n} concurrent processes per process: {out[f'ray_{n}'] / c:.2f}")
    print(json.dumps({"summary": {k: round(v, 2) for k, v in out.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
