"""The one-shot GPU check's Python half (``benchmarks/gpu_check.sh`` drives it).

    python benchmarks/gpu_check.py prepare --data ../shared/data/sartaj-brain-mri --out .gpucheck
    python benchmarks/gpu_check.py run --data .gpucheck [--out DIR] [--budget-s 420] [--dry-run]
    python benchmarks/gpu_check.py dry [--out DIR] [run options]   # sample + prepare + run --dry-run, one process

``prepare`` (on the development machine) picks a few hundred real JPEGs, stratified by split and
class, copies them to ``OUT/jpegs/`` and runs the ingest on them into ``OUT/preprocessed/``: the
real preprocessed data, small enough to carry (it checks the size).

``run`` measures, on one GPU (``--dry-run``: on the CPU, tiny), for Lite0 and then ResNet50 and
EfficientNet-B0 at random init:

(a) training images/s per GPU: Ray Train (1 worker, NCCL, AMP, the real ``train_loop_per_worker``
    on its Ray Data shard) against a plain PyTorch loop that calls the same ``train_one_epoch``
    with AMP on the same GPU, batches from memory; the same images, epochs after the first timed;
(b) scoring images/s: the scoring job (``use_gpu``) against a plain loop (a DataLoader with a
    worker per spare core decoding, the model with AMP on the GPU), GPU utilisation sampled by
    ``nvidia-smi`` during each, and the CPU decode ceiling (one core's decode rate x the cores):
    the most any scorer on this machine can reach while the CPUs decode.

The carried images are few, so both sides see them several times: the training split repeated
``--train-repeat`` times per epoch, and each JPEG scored under ``--score-copies`` names (hard
links). It prints a markdown table for docs/benchmarks.md and writes it, with the raw figures
as JSON, under ``--out``. Sections that would overrun ``--budget-s`` are skipped, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from braintumor_ray import MRIPreprocess  # noqa: E402
from braintumor_ray.core import CLASS_NAMES, canonical_label, canonical_split  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# (timm name, transfer): Lite0 as the training job runs it, the larger ones fully trained from random init.
BACKBONES = [("tf_efficientnet_lite0", "last-3"), ("resnet50", "full"), ("efficientnet_b0", "full")]
CARRY_LIMIT_MIB = 64  # what the device tool carries, .whl/ included


def _mib(path: str) -> float:
    total = 0
    for d, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
    return total / 2**20


# --- prepare ----------------------------------------------------------------------------------------
def _start_ray(*, gpus: int) -> None:
    """This process's Ray, every CPU of the machine; started once (``dry`` runs prepare, then run)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count() or 1, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def prepare(args: argparse.Namespace) -> int:
    """Copy a stratified subset of JPEGs and ingest it: ``OUT/jpegs`` + ``OUT/preprocessed``."""
    from braintumor_ray.ingest import IngestConfig, format_summary, run_ingest

    src = os.path.abspath(args.data)
    if not os.path.isdir(src):
        raise SystemExit(f"--data {src} is not a folder of <split>/<class>/<image>")
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    rng = np.random.default_rng(args.seed)
    picked: dict[str, int] = {}
    for split_dir in sorted(os.listdir(src)):
        split = canonical_split(split_dir)
        if split is None or not os.path.isdir(os.path.join(src, split_dir)):
            continue
        per_class = args.per_class_test if split == "test" else args.per_class_train
        for class_dir in sorted(os.listdir(os.path.join(src, split_dir))):
            if canonical_label(class_dir) is None:
                continue
            names = sorted(os.listdir(os.path.join(src, split_dir, class_dir)))
            chosen = sorted(rng.choice(len(names), size=min(per_class, len(names)), replace=False))
            dst = os.path.join(out, "jpegs", split_dir, class_dir)
            os.makedirs(dst, exist_ok=True)
            for i in chosen:
                shutil.copyfile(os.path.join(src, split_dir, class_dir, names[i]), os.path.join(dst, names[i]))
            picked[f"{split_dir}/{class_dir}"] = len(chosen)
    _start_ray(gpus=0)
    summary = run_ingest(IngestConfig(input=os.path.join(out, "jpegs"), output=os.path.join(out, "preprocessed"),
                                      preprocess=MRIPreprocess(image_size=args.image_size)))
    print(format_summary(summary))
    manifest = {
        "source": src,
        "picked": picked,
        "jpegs": sum(picked.values()),
        "image_size": args.image_size,
        "jpegs_mib": round(_mib(os.path.join(out, "jpegs")), 2),
        "preprocessed_mib": round(_mib(os.path.join(out, "preprocessed")), 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    total = _mib(out)
    print(json.dumps({**manifest, "total_mib": round(total, 2)}, indent=2))
    if args.max_mib and total > args.max_mib:
        raise SystemExit(f"{out} is {total:.1f} MiB, over --max-mib {args.max_mib}: pick fewer images")
    return 0


# --- measuring helpers ---------------------------------------------------------------------------------
class GpuSampler:
    """nvidia-smi's GPU utilisation every 100 ms while active; None figures where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.samples: list[float] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_util_samples": 0}
        return {"gpu_util_mean": round(statistics.fmean(self.samples), 1), "gpu_util_max": max(self.samples),
                "gpu_util_samples": len(self.samples)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_train(cfg, pixels: np.ndarray, labels: np.ndarray, class_counts, epochs: int, device: torch.device) -> list[float]:
    """images/s of each epoch of a plain loop: the training job's own ``train_one_epoch``, AMP on GPU."""
    from braintumor_ray.models import create_model, data_config, prepare_input
    from braintumor_ray.train import make_criterion, make_optimizer, train_one_epoch

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=False, drop_rate=cfg.drop_rate, transfer=cfg.transfer_mode,
                         channels_last=cfg.use_channels_last).to(device)
    dc = data_config(model)
    opt = make_optimizer(model, cfg)
    crit = make_criterion(cfg, class_counts).to(device)
    amp = cfg.use_amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    gen = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(labels))
        batches = (
            {"image": torch.from_numpy(pixels[order[i : i + cfg.batch_size]]),
             "label": torch.from_numpy(labels[order[i : i + cfg.batch_size]])}
            for i in range(0, len(order), cfg.batch_size)
        )
        _sync(device)
        r = train_one_epoch(
            model, batches, criterion=crit, optimizer=opt, scheduler=None,
            prepare=lambda p: prepare_input(p, mean=dc["mean"], std=dc["std"], channels_last=cfg.use_channels_last),
            augment=cfg.train_augment, generator=gen, device=device, scaler=scaler, amp=amp,
        )
        _sync(device)
        rates.append(r["seen"] / r["seconds"])
    return rates


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


