"""Loading (TOML files, ``base =`` inheritance, dotted overrides, the path rule) and writing (the resolved config
saved with a run) of the experiment config; ``describe`` lists every key."""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from typing import Any, Dict, List, Optional

from evaclip.config.schema import Derived, ExperimentConfig
from evaclip.files import (ConfigError, atomic_write, deep_merge, find, from_dict, range_text, read_toml,
                           resolve_paths)



def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _read_experiment(path: str, _seen=()) -> Dict[str, Any]:
    """Raw experiment data with its paths resolved against its own folder, ``base`` chain merged."""
    data = read_toml(path)
    base = data.pop("base", None)
    data = resolve_paths(ExperimentConfig, data, os.path.dirname(os.path.abspath(path)))
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a string, got {base!r}")
        base_path = find("experiment", base, os.path.dirname(os.path.abspath(path)))
        if base_path in _seen:
            raise ConfigError(f"{path}: circular 'base' chain through {base_path}")
        data = deep_merge(_read_experiment(base_path, _seen + (base_path,)), data)
    return data


def parse_override(text: str) -> tuple:
    """``a.b.c=value`` -> (['a','b','c'], value); value parsed as TOML (numbers, booleans, lists), else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: model.name=EVA02-B-16
    return key.split("."), value


def _field_type(cls, path: List[str]):
    """Declared type of a dotted key, or None when the path is not a config field."""
    for name in path:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = _hints(cls)
        if name not in hints:
            return None
        cls = hints[name]
    return cls


def _set_path(data: Dict, path: List[str], value: Any) -> None:
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
    node[path[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> ExperimentConfig:
    """Load an experiment (a built-in name or a file; or the defaults) and apply CLI overrides, strictly.
    Relative paths in a file resolve against its folder, those in overrides against the current directory."""
    if path:
        path = find("experiment", path)
    data = _read_experiment(path) if path else {}
    overridden = []
    for o in overrides or []:
        keys, value = parse_override(o)
        overridden.append(".".join(keys))
        if _field_type(ExperimentConfig, keys) is str and not isinstance(value, str):
            value = o.split("=", 1)[1].strip()  # run.name=nan, model.name=1e3: strings stay strings
        one: Dict[str, Any] = {}
        _set_path(one, keys, value)
        data = deep_merge(data, resolve_paths(ExperimentConfig, one, os.getcwd()))
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as e:
        key = re.split(r"[\[: ]", str(e), maxsplit=1)[0]
        where = "the command line" if key in overridden else path  # the value's source, not always the file
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def to_dict(obj) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: Dict[str, Any], _prefix: str = "") -> str:
    """A small TOML writer for nested dicts of scalars and lists (what configs hold)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    chunks = ["\n".join(scalars)] if scalars else []
    for k, v in data.items():
        if isinstance(v, dict):
            sub = dumps_toml(v, f"{_prefix}{k}.")
            chunks.append(f"[{_prefix}{k}]" + ("\n" + sub if sub else ""))
    return "\n\n".join(chunks)


def save_run_config(run_dir: str, cfg: ExperimentConfig, derived: Derived, extra: Optional[Dict] = None) -> str:
    """Write ``config.resolved.toml``: the full config plus a [derived] table (and e.g. the git sha)."""
    os.makedirs(run_dir, exist_ok=True)
    data = to_dict(cfg)
    data["derived"] = dict(dataclasses.asdict(derived), **(extra or {}))
    path = os.path.join(run_dir, "config.resolved.toml")
    with atomic_write(path) as f:
        f.write("# written by evaclip: the config this run used, with values derived at launch\n")
        f.write(dumps_toml(data) + "\n")
    return path


def load_run_config(run_dir: str) -> tuple:
    """Read a run's ``config.resolved.toml`` back: (ExperimentConfig, derived dict)."""
    path = os.path.join(run_dir, "config.resolved.toml")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    derived = data.pop("derived", {})
    return from_dict(ExperimentConfig, data), derived


def describe(cls=ExperimentConfig, prefix: str = "") -> List[str]:
    """Every key with its type, default and help: the text of ``--help-config``."""
    out = []
    hints = _hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(f"[{prefix}{f.name}]")
            out += describe(tp, f"{prefix}{f.name}.")
        else:
            tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            default = getattr(inst, f.name)
            rng = range_text(f.metadata.get("bounds", {}))
            out.append(f"  {prefix}{f.name} ({tname}, default {default!r}{'; ' + rng if rng else ''}): "
                       f"{f.metadata.get('help', '')}")
    return out
