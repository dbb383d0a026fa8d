"""Curation's outputs: new img2dataset-style shards (``shard_writer``: numbered tars, each published whole with
its ``_stats.json``), the copy of kept samples from an input shard, byte for byte (``copy_kept``), and the
per-input-shard layout of reinforce / capfilt with the recipe and manifest they publish (``publish_parts``)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Callable, Dict, Optional

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
            with atomic_write(name + "_stats.json") as f:
                json.dump({"count": state["n"], "successes": state["n"], "failed_to_download": 0}, f)
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


def shard_path(out: str, source: str, index: int) -> str:
    """Where a per-input-shard writer (reinforce, capfilt) puts the output of ``source``'s shard ``index``."""
    return os.path.join(out, source, f"{index:06d}.tar")


def publish_parts(out: str, sources, weights: Dict[str, float], settings: str, description: str,
                  command: str) -> Optional[str]:
    """manifest.parquet, then recipe.toml (whose presence says the output is whole), once every shard of every
    source (``[(name, input urls)]``) is written under ``shard_path`` (the last part to finish writes them); None
    while some are missing. ``weights``: the input recipe's source weights, kept."""
    from evaclip.data.tools import manifest

    written = [(name, [shard_path(out, name, k) for k in range(len(urls))]) for name, urls in sources]
    if not all(os.path.exists(p) and os.path.exists(p[:-len(".tar")] + "_stats.json") for _, ps in written for p in ps):
        return None
    counts = manifest(written, out=os.path.join(out, "manifest.parquet"))["samples"]
    lines = [f"# Written by `evaclip data {command}` (settings: {settings}); train on it with data.recipe=<this file>",
             f"name = {json.dumps(os.path.basename(os.path.abspath(out)))}", f"description = {json.dumps(description)}",
             ""]
    for name, paths in written:
        pattern = f"{name}/{{{0:06d}..{len(paths) - 1:06d}}}.tar" if len(paths) > 1 else f"{name}/{0:06d}.tar"
        lines += ["[[source]]", f"name = {json.dumps(name)}", f"shards = {json.dumps(pattern)}",
                  f"samples = {counts.get(name, 0)}", *([f"weight = {weights[name]}"] if name in weights else []), ""]
    recipe = os.path.join(out, "recipe.toml")
    with atomic_write(recipe) as f:
        f.write("\n".join(lines))
    return recipe