def plain_score(files: list[str], pkg, batch_size: int, device: torch.device, workers: int) -> float:
    """A user's own scoring script: DataLoader workers decode, the model (AMP on GPU) scores."""
    loader = torch.utils.data.DataLoader(Files(files, pkg.preprocess), batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    model = pkg.model.to(device)
    t = time.perf_counter()
    n = 0
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for pixels in loader:
            x = pkg.prepare(pixels).to(device, non_blocking=True)
            torch.softmax(model(x).float(), 1).cpu()
            n += len(pixels)
    return n / (time.perf_counter() - t)


def decode_rate(files: list[str], preprocess: MRIPreprocess, seconds: float) -> float:
    """One core's read + decode + crop + resize rate (images/s), over at most ``seconds``."""
    n, t = 0, time.perf_counter()
    while True:
        for f in files:
            preprocess(open(f, "rb").read())
            n += 1
            if time.perf_counter() - t > seconds:
                return n / (time.perf_counter() - t)
        if n >= len(files) and time.perf_counter() - t > seconds / 4:
            return n / (time.perf_counter() - t)


# --- run ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    import ray

    from braintumor_ray.models import create_model, export_model_package, load_model_package
    from braintumor_ray.score import ScoreConfig, run_scoring
    from braintumor_ray.train import TrainConfig, TrainData, build_trainer, load_train_data

    t_start = time.perf_counter()
    data = os.path.abspath(args.data)
    pre, jpeg_dir = os.path.join(data, "preprocessed"), os.path.join(data, "jpegs")
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        raise SystemExit("no CUDA device is visible to torch: run on the GPU machine, or pass --dry-run")
    device = torch.device("cuda" if gpu else "cpu")
    cpus = os.cpu_count() or 1
    out_dir = args.out or tempfile.mkdtemp(prefix="gpucheck-out-")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpucheck-")
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": cpus,
        "dry_run": bool(args.dry_run),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    _start_ray(gpus=1 if gpu else 0)
    env["ray"] = ray.__version__
    print(json.dumps(env), flush=True)
    results: dict = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "func"}, "training": [], "scoring": [],
                     "skipped": [], "errors": []}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    # Training data: the carried real subset, the training split repeated to make epochs long enough to time.
    full = load_train_data(pre)
    train = full.datasets["train"]
    if args.train_repeat > 1:
        train = train.union(*[train] * (args.train_repeat - 1))
    train = train.materialize()
    batch = next(iter(train.iter_batches(batch_size=10**7, batch_format="numpy")))
    pixels, labels = np.ascontiguousarray(batch["image"]), batch["label"].astype(np.int64)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
    tdata = TrainData(datasets={"train": train, "val": full.datasets["val"]}, counts={"train": len(labels), "val": full.counts["val"]},
                      class_counts=counts, report=full.report, image_size=full.image_size)
    image_size = full.image_size

    # Scoring input: each carried JPEG under --score-copies names.
    jpegs = sorted(os.path.join(d, n) for d, _, names in os.walk(jpeg_dir) for n in names)
    archive = os.path.join(work, "archive")
    for c in range(args.score_copies):
        dst = os.path.join(archive, f"copy{c:03d}")
        os.makedirs(dst)
        for i, f in enumerate(jpegs):
            os.link(f, os.path.join(dst, f"{i:05d}_{os.path.basename(f)}"))
    archive_files = sorted(os.path.join(d, n) for d, _, names in os.walk(archive) for n in names)
    preprocess = MRIPreprocess(image_size=image_size)
    ceiling = None
    try:
        per_core = decode_rate(jpegs, preprocess, seconds=args.decode_seconds)
        ceiling = per_core * cpus
        results["decode"] = {"per_core_img_s": round(per_core, 1), "cores": cpus, "ceiling_img_s": round(ceiling, 1)}
    except Exception as e:  # e.g. no scipy on the machine: training is still measured
        results["errors"].append(f"decode ceiling: {type(e).__name__}: {e}")
        traceback.print_exc()
    print(json.dumps({"decode": results["decode"], "train_images_per_epoch": len(labels), "score_files": len(archive_files)}), flush=True)
    loader_workers = max(1, cpus - 1)
    threads = max(1, cpus // 2) if gpu else 1

    backbones = BACKBONES[: args.backbones]
    for name, transfer in backbones:
        # (a) training
        if left() < 60:
            results["skipped"].append(f"training {name}: {left():.0f} s of budget left")
        else:
            try:
                cfg = TrainConfig(data=pre, model=name, pretrained=False, transfer=transfer, use_gpu=gpu, num_workers=1,
                                  cpus_per_worker=threads, batch_size=args.train_batch_size, eval_batch_size=args.train_batch_size,
                                  epochs=args.epochs, warmup_epochs=0, early_stop_patience=0, storage=os.path.join(work, "runs"),
                                  name=f"check-{name}", max_failures=0)
                torch.set_num_threads(threads)
                plain = plain_train(cfg, pixels, labels, counts, args.epochs, device)
                t = time.perf_counter()
                hist = build_trainer(cfg, data=tdata).fit().return_value["history"]
                ray_wall = time.perf_counter() - t
                rates = [h["train_images_per_s_per_worker"] for h in hist]
                row = {"backbone": name, "transfer": transfer, "batch_size": cfg.batch_size, "amp": cfg.use_amp and gpu,
                       "images_per_epoch": len(labels), "plain_img_s": round(statistics.fmean(plain[1:]), 1),
                       "ray_img_s": round(statistics.fmean(rates[1:]), 1), "plain_epochs": [round(r, 1) for r in plain],
                       "ray_epochs": [round(r, 1) for r in rates], "ray_wall_s": round(ray_wall, 1)}
                row["ratio"] = round(row["ray_img_s"] / row["plain_img_s"], 3)
                results["training"].append(row)
                print(json.dumps({"training": row}), flush=True)
            except Exception as e:  # report and go on: one failure must not cost the other figures
                results["errors"].append(f"training {name}: {type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                if gpu:
                    torch.cuda.empty_cache()
        # (b) scoring
        if left() < 45:
            results["skipped"].append(f"scoring {name}: {left():.0f} s of budget left")
            continue
        try:
            torch.manual_seed(0)
            uri = os.path.join(work, f"pkg-{name}")
            # No ONNX: on GPUs the job runs PyTorch, and the GPU machine has no onnx installed.
            export_model_package(create_model(name, pretrained=False), uri, preprocess=preprocess, onnx=False)
            pkg = load_model_package(uri, channels_last=not gpu)
            torch.set_num_threads(1)
            if args.warm:  # the job's worker processes and CUDA contexts start once, as on a standing cluster
                run_scoring(ScoreConfig(model=uri, input=os.path.join(archive, "copy000"),
                                        output=os.path.join(work, f"warm-{name}"), use_gpu=gpu, batch_size=args.score_batch_size))
            with GpuSampler() as s_plain:
                plain = plain_score(archive_files, pkg, args.score_batch_size, device, loader_workers)
            with GpuSampler() as s_job:
                t = time.perf_counter()
                summary = run_scoring(ScoreConfig(model=uri, input=archive, output=os.path.join(work, f"preds-{name}"),
                                                  use_gpu=gpu, batch_size=args.score_batch_size))
                job = len(archive_files) / (time.perf_counter() - t)
            assert summary["scored"] + summary["errors"] == len(archive_files), summary
            # The maps (--explain flagged, the default) come from the same forward pass (CAM, issue 37):
            # the same job without maps says what they cost.
            t = time.perf_counter()
            plain_job = run_scoring(ScoreConfig(model=uri, input=archive, output=os.path.join(work, f"preds-none-{name}"),
                                                use_gpu=gpu, batch_size=args.score_batch_size, explain="none"))
            job_none = len(archive_files) / (time.perf_counter() - t)
            assert plain_job["heatmaps"] == 0
            row = {"backbone": name, "files": len(archive_files), "batch_size": args.score_batch_size, "engine": summary["engine"],
                   "plain_img_s": round(plain, 1), "job_img_s": round(job, 1), "ratio": round(job / plain, 3),
                   "job_vs_decode_ceiling": round(job / ceiling, 3) if ceiling else None,
                   "plain_vs_decode_ceiling": round(plain / ceiling, 3) if ceiling else None,
                   "job_inner_img_s": summary["images_per_s"], "replicas": summary["replicas"],
                   "maps": summary["heatmaps"], "job_explain_none_img_s": round(job_none, 1),
                   "maps_cost": round(job_none / job, 3),
                   "plain": s_plain.summary(), "job": s_job.summary()}
            results["scoring"].append(row)
            print(json.dumps({"scoring": row}), flush=True)
        except Exception as e:
            results["errors"].append(f"scoring {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            if gpu:
                torch.cuda.empty_cache()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    md = markdown(results)
    print("\n" + md, flush=True)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out_dir}/gpu_check.md and gpu_check.json ({results['wall_s']} s)", flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return 1 if results["errors"] else 0


def _util(s: dict) -> str:
    return "-" if s.get("gpu_util_mean") is None else f"{s['gpu_util_mean']:.0f}% (max {s['gpu_util_max']:.0f}%)"


def markdown(r: dict) -> str:
    e = r["env"]
    lines = [
        f"{e['date']}, {e['device']}, {e['cpus']} CPUs; torch {e['torch']} (CUDA {e['cuda']}), Ray {e['ray']}, "
        f"timm {e.get('timm', '?')}, Python {e['python']}{'; DRY RUN (CPU, tiny): not figures' if e['dry_run'] else ''}.",
        "",
        "Training, images/s per GPU (epochs after the first; 1 worker, NCCL, AMP; the plain loop calls the same "
        "`train_one_epoch` with batches from memory):",
        "",
        "| backbone (random init) | trained | batch | images/epoch | plain loop | Ray Train | Ray / plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in r["training"]:
        lines.append(f"| {t['backbone']} | {t['transfer']} | {t['batch_size']} | {t['images_per_epoch']} | {t['plain_img_s']:.1f} "
                     f"| {t['ray_img_s']:.1f} | **{t['ratio']:.2f}** |")
    d = r.get("decode", {})
    lines += [
        "",
        f"Scoring, images/s over {r['scoring'][0]['files'] if r['scoring'] else '?'} JPEG files (the job: `use_gpu`, its "
        f"default engine; the plain loop: a DataLoader with {max(1, e['cpus'] - 1)} worker processes decoding, AMP). CPU decode "
        f"ceiling: {d.get('per_core_img_s', '?')} images/s per core x {d.get('cores', '?')} cores = "
        f"**{d.get('ceiling_img_s', '?')}** images/s.",
        "",
        "The job draws heat maps for its flagged and tumour rows (the default `--explain flagged`), from the same "
        "forward pass (CAM); `--explain none` is the same job without them.",
        "",
        "| backbone (random init) | engine | plain loop | job | job / plain | job / decode ceiling | maps | job, --explain none "
        "| none / default | GPU util, plain | GPU util, job |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["scoring"]:
        vs_ceiling = "-" if s["job_vs_decode_ceiling"] is None else f"**{s['job_vs_decode_ceiling']:.2f}**"
        lines.append(f"| {s['backbone']} | {s['engine']} | {s['plain_img_s']:.1f} | {s['job_img_s']:.1f} | **{s['ratio']:.2f}** "
                     f"| {vs_ceiling} | {s['maps']} | {s['job_explain_none_img_s']:.1f} | {s['maps_cost']:.2f} "
                     f"| {_util(s['plain'])} | {_util(s['job'])} |")
    for k in ("skipped", "errors"):
        if r.get(k):
            lines += ["", f"{k.capitalize()}:", *[f"- {x}" for x in r[k]]]
    return "\n".join(lines) + "\n"


def dry(args: argparse.Namespace) -> int:
    """The whole check at tiny size on the CPU, in one process: a generated sample instead of the
    real data, ``prepare`` on it, then ``run --dry-run`` (one Python and one Ray start-up instead of
    three and two, for the test that runs it)."""
    from braintumor_ray import make_sample_dataset

    work = tempfile.mkdtemp(prefix="gpucheck-dry-")
    try:
        make_sample_dataset(os.path.join(work, "sample"), per_class=5, test_per_class=1, leaks=0, size=80, seed=0)
        prepare(argparse.Namespace(data=os.path.join(work, "sample"), out=os.path.join(work, "subset"), per_class_train=5,
                                   per_class_test=1, image_size=64, seed=0, max_mib=0))
        args.data, args.dry_run = os.path.join(work, "subset"), True
        return run(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_options(pr: argparse.ArgumentParser, *, dry_run: bool) -> None:
    pr.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_check.md/.json (default $OUT)")
    pr.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    pr.add_argument("--backbones", type=int, default=len(BACKBONES), help=f"how many of {[b for b, _ in BACKBONES]}")
    # The dry run's defaults: every step at tiny size (2 epochs, the split once, each JPEG once, no warm-up).
    pr.add_argument("--epochs", type=int, default=2 if dry_run else 3,
                    help="training epochs per side; all but the first are timed")
    pr.add_argument("--train-repeat", type=int, default=1 if dry_run else 10,
                    help="the training split repeated this many times per epoch")
    pr.add_argument("--train-batch-size", type=int, default=8 if dry_run else 128)
    pr.add_argument("--score-copies", type=int, default=1 if dry_run else 24,
                    help="names per carried JPEG in the scored archive")
    pr.add_argument("--score-batch-size", type=int, default=8 if dry_run else 128)
    pr.add_argument("--no-warm", dest="warm", action="store_false", default=not dry_run,
                    help="skip the scoring job's warm-up run")
    pr.add_argument("--decode-seconds", type=float, default=0.5 if dry_run else 5.0,
                    help="time spent measuring one core's decode rate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the carried real-data subset")
    pp.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    pp.add_argument("--out", default=".gpucheck")
    pp.add_argument("--per-class-train", type=int, default=64)
    pp.add_argument("--per-class-test", type=int, default=16)
    pp.add_argument("--image-size", type=int, default=224)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--max-mib", type=float, default=30.0, help="fail above this (the Ray wheels take ~33 of the "
                    f"{CARRY_LIMIT_MIB} MiB carried)")
    pp.set_defaults(func=prepare)
    pr = sub.add_parser("run", help="measure (on the GPU machine; --dry-run: here, tiny)")
    pr.add_argument("--data", default=".gpucheck", help="what prepare wrote")
    pr.add_argument("--dry-run", action="store_true", help="CPU, tiny: check that every step runs")
    _run_options(pr, dry_run=False)
    pr.set_defaults(func=run)
    pd = sub.add_parser("dry", help="here: a generated sample, prepare and run --dry-run in one process (a test runs it)")
    _run_options(pd, dry_run=True)
    pd.set_defaults(func=dry, data=None, dry_run=True)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
