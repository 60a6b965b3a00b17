"""One declaration per setting: config dataclasses that carry their own help, CLI and YAML form.

A stage's settings are a frozen, keyword-only dataclass that derives from :class:`Config` and
declares each field once with :func:`setting` (default and help text together). From that one
declaration come:

- ``to_dict`` / ``from_dict`` (nested configs as mappings; an unknown key is an error that names
  it and lists the known ones), ``to_yaml``, and :func:`parse_yaml` for a ``--config`` file's text
  (reading one from local disk or ``s3://`` is ``_config_io``'s: this module knows no storage);
- the job's command line (:func:`add_config_args`): one option per field, nested configs as
  ``--augment.rotate``, the help showing the field's own default;
- the generated reference in ``docs/configuration.md``.

Validation stays in each class's ``__post_init__``, as in Ray's config dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from ._errors import ConfigError

_MISSING = dataclasses.MISSING

# The effective settings a stage writes beside its output (``--config`` takes it back).
CONFIG_FILE = "config.yaml"


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Any = _MISSING,
    aliases: tuple[str, ...] = (),
    env: str | None = None,
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A config field with its help text (the one place a setting is described).

    ``aliases``: extra command-line spellings (kept for options renamed since); ``env``: an
    environment variable that supplies the default on the command line; ``cli=False`` keeps a
    field out of the command line (it is still read from ``--config`` YAML).
    """
    meta = {"help": help, "aliases": tuple(aliases), "env": env, "cli": cli, "metavar": metavar}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def config_fields(cls: Any) -> tuple[dataclasses.Field[Any], ...]:
    """A config class's (or instance's) fields in the order its options, ``config.yaml`` and docs
    list them: the class's own first, then those it takes from a base (:class:`InputSettings`'s
    shared input settings), so a stage's help starts with its own ``--input`` and ``--output``."""
    fields = dataclasses.fields(cls)
    tp = cls if isinstance(cls, type) else type(cls)
    inherited = {name for base in tp.__mro__[1:] for name in getattr(base, "__dataclass_fields__", {})}
    return tuple(f for f in fields if f.name not in inherited) + tuple(f for f in fields if f.name in inherited)


class Config:
    """Base of every stage's settings (a frozen keyword-only dataclass).

    Subclasses may set ``SMOKE`` to a mapping of overrides for ``--smoke-test``.
    """

    SMOKE: typing.ClassVar[Mapping[str, Any]] = {}

    # --- dict / YAML ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in config_fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, where: str = "") -> Any:
        """Build from a mapping; nested configs may be mappings; missing keys take defaults."""
        if d is None:
            d = {}
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping of settings, found {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(known))
        if unknown:
            label = f"{where}." if where else ""
            raise ConfigError(
                f"unknown {cls.__name__} setting{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(label + k for k in unknown)}: known settings are {', '.join(sorted(known))}"
            )
        missing = [
            f.name
            for f in config_fields(cls)
            if f.name not in d and f.default is _MISSING and f.default_factory is _MISSING
        ]
        if missing:
            names = ", ".join(f"{where}.{m}" if where else "--" + m.replace("_", "-") for m in missing)
            raise ConfigError(
                f"{names} {'is' if len(missing) == 1 else 'are'} required (an option, or "
                f"{missing[0]}: in the --config file)"
            )
        hints = _hints(cls)
        kwargs = {}
        for k, v in d.items():
            kwargs[k] = _coerce(v, hints[k], where=f"{where}.{k}" if where else k)
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {e}") from e

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save_yaml(self, loc: Any) -> None:
        """Write the effective config (``config.yaml``) to a :class:`Location`, whole or not at
        all (a full disk leaves the previous file, not an empty one)."""
        loc.write_atomic(self.to_yaml().encode())

    @classmethod
    def smoke_test(cls, **changes: Any) -> Any:
        """The class's smoke-test preset with ``changes`` on top (nested configs merge)."""
        return cls.from_dict(cls.merge(_plain(dict(cls.SMOKE)), _plain(changes)))

    @classmethod
    def merge(cls, base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
        """Settings ``over`` on top of ``base``: a nested config (``augment``) merges key by key;
        any other value, a mapping setting such as the search's ``space`` too, is replaced whole."""
        hints = _hints(cls)
        out = dict(base)
        for k, v in over.items():
            tp = _strip_optional(hints[k]) if k in hints else None
            nested = isinstance(tp, type) and issubclass(tp, Config)
            if nested and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                assert tp is not None  # nested implies a Config type
                out[k] = tp.merge(out[k], v)
            else:
                out[k] = v
        return out


# A --config file is a few dozen settings: these bounds are 100x what any real one needs, and
# stop a "billion laughs" (a 455-byte YAML whose nested aliases stand for 387 million strings:
# minutes and gigabytes, with the output's lease held) before anything is built from it.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values and collections, every alias counted as what it stands for
MAX_YAML_DEPTH = 64


def parse_yaml(data: bytes, uri: str) -> dict[str, Any]:
    """The YAML mapping in ``data`` (read from ``uri``, named in errors), bounded before it is
    loaded (:func:`check_yaml_size`)."""
    import yaml

    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{uri} holds {len(data):,} bytes, more than a --config file's {MAX_YAML_BYTES:,}: give a "
            "file of setting: value lines"
        )
    try:
        check_yaml_size(data, uri)
        d = yaml.safe_load(data) or {}
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"{uri} is not valid YAML: {first}. Fix the file (a mapping of setting: value)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{uri}: expected a mapping of setting: value, found {type(d).__name__}")
    return d


