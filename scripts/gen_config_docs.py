"""Write docs/configuration.md from the jobs' own argparse parsers and the search's dataclasses.

    .venv/bin/python scripts/gen_config_docs.py            # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_docs.py --check    # exit 1 if it is out of date

Nothing here is typed twice: every option, its default and its help come from the parser that
``jobs/<job>.py`` builds in ``parse_args`` (captured without running the job); the keys of a
``jobs/tune.py --config`` YAML from ``SearchConfig`` and ``TrainConfig``; the environment
variables from a scan of the package. A new option is documented by its help text; a new
search/training setting without a command-line option, or a new environment variable, stops
this script until it has a line below. tests/test_docs.py fails while the committed file
differs from what this script writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Any, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "docs", "configuration.md")
JOBS = ("preprocess", "train", "tune", "score")
SEARCH_EXAMPLE = "deploy/tune-search.yaml"

# Option defaults that jobs read from the environment when they build their parser: replaced by
# a marker while the parser is built, so the reference says `$NAME` whatever this machine has.
ENV_DEFAULTS = ("AWS_ENDPOINT_URL",)

# Meanings for options whose help gives only a default (the jobs are the first place to fix
# that: a help text there replaces the line here). An option with neither stops this script.
MISSING_HELP = {
    ("preprocess", "val_fraction"): "share of each class's training groups (duplicates, DICOM series and NIfTI "
    "volumes move as one) carved out as the validation split",
    ("preprocess", "seed"): "seed of the validation split",
    ("train", "epochs"): "epochs; the LR schedule spans them",
    ("train", "label_smoothing"): "label smoothing of the cross-entropy loss",
    ("train", "cpus_per_worker"): "CPUs reserved per Ray Train worker (torch threads)",
    ("train", "seed"): "model init, data order, augmentation",
    ("tune", "cpus_per_trial"): "CPUs of one trial in all (its workers split them)",
    ("tune", "max_concurrent_trials"): "trials at once; set it on an autoscaling cluster that has no GPU node yet",
    ("tune", "seed"): "the search's draws and every trial's seed",
}

# Search settings that have no option of their own in jobs/tune.py (the others take their
# meaning from the option's help).
SEARCH_ONLY = {
    "space": "the search space: overrides of the default ranges, see [space:](#space)",
    "fixed": "training settings every trial gets, see [fixed:](#fixed)",
    "max_failures": "times Tune restarts a failed trial (a lost node, a crashed worker) from its last checkpoint",
    "pretrained": "start every backbone from ImageNet weights (`--no-pretrained` sets false)",
}
# Training settings that have no option in jobs/train.py.
TRAIN_ONLY = {
    "eval_batch_size": "batch size of validation and test evaluation, per worker",
    "min_lr_ratio": "the cosine schedule ends at lr x this",
    "augment": "the augmentation at strength 1, a mapping of `rotate` (degrees), `shift`, `zoom`, `flip` "
    "(probability), `brightness`, `contrast` (`braintumor_ray.augment.TrainAugment`)",
    "amp": "mixed precision; null = on with a GPU",
    "channels_last": "channels-last memory layout; null = on without a GPU",
}
# TrainConfig fields that SearchConfig.trial_config sets from the search's own keys (SearchConfig
# has a field of the same name), as opposed to the job's other options.
FROM_SEARCH_KEYS = ("seed", "max_failures")
# What each sampler of the search space draws.
SAMPLERS = {
    "choice": "`{choice: [a, b, c]}`: one of the values, at random per trial",
    "grid": "`{grid: [a, b]}`: every value; multiplies the trial count by the list's length",
    "uniform": "`{uniform: [low, high]}`: a float, uniform in [low, high)",
    "loguniform": "`{loguniform: [low, high]}`: a float, uniform in log space (low > 0)",
    "randint": "`{randint: [low, high]}`: an integer in [low, high)",
}
# Environment variables that braintumor_ray and jobs/ read themselves (checked against a scan).
ENV_PACKAGE = {
    "AWS_ENDPOINT_URL": "default of every job's `--s3-endpoint-url`: an S3-compatible store (MinIO, Ceph)",
    "BRAINTUMOR_CACHE_DIR": "where converted offline Lite0 weights are cached (`$BRAINTUMOR_CACHE_DIR/weights`; "
    "default `~/.cache/braintumor_ray`)",
    "HF_HUB_OFFLINE": "`1`: never ask the Hugging Face hub for pretrained weights (air-gapped clusters); only "
    "cached or `--weights` files are used",
    "TRANSFORMERS_OFFLINE": "same as `HF_HUB_OFFLINE`",
    "HF_ENDPOINT": "a Hugging Face hub mirror to fetch pretrained weights from",
    "HF_HUB_CACHE": "the Hugging Face cache folder that is searched for earlier downloads",
}
# Environment variables of the libraries underneath that operators set (not read by this package).
ENV_LIBRARIES = {
    "RAY_ADDRESS": "Ray: the cluster a job joins (set by `ray job submit` for the job; `--ray-address` "
    "overrides); for the `ray job` CLI, the dashboard address, e.g. `http://127.0.0.1:8265`",
    "RAY_AUTH_MODE": "Ray 2.60: `token` turns token authentication on, for clusters and for the `ray job` CLI "
    "(a client without it sends no token); `disabled` turns it off. See [runbook.md](runbook.md#tokens)",
    "RAY_AUTH_TOKEN": "Ray: the token itself (wins over the file)",
    "RAY_AUTH_TOKEN_PATH": "Ray: a file holding the token (default `~/.ray/auth_token`)",
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION":
    "s3fs/botocore credentials and region; on AWS leave them unset and use the instance role",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "Ray Data: `1` keeps progress bars out of job logs",
}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def load_job(name: str) -> ModuleType:
    """``jobs/<name>.py`` as a module (imported once; its ``main`` is not run)."""
    key = f"_braintumor_job_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, os.path.join(REPO, "jobs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[key]
        raise
    return mod


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(saved)


_ENV_MARK = "@gen_config_docs:env:"


def job_parser(name: str, *, env_marks: bool = True) -> argparse.ArgumentParser:
    """The parser ``jobs/<name>.py`` builds in ``parse_args``: caught at its ``parse_args`` call.

    With ``env_marks``, a default read from a variable of ENV_DEFAULTS is the marker
    ``"@gen_config_docs:env:NAME"`` (the docs say ``$NAME``), whatever this machine's environment holds;
    without, those variables are unset while the parser is built.
    """
    mod = load_job(name)
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        with _without_env(ENV_DEFAULTS):
            if env_marks:
                os.environ.update({k: _ENV_MARK + k for k in ENV_DEFAULTS})
            mod.parse_args([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"jobs/{name}.py: parse_args did not call ArgumentParser.parse_args")


# --- rendering --------------------------------------------------------------------------------

_DEFAULT_IN_HELP = [
    re.compile(r"^(?P<help>.*?)\s*\(default:? (?P<default>.*)\)$", re.S),
    re.compile(r"^(?P<help>)default:? (?P<default>.*)$", re.S),
]


def _md(text: str) -> str:
    """Plain text for a Markdown table cell."""
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")


def _code(value: Any) -> str:
    return f"`{value}`"


def split_help(help_text: str) -> tuple[str, str | None]:
    """``"side of the output (default 224)"`` -> ``("side of the output", "224")``."""
    for pattern in _DEFAULT_IN_HELP:
        m = pattern.match(help_text)
        if m:
            return m["help"].rstrip(" ,;:"), m["default"]
    return help_text, None


def action_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def meaning(job: str, parser: argparse.ArgumentParser, action: argparse.Action) -> tuple[str, str | None]:
    """(what the option does, the default its help names); stops on an option with no meaning."""
    text, default = split_help(action_help(parser, action))
    text = text or MISSING_HELP.get((job, action.dest), "")
    if not text:
        raise SystemExit(f"gen_config_docs: jobs/{job}.py {action.option_strings[0]} has no help text: "
                         "give it one in the job (or, for now, a line in MISSING_HELP)")
    return text, default


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(_code(c) for c in action.choices)
    if action.metavar:
        kind = str(action.metavar)
    else:
        kind = {int: "INT", float: "FLOAT"}.get(action.type, "TEXT")
    if isinstance(action, argparse._AppendAction):
        kind += ", repeatable"
    return kind


def _default(action: argparse.Action, from_help: str | None) -> str:
    if action.required:
        return "**required**"
    if action.nargs == 0:
        return "off"
    if isinstance(action.default, str) and action.default.startswith(_ENV_MARK):
        return _md(from_help) if from_help else f"`${action.default[len(_ENV_MARK):]}` if set"
    if action.default is not None and action.default != argparse.SUPPRESS:
        return _code(action.default)
    return _md(from_help) if from_help else "—"


def option_table(job: str, parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    excl: dict[str, list[str]] = {}
    for group in parser._mutually_exclusive_groups:
        for a in group._group_actions:
            excl[a.dest] = [o.option_strings[0] for o in group._group_actions if o is not a]
    lines = ["| option | value | default | meaning |", "|---|---|---|---|"]
    for a in actions:
        text, from_help = meaning(job, parser, a)
        if a.dest in excl:
            text += f" (not with {', '.join(excl[a.dest])})"
        names = ", ".join(_code(o) for o in a.option_strings) if a.option_strings else _code(a.dest)
        lines.append(f"| {names} | {_value(a)} | {_default(a, from_help)} | {_md(text)} |")
    return lines


def _usage_block(doc: str) -> list[str]:
    """The indented example lines of a job's docstring, as a shell block."""
    lines = [ln[4:] for ln in doc.splitlines() if ln.startswith("    ") and ln.strip()]
    return ["```bash", *lines, "```"] if lines else []


