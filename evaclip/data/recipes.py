"""Data recipes (``data_recipes/*.toml``): named sources with shard patterns, sample counts and weights.

    name = "merged-2b"
    [[source]]
    name = "laion2b"
    shards = "{root}/laion2b-en/{000000..164090}.tar"
    samples = 1_600_000_000          # mixing weight defaults to the share of samples (true weights)
    img2dataset = "img2dataset --url_list ... --output_format webdataset ..."
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from evaclip.files import ConfigError, atomic_write, find, load_typed

UNSET = -1.0  # SourceSpec.weight when the recipe does not set it
_PATH = {"path": "file"}  # relative to the recipe file (evaclip.files); {root} patterns and URLs as they are


@dataclass
class SourceSpec:
    name: str = ""
    shards: str = field(default="", metadata=_PATH)  # brace pattern; {root} is replaced by data.root
    samples: int = field(default=0, metadata={"bounds": {"ge": 0}})  # total samples (from img2dataset stats or `evaclip data stats`)
    weight: float = -1.0  # sampling weight (> 0); omitted everywhere: proportional to samples
    manifest: str = field(default="", metadata=_PATH)  # optional parquet manifest written by `evaclip data stats`
    licence: str = ""
    img2dataset: str = ""  # the command that produces the shards
    notes: str = ""


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    licence: str = ""
    source: List[SourceSpec] = field(default_factory=list)

    def weights(self) -> List[float]:
        """Normalised per-source sampling weights: explicit ones, else proportional to sample counts."""
        ws = [s.weight for s in self.source]
        bad = [s.name for s in self.source if s.weight != UNSET and s.weight <= 0]
        if bad:
            raise ConfigError(f"recipe {self.name}: weight must be > 0 (or omitted) on source(s) {', '.join(bad)}")
        if all(w == UNSET for w in ws):
            counts = [s.samples for s in self.source]
            ws = [float(c) for c in counts] if all(c > 0 for c in counts) else [1.0] * len(ws)
        elif any(w == UNSET for w in ws):
            raise ConfigError(f"recipe {self.name}: set weight on every source or on none")
        total = sum(ws)
        if total <= 0:
            raise ConfigError(f"recipe {self.name}: weights must be positive")
        return [w / total for w in ws]


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by built-in name (``merged2b``) or path (relative paths: the current directory)."""
    path = find("recipe", name_or_path)
    recipe = load_typed(Recipe, path)
    if not recipe.source:
        raise ConfigError(f"{path}: a recipe needs at least one [[source]]")
    for i, s in enumerate(recipe.source):
        if not s.name or not s.shards:
            raise ConfigError(f"{path}: source[{i}] needs a name and a shards pattern")
    recipe.weights()  # validates
    return recipe


def recipe_from_shards(pattern: str) -> Recipe:
    """A one-source recipe for ``data.shards``."""
    return Recipe(name="shards", source=[SourceSpec(name="shards", shards=pattern)])


def shard_pattern(folder: str, n: int, width: int = 5) -> str:
    """The brace pattern of ``n`` shards numbered from 0 with ``width`` digits in ``folder`` ("" for the recipe's
    own folder): ``train/{00000..00003}.tar``, or ``train/00000.tar`` for one."""
    names = f"{0:0{width}d}.tar" if n == 1 else f"{{{0:0{width}d}..{n - 1:0{width}d}}}.tar"
    return f"{folder}/{names}" if folder else names


def write_recipe(path: str, name: str, description: str, sources: Sequence[Dict], comment: str = "") -> str:
    """Write a recipe file all or nothing (``files.atomic_write``): ``sources`` as ``[{"name", "shards",
    "samples"[, "weight"]}]`` (shards relative to the file, or ``{root}/...``), ``comment`` as ``#`` lines above.
    The one writer of the recipes that data synth, filter, reinforce, capfilt and the studies produce; strings
    are written as JSON strings, which TOML reads back as the same text (paths with backslashes or quotes too)."""
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    lines += [f"name = {json.dumps(name)}", f"description = {json.dumps(description)}", ""]
    for s in sources:
        lines += ["[[source]]", f"name = {json.dumps(s['name'])}", f"shards = {json.dumps(s['shards'])}",
                  f"samples = {int(s['samples'])}", *([f"weight = {float(s['weight'])}"] if "weight" in s else []), ""]
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path
