"""A model replica's start-up and peak memory (issue 37): what a Ray Data scoring actor costs
before it scores its first image, and its peak RSS while it scores with heat maps.

    .venv/bin/python benchmarks/bench_replica.py --model URI [--images DIR] [--n 256] [--explain flagged]

Runs in a fresh process, as an actor does: imports the scoring code, builds the replica
(:class:`~braintumor_ray.score.Predictor`: the package loaded on its engine, 2 threads) from a
plan, then scores ``--n`` preprocessed images in batches of 32 with maps for the rows
``--explain`` picks. Prints JSON: seconds to import, to build the replica, to score; peak RSS
(``ru_maxrss``); which of torch, timm, sklearn, matplotlib and pytorch_grad_cam it imported.
Point ``PYTHONPATH`` at another checkout to measure that code (the "before" figure).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                     "data", "sartaj-brain-mri"))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--explain", default="flagged")
    args = ap.parse_args()
    files = sorted(f for f in glob.glob(os.path.join(os.path.abspath(args.images), "**", "*.jpg"), recursive=True))
    files = files[:: max(1, len(files) // args.n)][: args.n]
    datas = [open(f, "rb").read() for f in files]

    t0 = time.perf_counter()
    import pyarrow as pa

    from braintumor_ray.core import Identifiers, resolve
    from braintumor_ray.models import choose_engine, package_has_onnx, pin_package, verify_package
    from braintumor_ray.score import Predictor, ScoreConfig, decode_batch, plan_scoring, rerun_diff

    t_import = time.perf_counter() - t0
    meta = verify_package(args.model)
    engine = choose_engine(args.engine, has_onnx=package_has_onnx(meta), use_gpu=False)
    pin = pin_package(resolve(args.model), meta, with_onnx=engine == "onnxruntime")
    stage = tempfile.mkdtemp(prefix="bench-replica-")
    cfg = ScoreConfig(model=args.model, input="/nonexistent/in", output="/nonexistent/out", explain=args.explain)
    todo = {f: (len(d), "v") for f, d in zip(files, datas)}
    diff = rerun_diff(todo, {p: p for p in todo}, {}, model_id=meta.model_id, selection="", retry_errors=0)
    from datetime import datetime, timezone

    from braintumor_ray.score import ClusterShape

    plan = plan_scoring(config=cfg, run_id="r", input_uri=cfg.input, output_uri=cfg.output, uri_prefix="", pin=pin,
                        engine=engine, meta=meta, preprocess=meta.preprocess,
                        identifiers=Identifiers(), diff=diff, refused={}, explain_stage_uri=stage,
                        explain_final_uri="/final", cluster=ClusterShape(cpus=2, gpus=0), scored_at=datetime.now(timezone.utc))
    batches = [decode_batch(pa.table({"path": files[s : s + 32], "bytes": datas[s : s + 32]}), preprocess=plan.preprocess)
               for s in range(0, len(files), 32)]
    heavy_before = sorted(m for m in ("torch", "timm", "sklearn", "matplotlib", "pytorch_grad_cam") if m in sys.modules)
    t1 = time.perf_counter()
    replica = Predictor(plan, threads=2)
    t_build = time.perf_counter() - t1
    t2 = time.perf_counter()
    maps = 0
    for b in batches:
        maps += sum(p is not None for p in replica(b).column("heatmap_path").to_pylist())
    t_score = time.perf_counter() - t2
    print(json.dumps({
        "code": os.path.dirname(os.path.dirname(sys.modules["braintumor_ray"].__file__)),
        "engine": engine, "explain": args.explain, "images": len(files), "maps": maps,
        "import_s": round(t_import, 2), "replica_build_s": round(t_build, 2), "startup_s": round(t_import + t_build, 2),
        "score_s": round(t_score, 2), "images_per_s": round(len(files) / t_score, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "imported_by_decode": heavy_before,
        "imported": sorted(m for m in ("torch", "timm", "sklearn", "matplotlib", "pytorch_grad_cam") if m in sys.modules),
    }))


if __name__ == "__main__":
    main()
