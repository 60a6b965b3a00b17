"""The docs stay true: every command they show is one the code accepts, every file they name exists.

Fast and without a Ray cluster. What is checked, in README.md, docs/*.md, cluster.yaml and
deploy/*.yaml:

- docs/configuration.md is what scripts/gen_config_docs.py writes from the jobs' config classes
  now, and it has a row for every option of every job.
- Commands, taken from fenced shell blocks (bash, sh, console, cron or no language; backslash
  continuations joined, `&&`/`;`/`|` split, redirections dropped) and from YAML (a RayJob's
  `entrypoint`, a CronJob's `command` list, a cluster's start commands):
  - `python jobs/<job>.py ARGS` (any python, also after `ray job submit ... --`): the job's
    `main()` runs with its side effects stubbed out (no Ray, no storage, no sample data), so
    its own parser parses ARGS and its own code builds its config (IngestConfig, TrainConfig,
    SearchConfig, ScoreConfig), which validates itself. A synopsis (a token with `...`, or
    `[optional]` parts) has only its option names checked against the parser.
  - `ray ...`: parsed by Ray's own click CLI (an unknown option or subcommand fails); the
    cluster config file of `ray up/down/attach/exec/dashboard` must exist.
  - `bash scripts/X` and `python scripts/X.py` / `python benchmarks/X.py ARGS`: the file exists;
    a Python one is run as `X.py ARGS --help`, which must exit 0 and list every flag in ARGS.
  - `kubectl ... -f FILE`: FILE exists.
- `cluster.yaml`/`deploy/*.yaml` named anywhere in the docs exist; relative links and their
  #anchors resolve; a YAML block headed `# overlay: FILE` merged into FILE passes Ray's
  cluster-config validator; the search example builds its SearchConfig.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md"] + sorted(f"docs/{f}" for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
YAML_FILES = ["cluster.yaml"] + sorted(
    f"deploy/{f}" for f in os.listdir(os.path.join(REPO, "deploy")) if f.endswith((".yaml", ".yml"))
)
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "cron", "zsh"}
PROGRAMS = {"ray", "python", "python3", "bash", "sh", "kubectl"}
OPERATORS = {"&&", "||", ";", "|", "&"}
JOBS = ("preprocess", "train", "tune", "ensemble", "score")
CONFIG_CLASS = {"preprocess": "IngestConfig", "train": "TrainConfig", "tune": "SearchConfig", "ensemble": "EnsembleConfig",
                "score": "ScoreConfig"}
PYTHON = os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(os.path.join(REPO, ".venv", "bin", "python")) \
    else sys.executable


def _load_generator():
    spec = importlib.util.spec_from_file_location("_gen_config_docs", os.path.join(REPO, "scripts", "gen_config_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


# --- extraction ----------------------------------------------------------------------------------


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]  # from the program on (``ray ...``, ``python jobs/x.py ...``)
    source: str = ""  # the text it came from
    inner: list["Command"] = field(default_factory=list)

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0])

    def __repr__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number of the first line inside, content) of every fenced block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^ {0,3}(```+|~~~+)\s*([\w+-]*)", lines[i])
        if m:
            fence, lang, start = m[1], m[2].lower(), i + 1
            j = start
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            blocks.append((lang, start + 1, "\n".join(lines[start:j])))
            i = j + 1
        else:
            i += 1
    return blocks


def logical_lines(text: str, first_line: int) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with the number of its first line."""
    out, buf, start = [], "", None
    for n, line in enumerate(text.splitlines(), first_line):
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def _segments(tokens: list[str]) -> list[list[str]]:
    segs, cur = [], []
    for t in tokens:
        if t in OPERATORS:
            segs.append(cur)
            cur = []
        else:
            cur.append(t)
    segs.append(cur)
    out = []
    for seg in segs:
        for k, t in enumerate(seg):  # a redirection ends the command's own words
            if re.match(r"^(\d*>>?|\d*>&\d*|<)", t):
                seg = seg[:k]
                break
        out.append(seg)
    return out