def check_yaml_size(data: bytes | str, uri: str) -> None:
    """Refuse a YAML document that stands for more than :data:`MAX_YAML_NODES` values (aliases
    counted as what they expand to) or nests deeper than :data:`MAX_YAML_DEPTH`, from its parse
    events alone: one pass, linear in the file's size, nothing built. PyYAML's ``safe_load``
    shares an alias's object (cheap to load), but every reader after it (merging, checking,
    writing the effective config) walks the expansion."""
    import yaml

    sizes: dict[str, int] = {}
    stack: list[list[Any]] = [[None, 0]]  # per open collection: its anchor, its expanded size so far
    total = 0
    for ev in yaml.parse(data, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.AliasEvent):
            n = sizes.get(ev.anchor, 1)
        elif isinstance(ev, yaml.ScalarEvent):
            n = 1
            if ev.anchor:
                sizes[ev.anchor] = 1
        elif isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            stack.append([ev.anchor, 1])
            total += 1
            if len(stack) - 1 > MAX_YAML_DEPTH:
                raise ConfigError(
                    f"{uri} nests more than {MAX_YAML_DEPTH} levels deep: a --config file is a mapping "
                    "of setting: value (nested settings a level or two down)"
                )
            continue
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, n = stack.pop()
            if anchor:
                sizes[anchor] = n
            stack[-1][1] += n
            continue
        else:
            continue
        stack[-1][1] += n
        total += n
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{uri} stands for more than {MAX_YAML_NODES:,} values once its aliases (*name) are "
                "expanded (nested aliases: a 'billion laughs'): refused unread; write the settings out"
            )


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# --- command line ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CliOption:
    """One generated command-line option: the dotted config key it sets and how it parses."""

    key: str  # "augment.rotate"
    flags: tuple[str, ...]  # ("--augment.rotate",)
    help: str
    default: Any
    kind: str  # "bool", "int", "float", "str", "list", "mapping", "choice"
    choices: tuple[Any, ...] = ()
    env: str | None = None


