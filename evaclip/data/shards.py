"""Shard lists and tar reading: brace patterns, local / ``pipe:`` / URL streams, samples grouped by key.

A sample of an img2dataset shard is the run of consecutive tar members that share a key
(``000000123.jpg``, ``000000123.txt``, ``000000123.json`` -> key ``000000123``). Reading a shard never raises
for bad data: an unopenable or truncated shard ends with a ``ShardError`` after yielding the samples read
so far, so the stream can count it and move on.
"""
from __future__ import annotations

import os
import re
import shlex
import tarfile
from typing import Dict, Iterator, List

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key.ext convention (key = up to first dot)


class ShardError(Exception):
    """A shard could not be opened or read to its end."""


def expand_pattern(pattern: str, root: str = "") -> List[str]:
    """``{root}/laion/{00000..00009}.tar`` -> urls. ``::`` separates several patterns; ``{root}`` is substituted
    first (so it is not brace-expanded); inside a ``pipe:`` command it is shell-quoted."""
    import braceexpand

    if "{root}" in pattern and not root:
        raise ValueError(f"shard pattern {pattern!r} uses {{root}} but no data root is set (data.root)")
    urls: List[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part.startswith("pipe:"):
            # a shell command (by design, as in webdataset): the root is pasted in quoted, never as shell code
            marker = "\0ROOT\0"
            cmds = braceexpand.braceexpand(part.replace("{root}", marker))
            urls.extend(c.replace(marker, shlex.quote(root.rstrip("/"))) for c in cmds)
        elif part:
            part = os.path.expandvars(os.path.expanduser(part.replace("{root}", root.rstrip("/"))))
            urls.extend(braceexpand.braceexpand(part))
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


_GOPEN_SCHEMES = ("pipe:", "http://", "https://", "file://")


def open_stream(url: str):
    """Binary stream for a local path, ``pipe:cmd``, http(s) (webdataset's gopen), or any other URL scheme
    fsspec knows (``s3://``, ``gs://``, ``hf://`` ... with the matching fsspec backend installed)."""
    if is_local(url):
        return open(url, "rb")
    if url.startswith(_GOPEN_SCHEMES):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise ShardError(f"cannot open {url}: install fsspec (and its backend) for this URL scheme") from None
    return fsspec.open(url, "rb").open()


def iter_tar_samples(url: str) -> Iterator[Dict[str, bytes]]:
    """Samples (``{'__key__', '__url__', ext: bytes}``) of one tar shard; raises ShardError at a bad shard."""
    try:
        stream = open_stream(url)
    except Exception as e:  # noqa: BLE001 - any failure to open is a shard error
        raise ShardError(f"cannot open {url}: {e}") from None
    current: Dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                m = _KEY_RE.match(member.name)
                if m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                if not current:
                    current = {"__key__": key, "__url__": url}
                f = tar.extractfile(member)
                current[ext] = f.read() if f is not None else b""
        if current:
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # a truncated/corrupt shard: the partial sample in hand is dropped, the ones before it were yielded
        raise ShardError(f"error reading {url}: {type(e).__name__}: {e}") from None
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass


def count_tar_samples(url: str) -> int:
    """Number of samples (distinct consecutive keys) in a shard, reading only tar headers for local files."""
    n, last = 0, None
    with tarfile.open(url, mode="r:*") if is_local(url) else tarfile.open(fileobj=open_stream(url), mode="r|*") as tar:
        for member in tar:
            m = _KEY_RE.match(member.name) if member.isfile() else None
            if m and m.group(1) != last:
                n, last = n + 1, m.group(1)
    return n
