"""What a per-input-shard curation (``data reinforce``, ``data capfilt``) publishes once every part is written:
the manifest and the recipe (``publish_parts``)."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from evaclip.data.shard_writer import shard_path
from evaclip.data.tools import manifest
from evaclip.files import atomic_write


def publish_parts(out: str, sources, weights: Dict[str, float], settings: str, description: str,
                  command: str) -> Optional[str]:
    """manifest.parquet, then recipe.toml (whose presence says the output is whole), once every shard of every
    source (``[(name, input urls)]``) is written under ``shard_path`` (the last part to finish writes them); None
    while some are missing. ``weights``: the input recipe's source weights, kept."""

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
