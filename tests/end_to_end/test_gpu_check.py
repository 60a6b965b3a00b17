"""benchmarks/gpu_check.sh --dry-run: the one-shot GPU check, run whole at tiny size on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.ray  # the script starts its own Ray


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": os.path.join(REPO, ".venv", "bin", "python"),
           "RAY_ADDRESS": "local"}  # its own Ray, never a cluster found on the machine
    if not os.path.exists(env["PYTHON"]):
        import sys

        env["PYTHON"] = sys.executable
    # One backbone: the loop body is the same for the other two, and the test stays near a minute.
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry-run", "--backbones", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| tf_efficientnet_lite0 | last-3 |" in md and "| tf_efficientnet_lite0 | torch |" in md
    assert md in proc.stdout  # the table is printed too, ready for docs/benchmarks.md
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert not r["errors"] and not r["skipped"]
    (t,) = r["training"]
    (s,) = r["scoring"]
    assert t["plain_img_s"] > 0 and t["ray_img_s"] > 0 and len(t["ray_epochs"]) == 2
    assert s["job_img_s"] > 0 and s["plain_img_s"] > 0 and s["files"] > 0 and r["decode"]["ceiling_img_s"] > 0
    # The maps' cost (issue 37): the same job with --explain none beside the default's, which drew maps.
    assert s["maps"] >= 0 and s["job_explain_none_img_s"] > 0 and s["maps_cost"] > 0 and "none / default" in md
    assert s["job"]["gpu_util_mean"] is None  # no nvidia-smi here: said, not invented
