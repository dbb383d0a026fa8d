"""The one writer of shards (``evaclip data synth`` and curation): a whole shard at once (``write_shard``), new
img2dataset-style shards (``shard_writer``: numbered tars, each published whole with its ``_stats.json``,
``write_stats``), the copy of kept samples from an input shard, byte for byte (``copy_kept``), and the
per-input-shard layout of reinforce / capfilt (``shard_path``)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Callable, Dict, Iterable, Optional

from evaclip.data.shards import ShardError, iter_tar_samples
from evaclip.errors import UserError
from evaclip.files import atomic_write, replace_file


def shard_writer(out: str, shard_size: int):
    """Write samples (dict of ext -> bytes) into out/00000.tar, 00001.tar, ... with img2dataset's _stats.json."""
    state = {"tar": None, "n": 0, "index": -1, "counts": []}

    def close():
        if state["tar"] is not None:
            state["tar"].close()
            name = os.path.join(out, f"{state['index']:05d}")
            replace_file(name + ".tar.tmp", name + ".tar")
            write_stats(name + ".tar", state["n"])
            state["counts"].append(state["n"])
            state["tar"] = None

    def add(key: str, files: Dict[str, bytes]):
        if state["tar"] is None or state["n"] >= shard_size:
            close()
            state["index"] += 1
            state["n"] = 0
            state["tar"] = tarfile.open(os.path.join(out, f"{state['index']:05d}.tar.tmp"), "w")
        add_sample(state["tar"], key, files)
        state["n"] += 1

    return add, close, state


def write_stats(shard: str, count: int, skipped: Optional[Dict[str, int]] = None) -> None:
    """``<shard>_stats.json`` beside ``shard`` (``.../00000.tar``), img2dataset's record of the samples written
    (and curation's samples skipped, by reason)."""
    stats = {"count": count, "successes": count, "failed_to_download": 0}
    with atomic_write(shard[:-len(".tar")] + "_stats.json") as f:
        json.dump(stats if skipped is None else dict(stats, skipped=dict(skipped)), f)


def write_shard(path: str, samples: Iterable[Dict[str, bytes]]) -> None:
    """A whole shard at once, all or nothing: ``samples`` ({"__key__": key, ext: bytes, ...}) in order."""
    with atomic_write(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for s in samples:
            add_sample(tar, s["__key__"], {e: v for e, v in s.items() if e != "__key__"})


def add_sample(tar: tarfile.TarFile, key: str, files: Dict[str, bytes]) -> None:
    """One sample's members (ext -> bytes) into an open tar, as webdataset reads them (``<key>.<ext>``)."""
    for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))


def copy_kept(url: str, match: Callable[[str], Optional[Dict]], add) -> int:
    """Copy the samples of ``url`` for which ``match(key)`` gives their metadata; returns how many."""
    n = 0
    try:
        for raw in iter_tar_samples(url):
            extra = match(raw["__key__"])
            if extra is None:
                continue
            members = {e: v for e, v in raw.items() if not e.startswith("__")}  # copied byte for byte
            meta = {}
            if "json" in members:
                try:
                    meta = json.loads(members["json"])
                except ValueError:
                    meta = {}
            meta.update({c: v for c, v in extra.items() if v is not None})
            members["json"] = json.dumps(meta).encode()
            add(raw["__key__"], members)
            n += 1
    except ShardError as e:
        raise UserError(f"cannot read {url} to copy its kept samples: {e}") from None
    return n


PART_DIGITS = 6  # a per-input-shard output's number: shard_path's names and the recipe's brace range that lists them


def shard_path(out: str, source: str, index: int) -> str:
    """Where a per-input-shard writer (reinforce, capfilt) puts the output of ``source``'s shard ``index``."""
    return os.path.join(out, source, f"{index:0{PART_DIGITS}d}.tar")