def _command(argv: list[str], where: str, source: str) -> Command | None:
    for k, t in enumerate(argv):
        if os.path.basename(t) in PROGRAMS:
            argv = argv[k:]
            break
    else:
        return None
    prog = os.path.basename(argv[0])
    if prog.startswith("python") and (len(argv) < 2 or argv[1].startswith("-")):
        return None  # python -m / -c: not a script of this repository
    cmd = Command(where, argv, source)
    if prog == "ray" and argv[1:3] == ["job", "submit"] and "--" in argv:
        entry = argv[argv.index("--") + 1:]
        inner = _command(entry, where, source)
        cmd.inner = [inner] if inner else []
    if prog == "ray" and len(argv) > 1 and argv[1] == "exec":
        positional = [t for t in argv[2:] if not t.startswith("-")]
        if len(positional) >= 2:
            cmd.inner = commands_in_line(positional[1], where)
    return cmd


def commands_in_line(line: str, where: str) -> list[Command]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        if any(re.search(rf"(^|[\s/]){p}\b", line) for p in PROGRAMS):
            raise AssertionError(f"{where}: cannot split {line!r} as a shell line: {e}") from e
        return []
    out = []
    for seg in _segments(tokens):
        cmd = _command(seg, where, line)
        if cmd:
            out.append(cmd)
    return out


def _yaml_commands(node, where: str) -> list[Command]:
    out: list[Command] = []
    if isinstance(node, dict):
        for v in node.values():
            out += _yaml_commands(v, where)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node) and os.path.basename(node[0]) in PROGRAMS:
            cmd = _command(list(node), where, shlex.join(node))  # an argv list (a container's command)
            if cmd:
                out.append(cmd)
        else:
            for v in node:
                out += _yaml_commands(v, where)
    elif isinstance(node, str):
        for line in node.splitlines():
            out += commands_in_line(line, where)
    return out


def doc_commands() -> list[Command]:
    """Every command in the docs and the cluster/deploy YAML, nested ones flattened in too."""
    found: list[Command] = []
    for rel in DOCS:
        text = open(os.path.join(REPO, rel), encoding="utf-8").read()
        for lang, first, body in fenced_blocks(text):
            if lang in SHELL_LANGS:
                for n, line in logical_lines(body, first):
                    found += commands_in_line(line, f"{rel}:{n}")
            elif lang in ("yaml", "yml"):
                found += _yaml_commands(yaml.safe_load(body), f"{rel}:{first}")
    for rel in YAML_FILES:
        with open(os.path.join(REPO, rel)) as f:
            for doc in yaml.safe_load_all(f):
                found += _yaml_commands(doc, rel)
    flat: list[Command] = []

    def add(c: Command) -> None:
        flat.append(c)
        for i in c.inner:
            add(i)

    for c in found:
        add(c)
    return flat


COMMANDS = doc_commands()


def _job_of(cmd: Command) -> str | None:
    if not cmd.program.startswith("python"):
        return None
    m = re.match(r"^(?:.*/)?jobs/(\w+)\.py$", cmd.argv[1])
    return m[1] if m else None


def _script_of(cmd: Command) -> str | None:
    if cmd.program.startswith("python") and _job_of(cmd) is None:
        return cmd.argv[1]
    if cmd.program in ("bash", "sh") and len(cmd.argv) > 1:
        return cmd.argv[1]
    return None


def _ids(cmds: list[Command]) -> list[str]:
    return [f"{c.where} {' '.join(c.argv[:3])}" for c in cmds]


JOB_COMMANDS = [c for c in COMMANDS if _job_of(c)]
RAY_COMMANDS = [c for c in COMMANDS if c.program == "ray"]
SCRIPT_COMMANDS = [c for c in COMMANDS if _script_of(c)]
KUBECTL_COMMANDS = [c for c in COMMANDS if c.program == "kubectl"]


# --- checking a job command ------------------------------------------------------------------------


