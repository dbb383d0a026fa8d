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
import signal
import subprocess
import tarfile
from typing import Dict, Iterator, List, Tuple

from evaclip.files import sampled_digest

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


_GOPEN_SCHEMES = ("http://", "https://", "file://")


def _die_with_parent() -> None:  # in the child, before exec (Linux): SIGKILL when its reader dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class PipeStream:
    """``pipe:cmd``: the shell command's stdout. The command dies with the process reading it (a stopped run's
    ``curl`` / ``aws s3 cp`` / a blocked read are not left behind: a killed DataLoader worker took none of them
    with it), and a command that fails is an error (OSError) where its output ends."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        # a plain command runs without a shell, so that it is the child the death signal is set on (a shell may
        # fork it instead of exec'ing it); a pipeline needs the shell (its own children may then outlive it)
        plain = not any(c in cmd for c in "|&;<>()$`*?[]{}~\n")
        self.proc = subprocess.Popen(shlex.split(cmd) if plain else cmd, shell=not plain, stdout=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and n != 0 and self.proc.wait() != 0:
            raise OSError(f"pipe command failed with exit code {self.proc.returncode}: {self.cmd}")
        return data

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def shard_identity(url: str) -> str:
    """``<bytes>:<sampled content digest>`` of a local shard ("" for a remote one): recorded with what is derived
    from a shard (score tables), so that a shard replaced since is not taken for the one scored."""
    if not is_local(url) or not os.path.exists(url):
        return ""

    return f"{os.path.getsize(url)}:{sampled_digest(url)}"


def open_stream(url: str):
    """Binary stream for a local path, ``pipe:cmd``, http(s) (webdataset's gopen), or any other URL scheme
    fsspec knows (``s3://``, ``gs://``, ``hf://`` ... with the matching fsspec backend installed)."""
    if is_local(url):
        return open(url, "rb")
    if url.startswith("pipe:"):
        return PipeStream(url[len("pipe:"):])
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
        for name, data in tar_members(stream):
            m = _KEY_RE.match(name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if current and current["__key__"] != key:
                yield current
                current = {}
            if not current:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
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


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic: read through tarfile
_REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files


def tar_members(stream) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of every regular file of an uncompressed tar stream, in order: ustar, pax (``x`` records:
    path, size) and GNU long names (``L``). Python's tarfile spends ~10x the time of this loop on each header
    (about a tenth of the input pipeline at 224 px); compressed tars go through tarfile. A damaged header, a
    stream ending inside a member, or one ending without the end-of-archive marker raises ValueError, where
    tarfile would stop early without saying so."""
    head = _read_exact(stream, _BLOCK)
    if head.startswith(_COMPRESSED):
        yield from tarfile_members(_Replay(head, stream))
        return
    offset, pax, long_name = 0, {}, None
    while True:
        if not head:  # tar writers end with zero blocks: a stream that stops at a member boundary was cut
            raise ValueError(f"the tar ends at byte {offset} without its end-of-archive marker (truncated)")
        if len(head) < _BLOCK:
            raise ValueError(f"truncated tar header at byte {offset}")
        if head == _ZERO_BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(head):
            raise ValueError(f"damaged tar header at byte {offset} (checksum)")
        kind = head[156:157]
        size = int(pax["size"]) if "size" in pax else _header_size(head, offset)
        data = _read_exact(stream, size)
        pad = -size % _BLOCK
        if len(data) < size or len(_read_exact(stream, pad)) < pad:
            raise ValueError(f"unexpected end of data in the member at byte {offset}")
        offset += _BLOCK + size + pad
        if kind == b"x":  # pax extended header: applies to the next member only
            pax = _pax_records(data, offset)
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (b"g", b"K"):  # pax global header, GNU long link name: nothing a sample needs
            pass
        else:
            if kind in _REGULAR:
                yield pax.get("path") or long_name or _header_name(head), data
            pax, long_name = {}, None
        head = _read_exact(stream, _BLOCK)


def tarfile_members(stream) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of every regular file through Python's tarfile in stream mode (any compression)."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                yield member.name, f.read() if f is not None else b""


def _read_exact(stream, n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the stream (pipes and network streams may return short reads)."""
    data = stream.read(n) if n else b""
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _checksum_ok(head: bytes) -> bool:
    """The header's stored checksum matches its bytes (the field itself counted as 8 spaces); like tarfile, the
    signed-byte sum some old tar writers store is accepted too."""
    try:
        stored = int(head[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return False
    if sum(head) - sum(head[148:156]) + 8 * 32 == stored:
        return True
    return sum(b - 256 if b > 127 else b for b in head[:148] + head[156:]) + 8 * 32 == stored


def _header_size(head: bytes, offset: int) -> int:
    field = head[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ValueError(f"damaged tar header at byte {offset} (size)") from None


def _header_name(head: bytes) -> str:
    name = head[:100].split(b"\0", 1)[0]
    if head[257:265] == b"ustar\x0000":  # POSIX ustar: a long path is split into prefix / name
        prefix = head[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> Dict[str, str]:
    """``"%d %s=%s\\n"`` records (the length counts the whole record)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ValueError(f"damaged pax header before byte {offset}") from None
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Replay:
    """A read-only stream that first returns ``head`` (bytes already read), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + _read_exact(self.stream, n - len(out))


def count_tar_samples(url: str) -> int:
    """Number of samples (distinct consecutive keys) in a shard, reading only tar headers for local files."""
    n, last = 0, None
    with tarfile.open(url, mode="r:*") if is_local(url) else tarfile.open(fileobj=open_stream(url), mode="r|*") as tar:
        for member in tar:
            m = _KEY_RE.match(member.name) if member.isfile() else None
            if m and m.group(1) != last:
                n, last = n + 1, m.group(1)
    return n
