"""What a per-input-shard curation (``data reinforce``, ``data capfilt``) publishes once every part is written:
the manifest and the recipe (``publish_parts``)."""
from __future__ import annotations

import os
from typing import Dict, Optional

from evaclip.data.recipes import shard_pattern, write_recipe
from evaclip.data.shard_writer import PART_DIGITS, shard_path
from evaclip.data.tools import manifest


def publish_parts(out: str, sources, weights: Dict[str, float], settings: str, description: str,
                  command: str) -> Optional[str]:
    """manifest.parquet, then recipe.toml (whose presence says the output is whole), once every shard of every
    source (``[(name, input urls)]``) is written under ``shard_path`` (the last part to finish writes them); None
    while some are missing. ``weights``: the input recipe's source weights, kept."""

    written = [(name, [shard_path(out, name, k) for k in range(len(urls))]) for name, urls in sources]
    if not all(os.path.exists(p) and os.path.exists(p[:-len(".tar")] + "_stats.json") for _, ps in written for p in ps):
        return None
    counts = manifest(written, out=os.path.join(out, "manifest.parquet"))["samples"]
    sources = [{"name": name, "shards": shard_pattern(name, len(paths), width=PART_DIGITS),
                "samples": counts.get(name, 0), **({"weight": weights[name]} if name in weights else {})}
               for name, paths in written]
    return write_recipe(os.path.join(out, "recipe.toml"), os.path.basename(os.path.abspath(out)), description, sources,
                        comment=f"Written by `evaclip data {command}` (settings: {settings}); train on it with "
                                "data.recipe=<this file>")
