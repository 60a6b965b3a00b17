"""Ensembles and flip TTA on ONNX Runtime, CPU (issue 38): what one ensemble graph costs against
its members' K separate sessions, and what ``--tta flip`` costs against one pass.

    .venv/bin/python benchmarks/bench_ensemble.py [--backbones tf_efficientnet_lite0,tf_efficientnet_lite0] \\
        [--side 224] [--batch 16] [--rounds 7] [--threads 1]

Random-init members (the timing does not depend on the weights), exported as packages export
them (``models.export_onnx``: logits, features, maps). Per round, interleaved: the ensemble's
one graph; the K member graphs run one after the other in K sessions plus the numpy averaging
(mean logits, features side by side, mean maps); one member alone with and without flip TTA
(``InferenceModel.forward``, the scoring path). Prints JSON: medians in ms per batch and the
ratios, with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="tf_efficientnet_lite0,tf_efficientnet_lite0")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from braintumor_ray.imaging import MRIPreprocess
    from braintumor_ray.models import (EnsembleNet, InferenceModel, create_model, data_config, export_onnx,
                                       member_build, onnx_session, prepare_input_np)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    models = []
    for i, b in enumerate(args.backbones.split(",")):
        torch.manual_seed(i)
        models.append(create_model(b, pretrained=False, drop_rate=0.0).eval())
    cfgs = [data_config(m) for m in models]
    t0 = time.perf_counter()
    blobs = [export_onnx(m, side=args.side, mean=c["mean"], std=c["std"])[0] for m, c in zip(models, cfgs)]
    ens = EnsembleNet(models, data_configs=cfgs, build=[member_build(m) for m in models], input_size=args.side).eval()
    ens_blob = export_onnx(ens, side=args.side, mean=ens.mean, std=ens.std, name="ensemble")[0]
    export_s = time.perf_counter() - t0
    one = onnx_session(ens_blob, threads=args.threads)
    many = [onnx_session(b, threads=args.threads) for b in blobs]
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, args.side, args.side), dtype=np.uint8)
    x_ens = prepare_input_np(pixels, mean=ens.mean, std=ens.std)
    xs = [prepare_input_np(pixels, mean=c["mean"], std=c["std"]) for c in cfgs]
    common = dict(engine="onnxruntime", model_id="bench", class_names=("a", "b", "c", "d"),
                  preprocess=MRIPreprocess(image_size=args.side), data_config=dict(cfgs[0]), uri="bench",
                  threads=args.threads, device="cpu", _run=many[0], has_maps=True)
    plain, flip = InferenceModel(**common), InferenceModel(**common, tta="flip")
    names = ["logits", "features", "cam"]

    def run_one():
        return one.run(names, {"input": x_ens})

    def run_many():
        outs = [s.run(names, {"input": x}) for s, x in zip(many, xs)]
        return (np.mean([o[0] for o in outs], 0), np.concatenate([o[1] for o in outs], 1), np.mean([o[2] for o in outs], 0))

    sides = {"ensemble_one_graph": run_one, "ensemble_k_sessions": run_many,
             "single_tta_none": lambda: plain.forward(pixels), "single_tta_flip": lambda: flip.forward(pixels)}
    a, b = run_one(), run_many()
    agree = float(np.abs(a[0] - b[0]).max())
    for f in sides.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for k in order:
            t = time.perf_counter()
            sides[k]()
            times[k].append((time.perf_counter() - t) * 1000)
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    print(json.dumps({
        "backbones": args.backbones, "side": args.side, "batch": args.batch, "rounds": args.rounds,
        "threads": args.threads, "export_s": round(export_s, 1), "max_abs_logit_diff_one_vs_k": agree,
        "median_ms_per_batch": med,
        "ratio_k_sessions_over_one_graph": round(med["ensemble_k_sessions"] / med["ensemble_one_graph"], 3),
        "ratio_tta_flip_over_none": round(med["single_tta_flip"] / med["single_tta_none"], 3),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=2))


if __name__ == "__main__":
    main()
