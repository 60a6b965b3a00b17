"""The decode cost of each compressed-frame bomb and multi-page file, in a fresh process apiece
(docs/benchmarks.md, soak/hostile section). The files come from tests/generators/hostile_frames.py
(the tests and the soak use the same ones).

    PYTHONPATH=. .venv/bin/python benchmarks/hostile_frames.py [--side 10000] [--json out.json]

Each bomb declares ``--side`` x ``--side`` in its frame header (the JPEG and J2K ones really
encoded at ``--real-side``); the plain files (a progressive JPEG, a flat PNG) are read with
``MRIPreprocess.try_slices``, the whole per-file path. The benchmark reads each with ``read_medical``
in a child process and reports the wall time, the peak RSS (``VmHWM``) over the process's own after
importing the decoders, and the error. Run it with PYTHONPATH pointing at a checkout without the
frame-header check to get the "before" figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.generators.hostile_frames import frame_bombs, image_bombs  # noqa: E402

_CHILD = """
import json, sys, time
from braintumor_ray.imaging import InputGuard, read_medical
import pydicom.pixels, PIL.Image, openjpeg  # the decoders, loaded before the baseline
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
peak = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
data = open(sys.argv[1], "rb").read()
before, t = peak(), time.perf_counter()
try:
    if sys.argv[1].endswith(".dcm"):
        n, err = len(read_medical(data, "dicom", guard=InputGuard())), None
    else:  # a plain image: the whole per-file path of scoring (decode, contrast and head checks, crop)
        from braintumor_ray import MRIPreprocess
        r = MRIPreprocess(image_size=224).try_slices(data, name=sys.argv[1], guard=InputGuard())
        n, err = len(r.slices), r.error
except Exception as e:
    n, err = 0, f"{type(e).__name__}: {e}"
print(json.dumps({"s": round(time.perf_counter() - t, 2), "rss_growth_mb": round(peak() - before, 1),
                  "slices": n, "error": err}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=10000, help="the side each bomb's frame header declares")
    ap.add_argument("--real-side", type=int, default=8000, help="the side of the really encoded JPEG and J2K bombs")
    ap.add_argument("--work", default="/tmp/hostile_frames")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()} "
           f"{os.cpu_count()} CPUs", "side": a.side, "real_side": a.real_side, "pythonpath": os.environ.get("PYTHONPATH", ""), "bombs": {}}
    for name, data in {**frame_bombs(a.side, real_side=a.real_side), **image_bombs()}.items():
        path = os.path.join(a.work, name)
        open(path, "wb").write(data)
        r = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, text=True, timeout=600)
        last = (r.stdout.strip().splitlines() or ["{}"])[-1]
        res = json.loads(last) if r.returncode == 0 else {"rc": r.returncode, "stderr": r.stderr[-300:]}
        out["bombs"][name] = {"file_kb": round(len(data) / 1024, 1), **res}
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