def is_synopsis(args: list[str]) -> bool:
    return any("..." in a or a.startswith("[") or a.endswith("]") for a in args)


class _Built(Exception):
    def __init__(self, config) -> None:
        self.config = config


def build_job_config(job: str, args: list[str], monkeypatch):
    """Run ``jobs/<job>.py``'s main(args) up to the point where its config exists; return it.

    The stage function the job calls, Ray, and sample generation are stubbed out; the parser, the
    config building and the config's own validation are the job's. A bad command raises
    AssertionError with the job's own message.
    """
    import braintumor_ray.tune

    mod = gen.load_job(job)

    def stop(config, *a, **kw):
        raise _Built(config)

    monkeypatch.setattr(mod, "join_ray", lambda address: None)
    monkeypatch.setattr(mod, "run_job", lambda work: work())
    stage = {"preprocess": "run_ingest", "train": "run_training", "tune": "run_search", "ensemble": "build_ensemble",
             "score": "run_scoring"}[job]
    monkeypatch.setattr(mod, stage, stop)
    if job == "preprocess":
        monkeypatch.setattr(mod, "make_sample_dataset", lambda *a, **kw: None)
    if job in ("train", "tune"):
        monkeypatch.setattr(mod, "demo_data", lambda **kw: os.path.join(REPO, "demo", "preprocessed"))
    if job == "tune":
        # --resume reads the search's settings from storage: stand in for them
        monkeypatch.setattr(mod, "load_search_config",
                            lambda storage, name, **kw: braintumor_ray.tune.SearchConfig(storage=storage, name=name))
    monkeypatch.chdir(REPO)  # as under `ray job submit --working-dir .`
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = mod.main(list(args))
    except _Built as b:
        return b.config
    except SystemExit as e:
        raise AssertionError(f"jobs/{job}.py refuses {shlex.join(args)}: exit {e.code}: {err.getvalue().strip()}") from None
    except Exception as e:
        raise AssertionError(f"jobs/{job}.py {shlex.join(args)}: {type(e).__name__}: {e}") from None
    raise AssertionError(f"jobs/{job}.py {shlex.join(args)}: main returned {rc} without building its config: "
                         f"{err.getvalue().strip()}")


def check_job_command(cmd: Command, monkeypatch) -> None:
    job = _job_of(cmd)
    assert job in JOBS, f"{cmd}: there is no jobs/{job}.py"
    args = cmd.argv[2:]
    if is_synopsis(args):
        parser = gen.load_job(job).get_args_parser()
        known = set(parser._option_string_actions)
        flags = {a.strip("[]").split("=")[0] for a in args if a.strip("[]").startswith("--")}
        unknown = sorted(flags - known)
        assert not unknown, f"{cmd}: jobs/{job}.py has no option {', '.join(unknown)}"
        return
    config = build_job_config(job, args, monkeypatch)
    assert type(config).__name__ == CONFIG_CLASS[job], f"{cmd}: built a {type(config).__name__}"


def check_ray_command(cmd: Command) -> None:
    import click
    from ray.scripts.scripts import cli

    argv, node, path = list(cmd.argv[1:]), cli, ["ray"]
    while isinstance(node, click.Group) and argv and argv[0] in node.commands:
        path.append(argv[0])
        node = node.commands[argv.pop(0)]
    assert not isinstance(node, click.Group), f"{cmd}: no such ray command (after {' '.join(path)})"
    try:
        ctx = node.make_context(" ".join(path), argv)
    except click.ClickException as e:
        raise AssertionError(f"{cmd}: {e.format_message()}") from None
    config_file = ctx.params.get("cluster_config_file")
    if config_file:
        assert os.path.isfile(os.path.join(REPO, config_file)), f"{cmd}: {config_file} does not exist"
    if path[1:3] == ["job", "submit"]:
        assert list(ctx.params["entrypoint"]) == cmd.argv[cmd.argv.index("--") + 1:], f"{cmd}: entrypoint"


# --- the tests -------------------------------------------------------------------------------------


