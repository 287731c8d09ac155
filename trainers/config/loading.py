"""Loading the config: YAML files and dotted ``section.key=value`` overrides into typed sections.

Types are checked against each field's annotation (ints widen to floats; nothing else converts; a bool
is not an int), ranges and choices against its :func:`~trainers.config.sections.opt` metadata; an
unknown key names the closest valid one. Every config that is printed or written comes from
:func:`dump_yaml`, so credentials are redacted there.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trainers.config.run import Config
from trainers.errors import ConfigError
from trainers.redact import redact


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-5`` (no dot) as a string; users type learning rates that way, so it is a float here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to float, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):  # YAML's .inf / .nan: no setting means "infinitely much"
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp is dict and isinstance(value, dict):  # reward.weights: names -> numbers, checked in validate()
        return {str(k): _coerce(f"{key}.{k}", v, float) for k, v in value.items()}
    if origin is dict and isinstance(value, dict):  # cluster.role_resources: role -> {resource: amount}
        inner = typing.get_args(tp)[1]
        return {str(k): _coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
    bounds = (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    )
    for name, ok, sym in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"config key '{key}': {value!r} is out of range (must be {sym} {bound})")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{dotted}'" + _suggest(dotted, [f"{name}.{k}" for k in fields])
            )
        value = _coerce(dotted, value, hints[key])
        _check_range(dotted, value, fields[key].metadata)
        kwargs[key] = value
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, _, text = item.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key '{key}' must be section.key (e.g. ppo.kl_coef=0.05)")
    try:
        value = _yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return path, value


def config_from_dict(raw: dict, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a nested dict and ``section.key=value`` overrides."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    sections = _section_types()
    for item in overrides or []:
        (section, key), value = _parse_override(item)
        if section not in sections:
            raise ConfigError(
                f"unknown config key '{section}.{key}'" + _suggest(f"{section}.{key}", _all_keys())
            )
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        raw[section][key] = value
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}'" + _suggest(name, list(sections)))
    built = {name: _build_section(name, cls, raw.get(name)) for name, cls in sections.items()}
    return Config(**built).validate()


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every config-driven command takes: ``--config FILE`` and ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. ppo.kl_coef=0.05"
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML ``path`` (None: defaults only), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{p}' is a directory, expected a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            raw = _yaml_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise ConfigError(f"config file '{p}' cannot be read: {reason}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(
                f"config file '{p}{where}' is not valid YAML: {getattr(err, 'problem', err)}"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _section_types().items() for f in dataclasses.fields(cls)]


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the resolved config (for YAML output and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, with_docs: bool = False) -> str:
    """The resolved config as YAML, optionally with each field's documentation as a comment.

    Every config that is printed or written (``config show``, each run's ``config.yaml``) comes from
    here, so credentials are redacted here (:func:`trainers.redact.redact`).
    """
    values = redact(to_dict(cfg))
    if not with_docs:
        return yaml.safe_dump(values, sort_keys=False)
    lines = []
    for name, cls in _section_types().items():
        lines.append(f"{name}:  # {cls.__doc__.strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump(values[name][f.name], default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f.name}: {value}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines) + "\n"


def tokenizer_dir(cfg: Config) -> Path:
    """Where the tokenizer lives: ``model.tokenizer``, else ``model.path`` (if it holds one), else
    ``data.dir/tokenizer``."""
    if cfg.model.tokenizer:
        return Path(cfg.model.tokenizer)
    if cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").is_file():
        return Path(cfg.model.path)
    if cfg.data.dir:
        return Path(cfg.data.dir) / "tokenizer"
    raise ConfigError("no tokenizer: set model.tokenizer, or a model.path / data.dir that holds one")
