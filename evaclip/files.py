"""Reading evaclip's declarative files: TOML into typed dataclasses, built-in assets by name, one path rule; and
writing any file or folder all-or-nothing (``atomic_write``, ``replace_dir``).

Every kind of file (experiments, model files, data recipes, eval suites, the dataset registry) is read by
``load_typed(cls, path)``: strict (an unknown key, a wrong type or a bad value is a ``ConfigError`` whose
one-line message names the file and the dotted key), with the same path rule everywhere:

* a **bare name** (no ``/``, no file suffix) names a built-in asset shipped inside the package:
  ``demo_cpu`` is ``launch/experiments/demo_cpu.toml``, ``EVA02-B-16`` is ``launch/models/EVA02-B-16.toml``,
  ``merged2b`` is ``data_recipes/merged2b.toml``, ``quick`` is ``eval/suites/quick.toml``, ``zero2`` is
  ``launch/deepspeed/zero2.json``;
* a **relative path written in a file** resolves against the folder of that file (``base``, recipes, suites,
  model files, inits, dataset roots, shard patterns, overlays, class-name files);
* a **relative path given on the command line** resolves against the current directory;
* values with a scheme (``pipe:``, ``s3://``, ``https://``) and values that start with the ``{root}``
  placeholder are left as they are; outputs (``run.output_dir``, ``--out``) are relative to the current
  directory.

A dataclass field opts into the rule with ``metadata={"path": KIND}``: ``KIND`` is an asset kind of
``ASSETS`` (names allowed) or ``"file"`` (always a path). ``metadata={"keywords": (...)}`` lists words that
are neither (``checkpoint.resume = "auto"``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import os
import re
import shutil
import tempfile
import typing
from typing import IO, Any, Dict, Iterator, List, Optional

import tomllib

from evaclip.errors import (
    ConfigError,  # re-exported: the error every loader raises
    UserError,
)

# asset kind -> (folder inside the package's assets, file suffix)
ASSETS = {
    "experiment": ("launch/experiments", ".toml"),
    "model": ("launch/models", ".toml"),
    "recipe": ("data_recipes", ".toml"),
    "suite": ("eval/suites", ".toml"),
    "overlay": ("launch/deepspeed", ".json"),
}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+._-]+:")  # pipe:, s3://, https://, local-dir:, open_clip: (not C:\ drives)


@functools.lru_cache(maxsize=None)
def asset_root() -> str:
    """The folder of packaged assets (``eval/``, ``data_recipes/``, ``launch/`` as they are in the repository)."""
    from importlib.resources import files

    root = str(files("evaclip").joinpath("assets"))
    if not os.path.isdir(os.path.join(root, "eval")):
        raise RuntimeError(f"evaclip's packaged assets are missing ({root}); reinstall the package")
    return root


def asset_file(rel: str) -> str:
    """A packaged file by its repository-relative path, e.g. ``eval/datasets.toml``."""
    return os.path.join(asset_root(), rel)


def builtin_names(kind: str) -> List[str]:
    folder, suffix = ASSETS[kind]
    d = asset_file(folder)
    return sorted(f[:-len(suffix)] for f in os.listdir(d) if f.endswith(suffix))


def is_name(value: str) -> bool:
    """A bare asset name: no path separator, no file suffix, not a dot-path."""
    return bool(value) and "/" not in value and os.sep not in value and not value.startswith(".") and \
        os.path.splitext(value)[1].lower() not in (".toml", ".json")


def _left_alone(value: str) -> bool:
    return not value or os.path.isabs(value) or bool(_SCHEME.match(value)) or value.startswith("{root}")


def resolve_value(value: str, kind: str, base_dir: str) -> str:
    """One value under the path rule: names stay names, relative paths join ``base_dir``."""
    if _left_alone(value) or (kind in ASSETS and is_name(value)):
        return value
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def find(kind: str, value: str, base_dir: Optional[str] = None, extra_dirs: tuple = ()) -> str:
    """The existing file a name or path stands for (``extra_dirs``: user folders searched before the built-ins)."""
    folder, suffix = ASSETS[kind]
    if is_name(value):
        for d in tuple(extra_dirs) + (asset_file(folder),):
            if d and os.path.exists(os.path.join(d, value + suffix)):
                return os.path.join(d, value + suffix)
        raise ConfigError(f"no built-in {kind} named {value!r}; built-in: {', '.join(builtin_names(kind))} "
                          f"(or give a path to a {suffix} file)")
    path = resolve_value(value, kind, base_dir or os.getcwd())
    if not os.path.exists(path):
        raise ConfigError(f"{kind} file not found: {path} (relative paths in a file resolve against that file's "
                          "folder, on the command line against the current directory)")
    return path


# ---------------------------------------------------------------------------------------------------- TOML
def read_toml(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def deep_merge(base: Dict, over: Dict) -> Dict:
    """``over`` on top of ``base``, tables merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_paths(cls, data: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    """A copy of raw ``data`` for dataclass ``cls`` with its path fields resolved against ``base_dir``."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for k, v in data.items():
        if k not in fields:
            continue  # from_dict reports it
        tp, kind = hints[k], fields[k].metadata.get("path")
        if dataclasses.is_dataclass(tp):
            out[k] = resolve_paths(tp, v, base_dir)
        elif typing.get_origin(tp) in (list, List) and dataclasses.is_dataclass(typing.get_args(tp)[0]) \
                and isinstance(v, list):
            out[k] = [resolve_paths(typing.get_args(tp)[0], x, base_dir) for x in v]
        elif kind and isinstance(v, str) and v not in fields[k].metadata.get("keywords", ()):
            out[k] = resolve_value(v, kind, base_dir)
    return out


def _check_value(key: str, value: Any, tp: Any, f: Optional[dataclasses.Field]) -> Any:
    """Validate (and lightly coerce: int -> float; a field's documented ``aliases``, such as an old boolean
    form, to its value) one value against its declared type and choices."""
    aliases = f.metadata.get("aliases", ()) if f is not None else ()
    for old, new in aliases:
        if type(value) is type(old) and value == old:
            value = new
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_value(key, value, args[0], f)
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {inner.__name__}, got {value!r}")
        if dataclasses.is_dataclass(inner):  # arrays of tables ([[source]] in recipes)
            return [from_dict(inner, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_check_bounds(f"{key}[{i}]", _check_value(f"{key}[{i}]", v, inner, None), f)
                for i, v in enumerate(value)]
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # a NaN compares false with every bound: it would turn a guard off
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    choices = f.metadata.get("choices") if f is not None else None
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return _check_bounds(key, value, f)


def _check_bounds(key: str, value: Any, f: Optional[dataclasses.Field]) -> Any:
    """The field's range (metadata ``bounds``: gt / ge / lt / le, and an ``unset`` sentinel that is also allowed)."""
    bounds = f.metadata.get("bounds") if f is not None else None
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    if "unset" in bounds and value == bounds["unset"]:
        return value
    if out_of_range(value, bounds):
        also = f" (or {bounds['unset']}: unset)" if "unset" in bounds else ""
        raise ConfigError(f"{key} must be {range_text(bounds)}{also}, got {value!r}")
    return value


_RANGE_OPS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


def range_text(bounds: Dict[str, Any]) -> str:
    """A range (``bounds``: gt / ge / lt / le; other keys ignored) as a person reads it: ``>= 1 and < 5``."""
    return " and ".join(f"{sym} {bounds[k]}" for k, (sym, _) in _RANGE_OPS.items() if bounds.get(k) is not None)


def out_of_range(value: float, bounds: Dict[str, Any]) -> bool:
    """Whether ``value`` breaks any of ``bounds`` (gt / ge / lt / le; None or absent: no bound)."""
    return any(bounds.get(k) is not None and not ok(value, bounds[k]) for k, (_, ok) in _RANGE_OPS.items())


def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a raw dict, strictly (unknown keys, types and choices checked)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown key '{prefix}{k}'; valid keys in [{prefix.rstrip('.') or 'top level'}]: "
                              f"{', '.join(fields)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _check_value(f"{prefix}{k}", v, tp, fields[k])
    return cls(**kwargs)


def load_typed(cls, path: str, data: Optional[Dict[str, Any]] = None):
    """A typed file: read (unless ``data`` is given), resolve its paths against its folder, build ``cls``.
    Errors are prefixed with the file's path."""
    data = read_toml(path) if data is None else data
    try:
        return from_dict(cls, resolve_paths(cls, data, os.path.dirname(os.path.abspath(path))))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------- atomic writes
def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable: a crash right after ``os.replace`` may otherwise lose it (POSIX)."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Write ``path`` all or nothing: the caller writes a temporary file in the same folder (a rename is atomic
    only within one file system), which is fsynced and renamed over ``path``, and the folder is fsynced. A reader
    (another rank, another run) sees the old file or the new one, never half of one; on an error the temporary
    file is removed and ``path`` is left as it was. Temporary names are ``.<name>.<random>.tmp`` (hidden, unique
    per writer, so two processes never share one)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def replace_file(tmp: str, path: str) -> None:
    """Publish a temporary file that a streaming writer has finished and closed (``atomic_write`` for writers
    that own their file across calls): fsync it, rename it over ``path``, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_dir(tmp: str, final: str) -> None:
    """Publish a folder written under a temporary name: the old ``final`` (if any) removed, ``tmp`` renamed to
    it, the parent fsynced. The files inside are the writer's to flush (DeepSpeed, safetensors close theirs)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def exclusive(lock: str, what: str) -> Iterator[None]:
    """One writer at a time: ``lock`` is created exclusively (holding this host and pid) and removed at the end. A
    second writer gets a UserError naming ``what`` and the holder; a lock whose process is gone (same host) is
    taken over."""
    import socket

    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                host, pid = open(lock).read().split()
            except (OSError, ValueError):
                host, pid = "", "0"
            if host == socket.gethostname() and not _alive(int(pid)):
                os.remove(lock)  # its writer was killed
                continue
            raise UserError(f"{what} is being written by another process ({host or '?'} pid {pid}; lock {lock}); "
                            "wait for it, or delete the lock if that process is gone") from None
    else:
        raise UserError(f"{what}: could not take the lock {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def sampled_digest(path: str, chunk: int = 1 << 20) -> str:
    """A cheap content identity of a (large) weights file: sha1 of its size, first and last MiB. Another file, or
    this one rewritten, gives another digest without reading gigabytes."""
    import hashlib

    size = os.path.getsize(path)
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(0, size - chunk))
        h.update(f.read(chunk))
    return h.hexdigest()[:16]