def test_configuration_md_is_what_the_generator_writes():
    with open(gen.OUT, encoding="utf-8") as f:
        current = f.read()
    assert current == gen.render(), (
        "docs/configuration.md is out of date with the jobs' options: run "
        ".venv/bin/python scripts/gen_config_docs.py and commit the result"
    )


def test_every_benchmark_script_has_a_row_in_the_benchmarks_readme():
    with open(os.path.join(REPO, "benchmarks", "README.md"), encoding="utf-8") as f:
        listed = set(re.findall(r"^\| `([\w.]+)`", f.read(), flags=re.M))
    scripts = {f for f in os.listdir(os.path.join(REPO, "benchmarks"))
               if f.endswith((".py", ".sh")) and not f.startswith("_")}
    # gpu_check.py is gpu_check.sh's half, listed in its row.
    missing = scripts - listed - {"gpu_check.py"}
    assert not missing, f"benchmarks/README.md has no row for {sorted(missing)}: add what each measures and feeds"


def test_the_docs_have_commands_to_check():
    # Guards the extractor: these must be found, or the checks below would pass on nothing.
    assert len(JOB_COMMANDS) >= 20 and len(RAY_COMMANDS) >= 15 and SCRIPT_COMMANDS, (
        len(JOB_COMMANDS), len(RAY_COMMANDS), len(SCRIPT_COMMANDS))
    wheres = {c.where.split(":")[0] for c in JOB_COMMANDS}
    assert {"README.md", "docs/runbook.md", "docs/scoring.md", "docs/benchmarks.md",
            "docs/configuration.md", "deploy/rayjob-score.yaml"} <= wheres


def test_the_runbook_submits_every_job_and_resumes():
    submitted = {
        (_job_of(i), "--resume" in i.argv)
        for c in RAY_COMMANDS if c.where.startswith("docs/runbook.md") and c.argv[1:3] == ["job", "submit"]
        for i in c.inner if _job_of(i)
    }
    for job in JOBS:
        assert (job, False) in submitted, f"docs/runbook.md has no `ray job submit ... -- python jobs/{job}.py`"
    assert ("train", True) in submitted and ("tune", True) in submitted


@pytest.mark.parametrize("cmd", JOB_COMMANDS, ids=_ids(JOB_COMMANDS))
def test_job_command_parses_and_builds_its_config(cmd, monkeypatch):
    check_job_command(cmd, monkeypatch)


@pytest.mark.parametrize("cmd", RAY_COMMANDS, ids=_ids(RAY_COMMANDS))
def test_ray_command_is_one_rays_cli_accepts(cmd):
    check_ray_command(cmd)


