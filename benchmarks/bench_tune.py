"""Ray Tune benchmarks: a search on real data, and Tune's overhead on concurrent tiny trials.

    # a CPU-sized search over the four backbones (random init, small images) on the real data
    .venv/bin/python jobs/preprocess.py --input ../shared/data/sartaj-brain-mri --output /tmp/sartaj-64 --image-size 64
    .venv/bin/python benchmarks/bench_tune.py search --data /tmp/sartaj-64 --storage /tmp/tune-bench

    # Tune's overhead: 8 tiny trials at once under Tune vs the same 8 Ray Train runs at once without it
    .venv/bin/python benchmarks/bench_tune.py overhead

The overhead measure follows Ray's own Tune+Torch release benchmark: the same N training runs
launched concurrently as plain ``TorchTrainer.fit()`` calls (threads in one driver) and as N
concurrent Tune trials; the ratio of the two wall times is what Tune adds (Ray holds it < 1.2x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from braintumor_ray import MRIPreprocess, make_sample_dataset  # noqa: E402
from braintumor_ray.ingest import IngestConfig, run_ingest  # noqa: E402


def search(args) -> None:
    from braintumor_ray.tune import SearchConfig, format_leaderboard, run_search

    cfg = SearchConfig(
        data=args.data, storage=args.storage, name=args.name, models=tuple(args.models.split(",")),
        num_samples=args.num_samples, max_epochs=args.max_epochs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, cpus_per_trial=1.0, pretrained=False,
        space={"batch_size": {"choice": [32, 64]}, "lr": {"loguniform": [3e-4, 3e-3]}},
        fixed={"warmup_epochs": 0.5, "early_stop_patience": 0, "num_to_keep": 1},
    )
    t = time.time()
    s = run_search(cfg)
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"search wall {time.time() - t:.0f} s; trial-epochs run {s['trial_epochs_run']} of {s['trial_epochs_budget']} "
          f"(ASHA saved {s['asha_saved_fraction']:.0%})")
    print(format_leaderboard(s["leaderboard"]))
    for split in ("val", "test", "test_clean"):
        m = s[split]
        print(f"best ({s['best_trial']['backbone']}) {split}: n={m['n']} accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f}")


def _tiny_data(root: str) -> str:
    make_sample_dataset(os.path.join(root, "sample"), per_class=12, test_per_class=2, size=80, seed=5)
    out = os.path.join(root, "pre")
    run_ingest(IngestConfig(input=os.path.join(root, "sample"), output=out, preprocess=MRIPreprocess(image_size=48)))
    return out


def overhead(args) -> None:
    import ray

    from braintumor_ray.train import build_trainer, load_train_data
    from braintumor_ray.tune import SearchConfig, run_search

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    root = tempfile.mkdtemp(prefix="bench-tune-")
    data_uri = _tiny_data(root)
    data = load_train_data(data_uri)
    n, cpus = args.trials, os.cpu_count() / args.trials
    cfg = SearchConfig.smoke_test(
        data=data_uri, storage=os.path.join(root, "runs"), name="tune", models=("resnet10t",), num_samples=n,
        max_epochs=args.epochs, grace_period=args.epochs, cpus_per_trial=cpus, max_concurrent_trials=n,
        space={"lr": 2e-3, "batch_size": 16, "weight_decay": 0.01, "drop_rate": 0.0, "augment_strength": 0.5},
    )

    def plain(i: int) -> float:
        t = time.time()
        tcfg = cfg.trial_config({"model": "resnet10t"}, trial_id=f"plain{i}").replace(
            storage=os.path.join(root, "plain"))
        build_trainer(tcfg, data=data).fit()
        return time.time() - t

    figures = {}
    for rep in range(args.repeats):
        t = time.time()
        with ThreadPoolExecutor(n) as pool:
            per_run = list(pool.map(plain, range(rep * n, rep * n + n)))
        figures.setdefault("plain_wall_s", []).append(time.time() - t)
        t = time.time()
        s = run_search(dataclasses.replace(cfg, name=f"tune{rep}"))
        figures.setdefault("search_wall_s", []).append(time.time() - t)
        # The trials phase (Tuner.fit) is what compares with the plain runs; the rest of the
        # search (loading the data once, checking backbones, the leaderboard and the export) is listed.
        figures.setdefault("tune_wall_s", []).append(s["timing"]["trials_s"])
        figures.setdefault("search_timing", []).append(s["timing"])
        print(f"rep {rep}: {n} plain runs at once {figures['plain_wall_s'][-1]:.1f} s (each {min(per_run):.1f}-"
              f"{max(per_run):.1f} s); {n} Tune trials at once {figures['tune_wall_s'][-1]:.1f} s "
              f"(whole search {figures['search_wall_s'][-1]:.1f} s: {s['timing']})", flush=True)
    t = time.time()
    build_trainer(cfg.trial_config({"model": "resnet10t"}, trial_id="alone").replace(
        storage=os.path.join(root, "plain"), cpus_per_worker=1.0), data=data).fit()
    figures["one_run_alone_s"] = time.time() - t
    plain_w, tune_w = min(figures["plain_wall_s"]), min(figures["tune_wall_s"])
    print(json.dumps(figures, indent=1))
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{n} concurrent tiny trials: Tune {tune_w:.1f} s vs plain {plain_w:.1f} s -> overhead {tune_w / plain_w:.2f}x "
          f"(best of {args.repeats}); one run alone {figures['one_run_alone_s']:.1f} s")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="a search on preprocessed real data")
    s.add_argument("--data", required=True)
    s.add_argument("--storage", default="/tmp/tune-bench")
    s.add_argument("--name", default=time.strftime("search-%H%M%S", time.gmtime()))
    s.add_argument("--models", default="efficientnet_b0,resnet50,vgg16,legacy_xception")
    s.add_argument("--num-samples", type=int, default=2)
    s.add_argument("--max-epochs", type=int, default=4)
    s.add_argument("--grace-period", type=int, default=1)
    s.add_argument("--reduction-factor", type=int, default=2)
    o = sub.add_parser("overhead", help="N concurrent tiny trials: Tune vs plain Ray Train runs")
    o.add_argument("--trials", type=int, default=8)
    o.add_argument("--epochs", type=int, default=2)
    o.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    {"search": search, "overhead": overhead}[args.cmd](args)


if __name__ == "__main__":
    main()
