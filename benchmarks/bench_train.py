"""Training throughput: Ray Train's per-worker images/s against plain PyTorch loops, same run.

    .venv/bin/python benchmarks/bench_train.py --data /tmp/sartaj-pre [--images 256 --epochs 3 --repeats 3]

Same model (Lite0, default transfer mode, channels_last on CPU), same images, same augmentation,
batch size and optimizer everywhere: every side calls the very ``train_one_epoch`` the Ray worker
calls, with one torch thread per process (what a 1-CPU Ray worker gets).

- plain: one process, batches from memory, no Ray, no DDP (the issue's baseline).
- plain DDP: ``torch.distributed`` (gloo) over N spawned processes, each on its 1/N of the
  images, batches from memory: a hand-written DDP script without Ray, so that
  Ray Train with N workers / plain DDP with N processes is the cost of Ray itself.
- Ray Train: ``TorchTrainer`` with the real ``train_loop_per_worker`` and the Ray Data shard.

The machine's speed drifts by 10-20% over minutes, so the sides are measured in rounds
(plain, Ray 1 worker, plain DDP, Ray N workers), each ratio is taken within its round, and the
median over rounds is reported. Every epoch but the first (warm-up) is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from braintumor_ray.models import create_model, data_config, prepare_input  # noqa: E402
from braintumor_ray.train import TrainConfig, TrainData, build_trainer, load_train_data, train_one_epoch  # noqa: E402
from braintumor_ray.train import make_criterion, make_optimizer  # noqa: E402


def plain_loop(cfg: TrainConfig, pixels: np.ndarray, labels: np.ndarray, class_counts, epochs: int, *, rank: int = 0, world: int = 1) -> list[float]:
    """images/s of each epoch of one process (one rank of ``world`` when ``world > 1``)."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, transfer=cfg.transfer_mode, channels_last=cfg.use_channels_last)
    dc = data_config(model)
    opt = make_optimizer(model, cfg)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    crit = make_criterion(cfg, class_counts)
    gen = torch.Generator().manual_seed(rank)
    pixels, labels = pixels[rank::world], labels[rank::world]
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
            augment=cfg.train_augment, generator=gen, device=torch.device("cpu"), grad_accum_steps=cfg.grad_accum_steps,
        )
        rates.append(r["seen"] / r["seconds"])
    return rates


def _ddp_rank(rank: int, world: int, port: int, cfg_dict: dict, npz: str, counts, epochs: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    d = np.load(npz)
    queue.put((rank, plain_loop(TrainConfig.from_dict(cfg_dict), d["pixels"], d["labels"], counts, epochs, rank=rank, world=world)))
    dist.destroy_process_group()


def plain_ddp(cfg: TrainConfig, npz: str, counts, world: int, epochs: int) -> list[float]:
    """Per-process images/s of each epoch (mean over ranks) of ``world`` DDP processes, no Ray."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, cfg.to_dict(), npz, counts, epochs, queue)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return [float(np.mean([rates[e] for _, rates in per_rank])) for e in range(epochs)]


def ray_train(cfg: TrainConfig, data: TrainData, workers: int, epochs: int, storage: str) -> list[float]:
    c = cfg.replace(num_workers=workers, epochs=epochs, storage=storage, name=f"bench-{workers}w-{int(time.time())}",
                    early_stop_patience=0, warmup_epochs=0)
    hist = build_trainer(c, data=data).fit().return_value["history"]
    return [h["train_images_per_s_per_worker"] for h in hist]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="output of jobs/preprocess.py (224 px)")
    p.add_argument("--model", default=TrainConfig().model)
    p.add_argument("--images", type=int, default=256, help="training images per run (per worker: images / workers)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement; all but the first are timed")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (plain, Ray 1 worker, plain DDP, Ray N workers)")
    p.add_argument("--workers", type=int, default=2, help="N: DDP processes / Ray Train workers")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step, on every side")
    p.add_argument("--storage", default="/tmp/bench-train-runs")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is warm-up)")

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = TrainConfig(model=args.model, data=args.data, eval_batch_size=64, grad_accum_steps=args.grad_accum_steps)
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
                      "grad_accum_steps": cfg.grad_accum_steps, "channels_last": cfg.use_channels_last, "images": len(labels),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    n = args.workers
    timed = lambda rates: float(np.mean(rates[1:]))  # noqa: E731
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "train.npz")
        np.savez(npz, pixels=pixels, labels=labels)
        for r in range(args.repeats):
            m = {"plain": timed(plain_loop(cfg, pixels, labels, counts, args.epochs))}
            m["ray_1"] = timed(ray_train(cfg, data, 1, args.epochs, args.storage))
            m[f"plain_ddp_{n}"] = timed(plain_ddp(cfg, npz, counts, n, args.epochs))
            m[f"ray_{n}"] = timed(ray_train(cfg, data, n, args.epochs, args.storage))
            rounds.append(m)
            print(json.dumps({"round": r + 1, **{k: round(v, 2) for k, v in m.items()}}), flush=True)

    def med(f):
        return statistics.median(f(m) for m in rounds)

    rows = [
        ("plain loop, 1 process", lambda m: m["plain"], lambda m: 1.0, None),
        ("Ray Train, 1 worker", lambda m: m["ray_1"], lambda m: m["ray_1"] / m["plain"], None),
        (f"plain DDP, {n} processes (no Ray)", lambda m: m[f"plain_ddp_{n}"], lambda m: m[f"plain_ddp_{n}"] / m["plain"], None),
        (f"Ray Train, {n} workers (DDP)", lambda m: m[f"ray_{n}"], lambda m: m[f"ray_{n}"] / m["plain"],
         lambda m: m[f"ray_{n}"] / m[f"plain_ddp_{n}"]),
    ]
    print(f"\nmedian of {len(rounds)} rounds, 1 thread per process/worker")
    print(f"{'run':<36}{'img/s per worker':>17}{'vs plain':>10}{'vs plain DDP':>14}")
    for name, rate, ratio, vs_ddp in rows:
        print(f"{name:<36}{med(rate):>17.2f}{med(ratio):>10.2f}{(f'{med(vs_ddp):.2f}' if vs_ddp else '-'):>14}")
    print(json.dumps({"summary": {name: {"img_s": round(med(rate), 2), "vs_plain": round(med(ratio), 2),
                                         **({"vs_plain_ddp": round(med(vs_ddp), 2)} if vs_ddp else {})}
                                  for name, rate, ratio, vs_ddp in rows},
                      "rounds": [{k: round(v, 2) for k, v in m.items()} for m in rounds]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
