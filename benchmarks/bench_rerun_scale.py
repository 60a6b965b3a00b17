"""Scheduled reruns at scale: what a run costs when little or nothing changed.

    .venv/bin/python benchmarks/bench_rerun_scale.py [--n 10000] [--work /tmp/rerun-scale] [--model URI] [--reuse]
    .venv/bin/python benchmarks/bench_rerun_scale.py --n 10000 --baseline /tmp/main-checkout [--profile DIR]

A generated archive of ``--n`` small PNGs (64 px, 100 per folder) is scored once, then rerun
four times: with nothing changed; after touching 1% of the files (new mtime, same bytes) and
rewriting another 1% (new bytes); after deleting 1%. Each run is its own driver process (so
that its peak RSS is its own, ``VmHWM``), joined to one Ray started here; beside each run's
wall time is the time of the input's listing alone (``Location.listing``), the floor of any
rerun. Scoring uses ``--explain none`` and ONNX Runtime (the default engine) on a small
randomly initialised resnet10t package (the model's speed is not what is measured).

``--baseline CODE``: a second checkout (main) run beside ``--code`` on the same archive, each on
its own copy of the output (the first run, ``--code``'s, copied once), the two sides interleaved
at every step (their order alternating), so that both meet the same load. ``--profile DIR``:
each rerun's ``run_scoring`` under cProfile, its stats in ``DIR/<side>-<step>.prof``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def make_archive(root: str, n: int, seed: int = 0) -> list[str]:
    """``n`` PNGs of a few hundred bytes each: noise over a disc, 100 files per folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2).astype(np.uint8) * 120
    paths = []
    for i in range(n):
        folder = os.path.join(root, f"study{i // 100:05d}")
        os.makedirs(folder, exist_ok=True)
        img = disc + rng.integers(0, 40, (64, 64), dtype=np.uint8)
        p = os.path.join(folder, f"IMG_{i:06d}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: per address space; ``ru_maxrss`` survives ``exec`` on
    Linux and showed the parent's 1.3 GB in every child)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(args: argparse.Namespace) -> None:
    """Child side: list once (timed), score once (timed), print a JSON line."""
    import ray

    from braintumor_ray.core import resolve
    from braintumor_ray.score import ScoreConfig, run_scoring

    ray.init(address=os.environ["BENCH_RAY_ADDRESS"], logging_level="ERROR")
    t = time.perf_counter()
    listed = resolve(args.input).listing()
    listing_s = time.perf_counter() - t
    cfg = ScoreConfig(model=args.model, input=args.input, output=args.output, explain="none")
    t = time.perf_counter()
    if args.profile_to:
        import cProfile

        prof = cProfile.Profile()
        s = prof.runcall(run_scoring, cfg)
        wall = time.perf_counter() - t
        prof.dump_stats(args.profile_to)
    else:
        s = run_scoring(cfg)
        wall = time.perf_counter() - t
    rss_mb = peak_rss_mb()
    print("RESULT " + json.dumps({"files": len(listed.files), "wall_s": round(wall, 2), "listing_s": round(listing_s, 2),
                                  "peak_rss_mb": round(rss_mb), "scored": s["scored"], "errors": s["errors"],
                                  "skipped": s["skipped_already_scored"], "withdrawn": s["withdrawn"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--work", default="/tmp/rerun-scale")
    ap.add_argument("--model", default=None, help="a model package (default: a random resnet10t exported here)")
    ap.add_argument("--code", default=REPO, help="the checkout whose braintumor_ray the runs import")
    ap.add_argument("--baseline", default=None, help="a second checkout run beside --code at each rerun (main)")
    ap.add_argument("--profile", default=None, help="a folder: each rerun's run_scoring under cProfile, stats there")
    ap.add_argument("--reuse", action="store_true",
                    help="keep --work's archive, model and first run when they are there (100,000 files take ~20 min "
                         "to score once here) and run the reruns on them")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_run(args)

    import ray

    archive, out = os.path.join(args.work, "archive"), os.path.join(args.work, "preds")
    reuse = args.reuse and os.path.exists(os.path.join(out, "_manifest.json")) and os.path.isdir(archive)
    if not reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    model = args.model
    if model is None and reuse:
        model = os.path.join(args.work, "model")
    elif model is None:
        import torch

        from braintumor_ray import MRIPreprocess, create_model, export_model_package

        torch.manual_seed(0)
        model = os.path.join(args.work, "model")
        export_model_package(create_model("resnet10t", pretrained=False, drop_rate=0.0), model,
                             preprocess=MRIPreprocess(image_size=64))
    t = time.perf_counter()
    if reuse:
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(archive) for f in names)
        print(f"archive: {len(files)} files reused from {archive}, with its first run", flush=True)
    else:
        files = make_archive(archive, args.n)
        print(f"archive: {len(files)} files in {time.perf_counter() - t:.1f} s", flush=True)
    for attempt in range(3):  # Ray's start timed out at load 40 (as in bench_archive_shift)
        try:
            ctx = ray.init(include_dashboard=False, logging_level="ERROR")
            break
        except Exception:
            if attempt == 2:
                raise
            time.sleep(10)
    sides = {"code": (os.path.abspath(args.code), out)}
    if args.baseline:
        sides["baseline"] = (os.path.abspath(args.baseline), os.path.join(args.work, "preds-baseline"))
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    rng = random.Random(0)
    k = max(1, len(files) // 100)
    results: list[dict] = []

    def run(name: str, side: str, step: int) -> dict:
        code, output = sides[side]
        env = dict(os.environ, BENCH_RAY_ADDRESS=ctx.address_info["address"], RAY_DATA_DISABLE_PROGRESS_BARS="1",
                   PYTHONPATH=code)
        cmd = [sys.executable, __file__, "--child", "--model", model, "--input", archive, "--output", output]
        if args.profile and step:
            cmd += ["--profile-to", os.path.join(args.profile, f"{side}-{step}.prof")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{name} ({side}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        res = {"run": name, "side": side, "load": round(os.getloadavg()[0], 1), **json.loads(line[len("RESULT "):])}
        print(json.dumps(res), flush=True)
        results.append(res)
        return res

    def each_side(name: str, step: int) -> None:
        order = list(sides) if step % 2 else list(reversed(sides))
        for side in order:
            run(name, side, step)

    if not reuse:
        run("first run", "code", 0)
    if args.baseline:
        shutil.copytree(out, sides["baseline"][1])
        for suffix in ("_series", "_explain"):  # the siblings the first run wrote
            if os.path.exists(out + suffix):
                shutil.copytree(out + suffix, sides["baseline"][1] + suffix)
    each_side("no change", 1)
    picked = rng.sample(files, 3 * k)
    touched, changed, deleted = picked[:k], picked[k:2 * k], picked[2 * k:]
    now = time.time()
    for p in touched:
        os.utime(p, (now, now))
    for p in changed:
        with open(p, "ab") as f:
            f.write(b"\0")  # bytes after the PNG's end: a new sha256, the same image
    each_side("1% touched, 1% changed", 2)
    for p in deleted:
        os.remove(p)
    each_side("1% deleted", 3)
    each_side("no change (again)", 4)
    ray.shutdown()
    print(f"\ncode {sides['code'][0]}" + (f", baseline {sides['baseline'][0]}" if args.baseline else "")
          + f"; {len(files)} files; {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| run | side | files listed | wall s | listing s | driver peak RSS MB | scored | skipped | withdrawn | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['side']} | {r['files']} | {r['wall_s']} | {r['listing_s']} | {r['peak_rss_mb']} | "
              f"{r['scored']} | {r['skipped']} | {r['withdrawn']} | {r['load']} |")


if __name__ == "__main__":
    main()
