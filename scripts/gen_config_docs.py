"""Write docs/configuration.md: a renderer of the jobs' generated parsers, nothing typed twice.

    .venv/bin/python scripts/gen_config_docs.py            # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_docs.py --check    # exit 1 if it is out of date

A job's options are the job flags it takes (``braintumor_ray.cli.JOB_FLAGS``), then its config
class's fields (``braintumor_ray.core.cli_options``: flags, YAML key, default and help, all from
one ``setting(...)`` each); the search space's samplers, default ranges and reserved keys come
from ``braintumor_ray.tune``. The prose around them is ``scripts/configuration.md.in``, whose
``{{name}}`` slots this fills. tests/project/test_docs.py fails while the committed file differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from braintumor_ray.cli import JOB_FLAGS  # noqa: E402
from braintumor_ray.core import Config, cli_options  # noqa: E402
from braintumor_ray.ingest import IngestConfig  # noqa: E402
from braintumor_ray.score import ScoreConfig  # noqa: E402
from braintumor_ray.train import EnsembleConfig, TrainConfig  # noqa: E402
from braintumor_ray.tune import RESERVED, SAMPLERS, SEARCHABLE, SearchConfig, default_space  # noqa: E402

OUT = os.path.join(REPO, "docs", "configuration.md")
TEMPLATE = os.path.join(REPO, "scripts", "configuration.md.in")
JOBS = {"preprocess": IngestConfig, "train": TrainConfig, "tune": SearchConfig, "ensemble": EnsembleConfig,
        "score": ScoreConfig}
SEARCH_EXAMPLE = "deploy/tune-search.yaml"
KINDS = {"bool": "flag", "int": "INT", "float": "FLOAT", "str": "TEXT", "list": "LIST, comma-separated",
         "mapping": "YAML mapping"}


def load_job(name: str) -> ModuleType:
    """``jobs/<name>.py`` as a module (imported once; its ``main`` is not run)."""
    key = f"_braintumor_job_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(REPO, "jobs", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[key] = mod
    return sys.modules[key]


def _md(text: Any) -> str:
    """Plain text for a Markdown table cell."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")


def _yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def job_flags(name: str) -> list[str]:
    """The job flags ``jobs/<name>.py`` takes: those its own parser fills in from no arguments."""
    given = vars(load_job(name).get_args_parser().parse_args([]))
    return [f for f in JOB_FLAGS if f in given]


def job_section(name: str) -> list[str]:
    cls, doc = JOBS[name], (load_job(name).__doc__ or "").strip()
    usage = [ln[4:] for ln in doc.splitlines() if ln.startswith("    ") and ln.strip()]
    out = [f"## jobs/{name}.py", "", doc.splitlines()[0], "", "```bash", *usage, "```", "",
           "| option | YAML key | value | default | meaning |", "|---|---|---|---|---|"]
    for flag in job_flags(name):
        names, kw = JOB_FLAGS[flag]
        value = "flag" if kw.get("action") == "store_true" else kw.get("metavar", "TEXT")
        default = "off" if value == "flag" else "—"
        out.append(f"| {', '.join(f'`{n}`' for n in names)} | — | {value} | {default} | {_md(kw['help'])} |")
    required = {f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING}
    for o in cli_options(cls):
        flags = [*o.flags, *(["--no-" + o.flags[0][2:]] if o.kind == "bool" else [])]
        value = " \\| ".join(f"`{c}`" for c in o.choices) if o.choices else KINDS[o.kind]
        default = "**required**" if o.key in required else f"`{_yaml(o.default)}`"
        default = f"`${o.env}` if set, else {default}" if o.env else default
        out.append(f"| {', '.join(f'`{f}`' for f in flags)} | `{o.key}` | {value} | {default} | {_md(o.help)} |")
    out.append("")
    for f in dataclasses.fields(cls):  # a nested config: its field's help says what the group is
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, Config):
            out += [f"`--{f.name}.*` (YAML `{f.name}:`, `{f.default_factory.__name__}`): {_md(f.metadata['help'])}.", ""]
    return out


def setting_env_rows() -> list[str]:
    """Environment variables that supply a setting's default: from the settings' own ``env=``."""
    used: dict[tuple[str, str], list[str]] = {}
    for name, cls in JOBS.items():
        for o in cli_options(cls):
            if o.env:
                used.setdefault((o.env, o.flags[0]), []).append(f"jobs/{name}.py")
    return [f"| `{var}` | default of `{flag}` ({', '.join(jobs)}) |" for (var, flag), jobs in sorted(used.items())]


def render() -> str:
    with open(os.path.join(REPO, SEARCH_EXAMPLE), encoding="utf-8") as fh:
        example = fh.read().rstrip("\n")
    slots = {
        "toc": ", ".join(f"[jobs/{j}.py](#jobs{j}py)" for j in JOBS),
        "jobs": "\n".join(line for name in JOBS for line in job_section(name)).rstrip("\n"),
        "searchable": ", ".join(f"`{k}`" for k in SEARCHABLE if k != "model"),
        "samplers": "\n".join(f"- {text}" for text in SAMPLERS.values()),
        "default_space": "\n".join(f"{k}: {_yaml(v)}" for k, v in default_space(pretrained=True).items()),
        "reserved": ", ".join(f"`{k}`" for k in RESERVED if k in TrainConfig.__dataclass_fields__),
        "example_path": SEARCH_EXAMPLE,
        "example": example,
        "setting_env": "\n".join(setting_env_rows()),
    }
    with open(TEMPLATE, encoding="utf-8") as fh:
        text = fh.read()
    for name, value in slots.items():
        if "{{" + name + "}}" not in text:
            raise SystemExit(f"gen_config_docs: {os.path.relpath(TEMPLATE, REPO)} has no {{{{{name}}}}} slot")
        text = text.replace("{{" + name + "}}", value)
    return text.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = ap.parse_args(argv)
    text, rel = render(), os.path.relpath(OUT, REPO)
    current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else None
    if args.check:
        if current != text:
            print(f"{rel} is out of date: run .venv/bin/python scripts/gen_config_docs.py", file=sys.stderr)
        return int(current != text)
    if current != text:
        with open(OUT, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(f"wrote {rel}" if current != text else f"{rel} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
