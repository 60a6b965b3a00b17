"""What one heat map costs a scoring replica (issue 37): the CPU time of the map from the forward
pass's class-activation maps, its overlay PNG and its peak (``cam_heatmaps``, ``overlay_png``,
``heatmap_peak``: what ``HeatmapWriter`` runs for each chosen row), on real scans at 224 px.

    .venv/bin/python benchmarks/bench_map_cost.py [--data ../shared/data/sartaj-brain-mri]
        [--n 16] [--rounds 6] [--other-code /path/to/another/checkout]

Process time over ``--n`` Testing images (a 7 x 7 CAM of four classes from a fixed seed: the
cost does not depend on the model), five passes a round. With ``--other-code``, the same work
with that checkout's ``braintumor_ray/explain/_maps.py``, the two sides alternating within each
round and starting each round in turn (the machine drifts). No model and no Ray needed.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from types import ModuleType

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _maps_of(checkout: str) -> ModuleType:
    """``braintumor_ray/explain/_maps.py`` of a checkout, as a module of its own."""
    path = os.path.join(os.path.abspath(checkout), "braintumor_ray", "explain", "_maps.py")
    spec = importlib.util.spec_from_file_location("braintumor_ray.explain._maps_other", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"no braintumor_ray/explain/_maps.py in {checkout}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_pass(maps_module: ModuleType, images: np.ndarray, cam: np.ndarray) -> int:
    """Every image's map, overlay PNG and peak, as a replica draws them; the PNGs' total bytes."""
    heat = maps_module.cam_heatmaps(cam, [1] * len(images), images.shape[1:])
    size = 0
    for image, h in zip(images, heat):
        size += len(maps_module.overlay_png(image, h))
        maps_module.heatmap_peak(h)
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "sartaj-brain-mri"))
    ap.add_argument("--n", type=int, default=16, help="Testing images (taken evenly by file name)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--other-code", help="another checkout whose maps to time against this one's")
    args = ap.parse_args(argv)

    import cv2

    import braintumor_ray.explain as this_code  # its public cam_heatmaps, overlay_png, heatmap_peak

    files = sorted(glob.glob(os.path.join(os.path.abspath(args.data), "Testing", "*", "*")))
    if not files:
        raise SystemExit(f"no Testing images under {args.data}")
    files = files[:: max(1, len(files) // args.n)][: args.n]
    images = np.stack([cv2.resize(cv2.imread(f, cv2.IMREAD_GRAYSCALE), (224, 224)) for f in files])
    cam = np.random.default_rng(0).normal(size=(len(images), 4, 7, 7)).astype(np.float32)
    sides = {"this": this_code}
    if args.other_code:
        sides["other"] = _maps_of(args.other_code)
    ms: dict[str, list[float]] = {k: [] for k in sides}
    kb: dict[str, float] = {}
    for r in range(args.rounds):
        names = list(sides)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.process_time()
            for _ in range(5):
                kb[name] = one_pass(sides[name], images, cam) / len(images) / 1024
            ms[name].append((time.process_time() - t) / (5 * len(images)) * 1000)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load": [round(x, 1) for x in os.getloadavg()],
        "images": len(images),
        **{
            name: {
                "ms_per_map": [round(x, 2) for x in v],
                "median_ms": round(statistics.median(v), 2),
                "png_kb": round(kb[name], 1),
            }
            for name, v in ms.items()
        },
    }
    if args.other_code:
        out["other_over_this"] = round(out["other"]["median_ms"] / out["this"]["median_ms"], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