# Runs each documented script as `python X.py ARGS --help` would: as __main__, with its own
# sys.argv and sys.path[0], its exit code and output kept. One interpreter for all of them, so
# torch and Ray are imported once (the scripts only parse their arguments before exiting).
_HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
results = []
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [args[0], *args[1:], "--help"]
    sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
    code = "did not exit"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(args[0], run_name="__main__")
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    results.append([args, code, out.getvalue()])
sys.__stdout__.write(json.dumps(results))
"""


def _help_args(cmd: Command) -> tuple[str, ...]:
    return tuple(a for a in cmd.argv[1:] if not is_synopsis([a]))


@pytest.fixture(scope="module", autouse=True)
def help_runs():
    """``X.py ARGS --help`` of every documented Python script, started with the module's first
    test so that it overlaps the in-process checks; a test waits for the answers it needs."""
    wanted = sorted({_help_args(c) for c in SCRIPT_COMMANDS if c.program.startswith("python")
                     and os.path.isfile(os.path.join(REPO, c.argv[1]))})
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([PYTHON, "-c", _HELP_RUNNER, json.dumps(wanted)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    answers: dict[tuple[str, ...], tuple[object, str]] = {}

    def get(args: tuple[str, ...]) -> tuple[object, str]:
        if not answers:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"the --help runner failed ({proc.returncode}): {err[-3000:]}"
            answers.update({tuple(a): (code, text) for a, code, text in json.loads(out)})
        return answers[args]

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("cmd", SCRIPT_COMMANDS, ids=_ids(SCRIPT_COMMANDS))
def test_script_command_names_an_existing_script_and_its_flags(cmd, help_runs):
    script = _script_of(cmd)
    assert os.path.isfile(os.path.join(REPO, script)), f"{cmd}: {script} does not exist"
    if not cmd.program.startswith("python"):
        return
    check_script_help(cmd, *help_runs(_help_args(cmd)))


def check_script_help(cmd: Command, code: object, out: str) -> None:
    args = _help_args(cmd)
    assert code == 0, f"{cmd}: `{shlex.join(args)} --help` exited {code!r}:\n{out[-2000:]}"
    offered = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out))
    used = {a.split("=")[0] for a in args[1:] if re.match(r"^--?[A-Za-z]", a)}
    assert used <= offered, f"{cmd}: {args[0]} has no option {', '.join(sorted(used - offered))}"


@pytest.mark.parametrize("cmd", KUBECTL_COMMANDS, ids=_ids(KUBECTL_COMMANDS))
def test_kubectl_command_files_exist(cmd):
    for k, a in enumerate(cmd.argv):
        if a in ("-f", "--filename") and not re.match(r"^\w+://", cmd.argv[k + 1]):
            assert os.path.isfile(os.path.join(REPO, cmd.argv[k + 1])), f"{cmd}: {cmd.argv[k + 1]} does not exist"


def test_cluster_files_named_in_the_docs_exist():
    for rel in DOCS:
        text = open(os.path.join(REPO, rel), encoding="utf-8").read()
        for name in set(re.findall(r"(?<![\w./~-])((?:deploy/)[\w.-]+\.ya?ml|cluster\.yaml)\b", text)):
            assert os.path.isfile(os.path.join(REPO, name)), f"{rel} names {name}, which does not exist"


def _slug(heading: str) -> str:
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = open(path, encoding="utf-8").read()
    code = {n for _, first, body in fenced_blocks(text) for n in range(first - 1, first + body.count("\n") + 1)}
    seen: dict[str, int] = {}
    out = set()
    for n, line in enumerate(text.splitlines()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if m and n not in code:
            s = _slug(m[1])
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def test_relative_links_and_anchors_resolve():
    for rel in DOCS:
        text = open(os.path.join(REPO, rel), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(REPO, os.path.dirname(rel), path)) if path else os.path.join(REPO, rel)
            assert os.path.exists(full), f"{rel}: link {target}: {path} does not exist"
            if anchor and full.endswith(".md"):
                assert anchor in _anchors(full), f"{rel}: link {target}: no heading with that anchor"


def _overlays() -> list[tuple[str, str, dict]]:
    out = []
    for rel in DOCS:
        text = open(os.path.join(REPO, rel), encoding="utf-8").read()
        for lang, first, body in fenced_blocks(text):
            m = re.match(r"^# overlay: (\S+)", body)
            if lang in ("yaml", "yml") and m:
                out.append((f"{rel}:{first}", m[1], yaml.safe_load(body)))
    return out


@pytest.mark.parametrize("where,target,overlay", _overlays(), ids=[o[0] for o in _overlays()])
def test_cluster_overlay_in_the_docs_passes_rays_validator(where, target, overlay):
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(REPO, target)) as f:
        config = yaml.safe_load(f)
    config.update(copy.deepcopy(overlay))
    validate_config(prepare_config(config))
    # the overlay keeps what the file had, beside what it adds
    for key, value in overlay.items():
        if isinstance(value, dict):
            with open(os.path.join(REPO, target)) as f:
                original = yaml.safe_load(f).get(key) or {}
            assert set(original) <= set(value), f"{where}: the overlay drops {key}: {set(original) - set(value)}"


def test_there_is_a_token_overlay_for_cluster_yaml():
    assert any(target == "cluster.yaml" for _, target, _ in _overlays())


def test_search_example_builds_its_search():
    from braintumor_ray.core import read_yaml
    from braintumor_ray.tune import SearchConfig

    cfg = SearchConfig.from_dict(read_yaml(os.path.join(REPO, gen.SEARCH_EXAMPLE)) | {"data": "s3://bucket/preprocessed"})
    assert cfg.space and cfg.fixed


def test_every_setting_of_every_job_is_an_option_and_documented():
    """Each field of a job's config class (nested ones too) has its option in the job's parser
    and its row in docs/configuration.md; the job flags each job takes are documented too."""
    from braintumor_ray.core import cli_options

    text = open(gen.OUT, encoding="utf-8").read()
    for job, cls in gen.JOBS.items():
        assert cls.__name__ == CONFIG_CLASS[job]
        section = text.split(f"## jobs/{job}.py", 1)[1].split("\n## ", 1)[0]
        parser = gen.load_job(job).get_args_parser()
        for opt in cli_options(cls):
            for flag in opt.flags:
                assert flag in parser._option_string_actions, f"jobs/{job}.py has no {flag}"
            assert f"| `{opt.flags[0]}`" in section and f"| `{opt.key}` |" in section, (job, opt.key)
        for flag in gen.job_flags(job):
            assert f"| `{gen.JOB_FLAGS[flag][0][0]}` |" in section, (job, flag)


# --- the checks themselves fail on a bad command -------------------------------------------------


@pytest.mark.parametrize("line,message", [
    ("python jobs/train.py --data s3://b/p --no-such-option 1", "unrecognized arguments"),
    ("python jobs/train.py --data s3://b/p --epochs eight", "invalid int value"),
    ("python jobs/train.py --data s3://b/p --lr 5", "lr=5"),
    ("python jobs/tune.py --data s3://b/p --grace-period 9 --max-epochs 4", "grace_period"),
    ("python jobs/tune.py --config deploy/no-such.yaml", "no-such.yaml"),
    ("python jobs/score.py --model m --input s3://b/in", "--output"),
    ("python jobs/preprocess.py --input s3://b/raw", "--output is required"),
    ("python jobs/score.py ... [--batch-size 32] [--no-such-flag]", "no option --no-such-flag"),
    ("python jobs/nope.py --x 1", "there is no jobs/nope.py"),
])
def test_a_bad_job_command_fails(line, message, monkeypatch):
    (cmd,) = commands_in_line(line, "test")
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_job_command(cmd, monkeypatch)


@pytest.mark.parametrize("line,message", [
    ("ray job submit --working-dir . --no-such-flag -- python jobs/score.py", "No such option"),
    ("ray up no-such-cluster.yaml", "does not exist"),
    ("ray jobb list", "no such ray command"),
])
def test_a_bad_ray_command_fails(line, message):
    (cmd, *_) = commands_in_line(line, "test")
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_ray_command(cmd)


def test_a_bad_script_command_fails():
    (cmd,) = commands_in_line(".venv/bin/python benchmarks/crop_quality.py --every 3 --no-such-flag", "test")
    usage = "usage: crop_quality.py [-h] [--data DATA] [--every EVERY]"
    with pytest.raises(AssertionError, match="has no option --no-such-flag"):
        check_script_help(cmd, 0, usage)
    with pytest.raises(AssertionError, match="exited 2"):
        check_script_help(cmd, 2, "error: argument --every: invalid int value")


def test_extraction_joins_continuations_and_finds_nested_commands():
    block = ("cd /opt/x && flock -n /tmp/l .venv/bin/ray job submit --working-dir . -- \\\n"
             "    python jobs/score.py --model m --input i --output o >> /var/log/x 2>&1  # nightly\n")
    ((n, line),) = logical_lines(block, 10)
    (cmd,) = commands_in_line(line, f"x:{n}")
    assert n == 10 and cmd.argv[:3] == [".venv/bin/ray", "job", "submit"]
    assert cmd.inner[0].argv == ["python", "jobs/score.py", "--model", "m", "--input", "i", "--output", "o"]