def job_section(name: str) -> list[str]:
    mod = load_job(name)
    parser = job_parser(name)
    doc = (mod.__doc__ or "").strip()
    out = [f"## jobs/{name}.py", "", doc.splitlines()[0] if doc else "", ""]
    usage = _usage_block(mod.__doc__ or "")
    if usage:
        out += usage + [""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            out += [f"*{group.title[0].upper()}{group.title[1:]}:*", ""]
        out += option_table(name, parser, actions) + [""]
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _yaml_value(v: Any) -> str:
    import yaml

    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    if isinstance(v, tuple):
        v = list(v)
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _option_for(parser: argparse.ArgumentParser, field: str, aliases: dict[str, str]) -> argparse.Action | None:
    flag = aliases.get(field, "--" + field.replace("_", "-"))
    for a in parser._actions:
        if flag in a.option_strings:
            return a
    return None


def search_section() -> list[str]:
    from braintumor_ray.train import TrainConfig
    from braintumor_ray.tune import SEARCHABLE, SearchConfig, default_space
    from braintumor_ray.tune._config import RESERVED
    from braintumor_ray.tune._config import SAMPLERS as CODE_SAMPLERS

    if set(CODE_SAMPLERS) != set(SAMPLERS):
        raise SystemExit(f"gen_config_docs: samplers in the code {CODE_SAMPLERS} differ from SAMPLERS here: document them")
    tune_parser = job_parser("tune")
    train_parser = job_parser("train")

    out = [
        "## The search YAML: `jobs/tune.py --config`",
        "",
        "A YAML mapping (a local file, `s3://` works too) with any of the keys below; an option given",
        "on the command line wins over the same key in the file. The job checks the whole search",
        "(every key, every range, one trial's training settings) before it starts any trial, and",
        "refuses an unknown key.",
        "",
        "| key | default | option | meaning |",
        "|---|---|---|---|",
    ]
    aliases = {"pretrained": "--no-pretrained"}
    for f in dataclasses.fields(SearchConfig):
        action = _option_for(tune_parser, f.name, aliases)
        if f.name in SEARCH_ONLY:
            text = SEARCH_ONLY[f.name]
        elif action is not None:
            text = meaning("tune", tune_parser, action)[0]
        else:
            raise SystemExit(f"gen_config_docs: SearchConfig.{f.name} has no option in jobs/tune.py: "
                             "describe it in SEARCH_ONLY")
        option = _code(action.option_strings[0]) if action is not None else "—"
        out.append(f"| `{f.name}` | `{_yaml_value(_field_default(f))}` | {option} | {_md(text)} |")

    out += [
        "",
        "### space:",
        "",
        "The search space: a mapping of training setting to a range. Searchable keys: "
        + ", ".join(_code(k) for k in SEARCHABLE if k != "model")
        + " (backbones are `models:`, not a space key). A key's value is one of:",
        "",
    ]
    out += [f"- {SAMPLERS[k]}" for k in CODE_SAMPLERS]
    out += [
        "- a constant (`augment_strength: 1.0`): every trial gets that value",
        "- `null`: drop the key from the default space (trials get the training default)",
        "",
        "Keys not named keep the default space, which is (`transfer` only with pretrained weights):",
        "",
        "```yaml",
        *[f"{k}: {_yaml_value(v)}" for k, v in default_space(pretrained=True).items()],
        "```",
        "",
        "Trials: `models` x `num_samples` x the product of the `grid` lists; each trial draws its",
        "own values from the other ranges (`seed` makes the draws repeatable).",
        "",
        "### fixed:",
        "",
        "Training settings (`braintumor_ray.train.TrainConfig` fields) that every trial gets. A",
        "key of the default space given here replaces its range (`lr: 0.001` fixes the learning",
        "rate); a key also given in `space:` is refused. Not here: the ones the search sets itself ("
        + ", ".join(_code(k) for k in RESERVED if k not in FROM_SEARCH_KEYS)
        + ": use the job's options; "
        + ", ".join(_code(k) for k in FROM_SEARCH_KEYS)
        + ": the search's own keys).",
        "",
        "| key | default | same as `jobs/train.py` | meaning |",
        "|---|---|---|---|",
    ]
    train_aliases = {"drop_rate": "--dropout"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESERVED or f.name in SEARCHABLE or f.name in FROM_SEARCH_KEYS:
            continue
        action = _option_for(train_parser, f.name, train_aliases)
        if action is not None:
            text = meaning("train", train_parser, action)[0]
        elif f.name in TRAIN_ONLY:
            text = TRAIN_ONLY[f.name]
        else:
            raise SystemExit(f"gen_config_docs: TrainConfig.{f.name} has no option in jobs/train.py: "
                             "describe it in TRAIN_ONLY")
        option = _code(action.option_strings[0]) if action is not None else "—"
        out.append(f"| `{f.name}` | `{_yaml_value(_field_default(f))}` | {option} | {_md(text)} |")

    with open(os.path.join(REPO, SEARCH_EXAMPLE)) as fh:
        example = fh.read().rstrip("\n")
    out += [
        "",
        f"### Example: `{SEARCH_EXAMPLE}`",
        "",
        "```yaml",
        example,
        "```",
        "",
    ]
    return out


_ENV_READ = [
    re.compile(r"""os\.environ(?:\.get)?\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""os\.environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]"""),
    re.compile(r"""os\.getenv\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""^[A-Z_]*ENV[A-Z_]*\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M),
]


def scan_env_vars() -> dict[str, list[str]]:
    """Environment variables read in braintumor_ray/ and jobs/: name -> files."""
    found: dict[str, list[str]] = {}
    for top in ("braintumor_ray", "jobs"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for fn in sorted(files):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                for pattern in _ENV_READ:
                    for name in pattern.findall(text):
                        found.setdefault(name, []).append(os.path.relpath(path, REPO))
    return found


def env_section() -> list[str]:
    found = scan_env_vars()
    missing = sorted(set(found) - set(ENV_PACKAGE))
    if missing:
        raise SystemExit(f"gen_config_docs: environment variables read but not documented: {', '.join(missing)} "
                         f"({'; '.join(n + ' in ' + ', '.join(sorted(set(found[n]))) for n in missing)}): "
                         "describe them in ENV_PACKAGE")
    gone = sorted(set(ENV_PACKAGE) - set(found))
    if gone:
        raise SystemExit(f"gen_config_docs: ENV_PACKAGE documents {', '.join(gone)}, which nothing reads any more")
    out = [
        "## Environment variables",
        "",
        "Read by this project (`braintumor_ray/`, `jobs/`):",
        "",
        "| variable | effect |",
        "|---|---|",
    ]
    out += [f"| `{k}` | {v} |" for k, v in sorted(ENV_PACKAGE.items())]
    out += [
        "",
        "Read by Ray and s3fs/botocore underneath, the ones an operator sets:",
        "",
        "| variable | effect |",
        "|---|---|",
    ]
    out += [f"| {', '.join(_code(n) for n in k.split(', '))} | {v} |" for k, v in ENV_LIBRARIES.items()]
    out += [
        "",
        "A job's workers on other nodes see the environment of the Ray cluster, not of the shell that",
        "ran `ray job submit`: set variables for a job with",
        "`ray job submit --runtime-env-json '{\"env_vars\": {\"HF_HUB_OFFLINE\": \"1\"}}' ...`, or on every",
        "node before `ray start`.",
        "",
    ]
    return out


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from the jobs' parsers: do not edit by hand;",
        "     run `.venv/bin/python scripts/gen_config_docs.py` (tests/test_docs.py checks it). -->",
        "",
        "Every option of the four jobs, the YAML of a search, and the environment variables. Run a",
        "job with `--help` for the same list. How to run them on a cluster: [runbook.md](runbook.md).",
        "A command in these docs is checked by `tests/test_docs.py` through the job's own parser and",
        "configuration; a synopsis, a line with `...` or `[optional]` parts, has its option names",
        "checked only.",
        "",
        "- " + ", ".join(f"[jobs/{j}.py](#jobs{j}py)" for j in JOBS),
        "- [The search YAML](#the-search-yaml-jobstunepy---config), [space:](#space), [fixed:](#fixed)",
        "- [Environment variables](#environment-variables)",
        "",
    ]
    for name in JOBS:
        out += job_section(name)
    out += search_section()
    out += env_section()
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else None
    if args.check:
        if current != text:
            print(f"{os.path.relpath(OUT, REPO)} is out of date: run .venv/bin/python scripts/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    if current != text:
        with open(OUT, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {os.path.relpath(OUT, REPO)}")
    else:
        print(f"{os.path.relpath(OUT, REPO)} is up to date")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