def cli_options(cls: type, prefix: str = "") -> list[CliOption]:
    """The options a config class contributes to its job's command line, nested ones flattened."""
    out: list[CliOption] = []
    hints = _hints(cls)
    for f in config_fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp = _strip_optional(hints[f.name])
        key = f"{prefix}{f.name}"
        if isinstance(tp, type) and issubclass(tp, Config):
            out.extend(cli_options(tp, prefix=key + "."))
            continue
        flag = "--" + key.replace("_", "-")
        flags = (flag, *meta.get("aliases", ()))
        default = _field_default(f)
        kind, choices = _kind(tp)
        out.append(
            CliOption(
                key=key,
                flags=flags,
                help=meta.get("help", ""),
                default=_plain(default),
                kind=kind,
                choices=choices,
                env=meta.get("env"),
            )
        )
    return out


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None) -> None:
    """Add one option per field of ``cls`` (nested configs flattened as ``--outer.inner``).

    Only options given on the command line land in the namespace (``argparse.SUPPRESS``), under
    their dotted key, so they override ``--config`` YAML and nothing else.
    """
    group = parser.add_argument_group(title or f"{cls.__name__} settings")
    for opt in cli_options(cls):
        shown = _show_default(opt)
        help_text = f"{opt.help} (default: {shown})" if opt.help else f"default: {shown}"
        kw: dict[str, Any] = {"dest": opt.key, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if opt.env and os.environ.get(opt.env):
            kw["default"] = _parse_value(opt, os.environ[opt.env])
        if opt.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = functools.partial(_parse_value, opt)
            kw["metavar"] = "{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else opt.kind.upper()
        group.add_argument(*opt.flags, **kw)


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings given on the command line, as a nested mapping ready for ``from_dict``."""
    keys = {o.key for o in cli_options(cls)}
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k not in keys:
            continue
        node = out
        *outer, last = k.split(".")
        for part in outer:
            node = node.setdefault(part, {})
        node[last] = v
    return out


def _parse_value(opt: CliOption, text: str) -> Any:
    if opt.kind in ("int", "float"):
        try:
            return int(text) if opt.kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {opt.kind} value: {text!r}") from None
    try:
        if opt.kind == "list":
            return [p.strip() for p in text.split(",") if p.strip()]
        if opt.kind == "mapping":
            import yaml

            try:
                v = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"not valid YAML ({e.__class__.__name__})") from None
            if not isinstance(v, dict):
                raise ValueError("give a YAML mapping, e.g. '{key: value}'")
            return v
        if opt.kind == "choice":
            for c in opt.choices:
                if str(c) == text:
                    return c
            raise ValueError(f"use one of {', '.join(map(str, opt.choices))}")
        return text
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} for {opt.flags[0]}: {e}") from None


def _show_default(opt: CliOption) -> str:
    d = opt.default
    if opt.env:
        return f"${opt.env} or {d}" if d is not None else f"${opt.env}, else none"
    if d is None:
        return "none"
    if isinstance(d, list):
        return ",".join(map(str, d)) if d else "none"
    if isinstance(d, dict):
        return "{}" if not d else ", ".join(f"{k}={v}" for k, v in d.items())
    return str(d)


# --- typing helpers -------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _kind(tp: Any) -> tuple[str, tuple[Any, ...]]:
    if get_origin(tp) is Literal:
        return "choice", tuple(get_args(tp))
    if tp is bool:
        return "bool", ()
    if tp is int:
        return "int", ()
    if tp is float:
        return "float", ()
    if tp is str:
        return "str", ()
    origin = get_origin(tp)
    if origin in (tuple, list):
        return "list", ()
    if origin in (dict, Mapping) or tp is dict:
        return "mapping", ()
    return "str", ()


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _coerce(v: Any, tp: Any, *, where: str) -> Any:
    """YAML/CLI values -> the field's type: nested configs from mappings, tuples from lists.
    A value of the wrong shape (a list inside a list of names, a number for a name) is a
    ConfigError naming its key, before the config class sees it."""
    inner = _strip_optional(tp)
    if v is None:
        return None
    if isinstance(inner, type) and issubclass(inner, Config):
        return inner.from_dict(v, where=where)
    _check_type(v, inner, where)
    if get_origin(inner) is tuple and isinstance(v, (list, tuple)):
        return tuple(v)
    if get_origin(inner) is tuple and isinstance(v, str):  # one string, as on the command line: comma-separated
        return tuple(p.strip() for p in v.split(",") if p.strip())
    if inner is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, Mapping):  # a copy: a config shares no mutable mapping with its source (a preset)
        return _plain(v)
    return v


_SCALARS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}


def _shown(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_type(v: Any, tp: Any, where: str) -> None:
    """Whether ``v`` fits the field type ``tp`` (the kinds config fields use: str, int, float,
    bool, Literal, tuple[X, ...], dict); other types are left to the class's own checks."""
    if tp in _SCALARS:
        ok = (
            isinstance(v, str)
            if tp is str
            else isinstance(v, bool)
            if tp is bool
            else isinstance(v, int) and not isinstance(v, bool)
            if tp is int
            else isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if not ok:
            raise ConfigError(f"{where}: expected {_SCALARS[tp]}, found {_shown(v)}: fix the value of {where}")
        return
    origin = get_origin(tp)
    if origin is Literal:
        if isinstance(v, (list, tuple, Mapping)) or v not in get_args(tp):
            raise ConfigError(f"{where}: found {_shown(v)}: use one of {', '.join(map(str, get_args(tp)))}")
        return
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if isinstance(v, str):
            return
        if not isinstance(v, (list, tuple)):
            raise ConfigError(
                f"{where}: expected a list, found {_shown(v)}: write it as [a, b] (or a, b on the command line)"
            )
        if len(args) == 1:
            for i, x in enumerate(v):
                _check_type(x, args[0], f"{where}[{i}]")
        return
    if (origin in (dict, Mapping) or tp is dict) and not isinstance(v, Mapping):
        raise ConfigError(f"{where}: expected a mapping (key: value), found {_shown(v)}")


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v
