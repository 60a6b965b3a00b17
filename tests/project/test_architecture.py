"""The package's import contracts (pyproject.toml [tool.importlinter]) hold: CI fails on a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.exists(), "lint-imports is missing: the dev extra installs import-linter"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        # a lower layer importing a stage
        ("braintumor_ray/models/_weights.py", "from ..score import run_scoring\n", "Layers"),
        # reaching into another package's private module
        ("jobs/score.py", "from braintumor_ray.score._series import top_slice\n", "private module"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    copy = tmp_path / "repo"
    for part in ("braintumor_ray", "jobs", "benchmarks"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / module, "a") as f:
        f.write(line)
    r = _lint_imports(copy)
    assert r.returncode != 0
    broken = r.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and module.replace("/", ".").removesuffix(".py") in broken, r.stdout[-3000:]


def _dev_tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    assert exe.exists(), f"{name} is missing: the dev extra installs it (bash scripts/setup.sh --dev)"
    return str(exe)


def test_ruff_lint_and_format_are_clean_and_catch_a_planted_fault():
    ruff = _dev_tool("ruff")
    lint = subprocess.run([ruff, "check", "braintumor_ray"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-2000:]
    fmt = subprocess.run([ruff, "format", "--check", "braintumor_ray"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, "run .venv/bin/ruff format braintumor_ray\n" + fmt.stdout[-4000:]
    # The project's config is the one read: an unused import in a package module is an error.
    planted = subprocess.run([ruff, "check", "--stdin-filename", "braintumor_ray/core/_planted.py", "-"], cwd=ROOT,
                             input="import os\n", capture_output=True, text=True, timeout=60)
    assert planted.returncode == 1 and "F401" in planted.stdout, planted.stdout


def test_mypy_is_clean_on_the_package_and_catches_a_planted_fault(tmp_path):
    mypy = _dev_tool("mypy")
    # The cache in the checkout: ~35 s cold on 2 cores, ~1 s after.
    clean = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stdout[-6000:] + clean.stderr[-2000:]
    # A wrong return type in a module nothing else in the package imports (the shadow file is
    # checked in its place, the cache kept), so the config's settings are shown to check bodies.
    target = ROOT / "braintumor_ray" / "cli" / "_jobs.py"
    shadow = tmp_path / "_jobs.py"
    shadow.write_text(target.read_text() + "\n\ndef _planted() -> int:\n    return 'not an int'\n")
    planted = subprocess.run([mypy, "--shadow-file", str(target), str(shadow)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert planted.returncode == 1 and "_jobs.py" in planted.stdout and "return-value" in planted.stdout, planted.stdout


def long_functions(source: str, limit: int = 60) -> list[tuple[str, int]]:
    """Functions of ``source`` over ``limit`` lines whose docstring does not say why they are one piece."""
    import ast

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit and "one piece" not in (ast.get_docstring(node) or "").lower():
                out.append((node.name, lines))
    return out


def test_no_package_function_runs_over_60_lines_unless_its_docstring_says_why():
    found = {str(p.relative_to(ROOT)): long_functions(p.read_text()) for p in sorted((ROOT / "braintumor_ray").rglob("*.py"))}
    assert not {p: f for p, f in found.items() if f}, found
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f'def f():\n    """Short."""\n{body}\n') == [("f", 63)]
    assert long_functions(f'def f():\n    """One piece on purpose: a table."""\n{body}\n') == []
