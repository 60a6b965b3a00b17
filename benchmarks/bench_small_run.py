"""The fixed cost of a small scheduled run (issue 37): 10 new files into an output that already
holds ``--existing`` rows, in a fresh process (as a cron job runs ``jobs/score.py``), where its
seconds go.

    .venv/bin/python benchmarks/bench_small_run.py --model URI --data ../shared/data/sartaj-brain-mri \\
        [--existing 2000] [--new 10] [--rounds 2] [--other-code /work/main]

Prepares the output once (``--existing`` images scored with the defaults), then, alternating
with ``--other-code`` when given (a checkout whose code runs the same step: the "before"), runs
``run_scoring`` over the input with ``--new`` more files in a fresh Python on a copy of that
output, under cProfile, and prints the wall time and the cumulative seconds of the run's parts
(Ray start, package checks, listing, committed rows, the Ray Data execution, commit, series
table, report).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PARTS = {
    "ray_start": "_cluster_shape",
    "verify_package": "verify_package",
    "verify_onnx": "verify_onnx",
    "pin_package": "pin_package",
    "listing": "listing",
    "committed_rows": "committed_rows",
    "rerun_diff": "rerun_diff",
    "execute (Ray Data)": "_execute",
    "commit": "_commit",
    "series_table": "series_table",
    "report": "write_scoring_report",
    "dicom_objects": "dicom_objects",
}

CHILD = r"""
import cProfile, json, os, pstats, sys, time
t0 = time.perf_counter()
from braintumor_ray.score import ScoreConfig, run_scoring
t_import = time.perf_counter() - t0
prof = cProfile.Profile()
t1 = time.perf_counter()
prof.enable()
s = run_scoring(ScoreConfig(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3]))
prof.disable()
wall = time.perf_counter() - t1
parts = json.loads(sys.argv[4])
st = pstats.Stats(prof)
cum = {}
for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
    for name, want in parts.items():
        if fn == want and "braintumor_ray" in file:
            cum[name] = max(cum.get(name, 0.0), ct)
print(json.dumps({"code": os.path.dirname(os.path.dirname(sys.modules["braintumor_ray"].__file__)), "scored": s["scored"],
                  "import_s": round(t_import, 2), "run_scoring_s": round(wall, 2),
                  "parts_s": {k: round(cum.get(k, 0.0), 2) for k in parts}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--existing", type=int, default=2000)
    ap.add_argument("--new", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--other-code", default=None, help="another checkout to run the same step with (the 'before')")
    args = ap.parse_args()
    files = sorted(f for f in glob.glob(os.path.join(os.path.abspath(args.data), "**", "*"), recursive=True)
                   if os.path.isfile(f))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "in")
        os.makedirs(data)
        for i, f in enumerate(files[: args.existing]):
            os.link(f, os.path.join(data, f"{i:05d}-{os.path.basename(f)}"))
        base = os.path.join(tmp, "base")
        env = {**os.environ, "PYTHONPATH": here, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        t = time.perf_counter()
        # cwd=tmp: ``python -c`` puts the working directory first on sys.path, before PYTHONPATH.
        subprocess.run([sys.executable, "-c", CHILD, args.model, data, base, json.dumps(PARTS)], env=env, check=True,
                       capture_output=True, cwd=tmp)
        print(json.dumps({"prepared_rows": args.existing, "s": round(time.perf_counter() - t, 1),
                          "load": [round(x, 1) for x in os.getloadavg()]}), flush=True)
        new = files[args.existing : args.existing + args.new]
        for i, f in enumerate(new):
            os.link(f, os.path.join(data, f"new{i:03d}-{os.path.basename(f)}"))
        codes = [here] + ([os.path.abspath(args.other_code)] if args.other_code else [])
        for r in range(args.rounds):
            for k, code in enumerate(codes):
                out = os.path.join(tmp, f"out-{r}-{k}")
                shutil.copytree(base, out)
                for sib in glob.glob(base + "_*"):
                    shutil.copytree(sib, out + sib[len(base):])
                proc = subprocess.run([sys.executable, "-c", CHILD, args.model, data, out, json.dumps(PARTS)],
                                      env={**env, "PYTHONPATH": code}, capture_output=True, text=True, cwd=tmp)
                line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else proc.stderr[-2000:]
                print(json.dumps({"round": r + 1, "load": [round(x, 1) for x in os.getloadavg()]}), line, flush=True)


if __name__ == "__main__":
    main()
