"""Keep samples from score or per-sample loss tables and copy them, byte for byte, into new webdataset shards with
a manifest, a recipe and a histogram."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections import Counter
from typing import Dict, List, Sequence

from evaclip.curation.histogram import Histogram
from evaclip.curation.score import MODEL_KEY, SHARD_KEY
from evaclip.curation.where import parse_where
from evaclip.data.recipes import shard_pattern, write_recipe
from evaclip.data.shard_writer import copy_kept, shard_writer
from evaclip.data.shards import is_local, shard_identity
from evaclip.data.tools import expand_sources, stats
from evaclip.errors import UserError
from evaclip.files import atomic_write, exclusive, replace_dir

# Score tables are processed one at a time (memory: one input shard's table), in two passes: the first reads
# only the --by and source columns, for the per-source cut of --top / --bottom and the histogram's range; the
# second selects each table's rows and copies them out of the shard the table describes. Per-sample loss
# tables (a row per step and sample) are first reduced to one row per sample, in memory.

def _table_files(paths: Sequence[str]) -> List[str]:
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
        elif os.path.exists(p):
            files.append(p)
        else:
            raise UserError(f"{p}: no such table or folder")
    files = [f for f in files if ".tmp" not in os.path.basename(f)]
    if not files:
        raise UserError(f"no parquet tables in {', '.join(paths)}")
    return files


def _columns(files: Sequence[str]) -> List[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(files[0]).names
    for f in files[1:]:
        other = pq.read_schema(f).names
        if set(other) != set(names):
            raise UserError(f"{f}: columns {sorted(other)} differ from {sorted(names)} (mixed table kinds?)")
    return names


def _read(path: str, columns=None):
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=columns)
    return t.drop_columns([c for c in ("embedding",) if c in t.column_names])


def _table_shards(path: str) -> List[str]:
    """The shards a table's rows name: from the parquet row groups' statistics where each group names one shard (a
    score table holds one shard's rows, so the column is not read twice), else from the column."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    j = meta.schema.names.index("shard")
    found = set()
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(j).statistics
        if st is None or not st.has_min_max or st.min != st.max:
            return sorted(set(_read(path, ["shard"]).column("shard").to_pylist()))
        found.add(st.min)
    return sorted(found)


def _metadata(path: str) -> Dict[str, str]:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in md.items()}


def _check_models(files: Sequence[str]) -> None:
    """Score tables of different models (or weights) hold scores on different scales: not one filter's input."""
    models = sorted({m for m in (_metadata(f).get(MODEL_KEY) for f in files) if m})
    if len(models) > 1:
        raise UserError(f"the tables were scored by {len(models)} models ({'; '.join(models[:3])}): their scores are "
                        "on different scales; filter each model's tables on their own, or pass --mixed-models")


def _aggregate_by_key(table):
    """Per-sample loss tables hold a row per (step, sample) seen: one row per (source, key), the mean loss."""
    if "step" not in table.column_names:
        return table
    numeric = [c for c in table.column_names if c not in ("step", "key", "source", "shard", "shard_id")]
    keys = [c for c in ("source", "key", "shard", "shard_id") if c in table.column_names]
    agg = table.group_by(keys).aggregate([(c, "mean") for c in numeric])
    return agg.rename_columns([c[:-len("_mean")] if c.endswith("_mean") else c for c in agg.column_names])


def _values_sources(table, by: str):
    import numpy as np

    values = table.column(by).to_numpy(zero_copy_only=False).astype(np.float64)
    sources = (np.asarray(table.column("source").to_pylist(), dtype=object) if "source" in table.column_names
               else np.full(table.num_rows, "", dtype=object))
    return values, sources


def _fraction_cuts(values, sources, top, bottom) -> Dict[str, Dict[str, float]]:
    """Per source: the value of the last kept row of --top (highest first) and of --bottom (lowest first)."""
    import numpy as np

    cuts: Dict[str, Dict[str, float]] = {}
    for src in np.unique(sources):
        v = np.sort(values[sources == src])
        c = {}
        if top is not None:
            k = int(round(top * len(v)))
            c["top"] = float(v[len(v) - k]) if k else float("inf")
        if bottom is not None:
            k = int(round(bottom * len(v)))
            c["bottom"] = float(v[k - 1]) if k else float("-inf")
        cuts[str(src)] = c
    return cuts


def _row_mask(table, by: str, min_value, max_value, cuts, where: str):
    """Rows of ``table`` kept by every criterion (``cuts``: per-source fraction cuts; ties at a cut are kept)."""
    import numpy as np

    keep = np.ones(table.num_rows, dtype=bool)
    if by in table.column_names:
        values, sources = _values_sources(table, by)
        if min_value is not None:
            keep &= values >= min_value
        if max_value is not None:
            keep &= values <= max_value
        for src, c in cuts.items():
            mine = sources == src
            if "top" in c:
                keep &= ~mine | (values >= c["top"])
            if "bottom" in c:
                keep &= ~mine | (values <= c["bottom"])
    if where:
        keep &= _mask(table, parse_where(where, table.column_names))
    return keep


def _check_criteria(columns, by, min_value, max_value, top, bottom, where) -> None:
    if not any(x is not None for x in (min_value, max_value, top, bottom)) and not where:
        raise UserError("nothing to filter by: give --min-score/--min, --max, --top, --bottom or --where")
    if by not in columns and any(x is not None for x in (min_value, max_value, top, bottom)):
        raise UserError(f"--by {by!r}: no such column (columns: {', '.join(columns)})")
    for name, frac in (("--top", top), ("--bottom", bottom)):
        if frac is not None and not 0 < frac <= 1:
            raise UserError(f"{name} {frac}: a fraction in (0, 1]")
    if where:
        parse_where(where, columns)  # a bad expression fails before any work


def select(table, by: str = "score", min_value=None, max_value=None, top=None, bottom=None, where: str = ""):
    """(boolean mask of the kept rows, per-source cuts) of an in-memory table: the rules ``filter_tables`` applies."""
    _check_criteria(table.column_names, by, min_value, max_value, top, bottom, where)
    cuts = _fraction_cuts(*_values_sources(table, by), top, bottom) if (top or bottom) else {}
    return _row_mask(table, by, min_value, max_value, cuts, where), cuts


def _mask(table, expr):
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        got = ds.dataset(table).to_table(columns={"m": expr}).column("m").to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:  # integer / 0, 'a' < 1
        raise UserError(f"--where: {str(e).splitlines()[0]}") from None
    return np.asarray(got, dtype=bool)


class _Copier:
    """Pass 2: selects each table's rows and copies the kept samples into the new shards, counting per source."""

    def __init__(self, out: str, shard_size: int, by: str, min_value, max_value, cuts, where: str, hist):
        self.by, self.min_value, self.max_value, self.cuts, self.where, self.hist = by, min_value, max_value, cuts, \
            where, hist
        self.add, self.close, self.state = shard_writer(out, shard_size)
        self.total: Counter = Counter()
        self.kept: Counter = Counter()
        self.digest = hashlib.sha1()

    def selected(self, t):
        """{(source, key): the row's extra columns} of the kept rows, and the table's shard column (or None)."""
        import numpy as np

        keep = _row_mask(t, self.by, self.min_value, self.max_value, self.cuts, self.where)
        if self.hist is not None:
            self.hist.add(*_values_sources(t, self.by), keep)
        srcs = t.column("source").to_pylist() if "source" in t.column_names else [""] * t.num_rows
        self.total.update(srcs)
        extra = [c for c in t.column_names if c not in ("key", "source", "shard", "caption", "step")]
        cols = {c: t.column(c).to_pylist() for c in extra}
        keys = t.column("key").to_pylist()
        return {(srcs[j], keys[j]): {c: cols[c][j] for c in extra} for j in np.nonzero(keep)[0]}, \
            (t.column("shard").to_pylist() if "shard" in t.column_names else None)

    def copy(self, url: str, wanted: Dict, src=None, scored: str = "", table: str = "") -> None:
        """Copy the samples of ``url`` that ``wanted`` holds (removing them from it). ``url`` must be the shard the
        rows came from: the one a score ``table`` recorded (its identity ``scored``), and for rows that recorded
        the shard they were read from (``shard_id``: per-sample loss tables) that one; a key met in a shard of
        other content is an error, not a silent copy of another image. The shard's identity is taken once here."""
        rows_say = bool(wanted) and "shard_id" in next(iter(wanted.values()))
        identity = shard_identity(url) if (scored or rows_say) else ""
        if scored and identity != scored:
            raise UserError(f"{url} is not the shard {table} scored (bytes:digest {scored} then, {identity or 'gone'} "
                            "now): score it again (evaclip data score)")
        by_key = {}
        for s_, k_ in wanted:
            by_key[k_] = None if k_ in by_key else (s_, k_)
        done = set()

        def match(key):
            k = (src, key) if (src, key) in wanted else by_key.get(key)
            if k is None or k in done:
                return None
            extra = dict(wanted[k])
            read_from = extra.pop("shard_id", "")
            if read_from and identity and read_from != identity:
                raise UserError(f"{url} holds sample {key} but is not the shard the run read it from (bytes:digest "
                                f"{read_from} then, {identity} now): point --shards at the shards the run trained on")
            done.add(k)
            return extra
        copy_kept(url, match, self.add)
        for k in done:
            wanted.pop(k)
            self.kept[k[0]] += 1
            self.digest.update(f"{k[0]}/{k[1]}\n".encode())

    def from_tables(self, files: Sequence[str], progress=None) -> int:
        """A table at a time: its rows come from the shard(s) it names, which must be the shard it scored (a
        replaced shard, matched by key alone, gave other images and captions). Returns the kept samples not found."""
        missing = 0
        for f in files:
            wanted, shard_col = self.selected(_read(f))
            scored = _metadata(f).get(SHARD_KEY, "")
            for url in dict.fromkeys(shard_col):
                self.copy(url, wanted, scored=scored, table=f)
            missing += len(wanted)
            if progress:
                progress(1)
        return missing

    def from_sources(self, whole, shards: str, root: str, progress=None) -> int:
        """Per-sample loss tables (no shard column): the samples are looked up in ``shards``."""
        wanted, _ = self.selected(whole)
        for src, urls in expand_sources(shards, root):
            for url in urls:
                self.copy(url, wanted, src)
                if progress:
                    progress(1)
        return len(wanted)


def _first_pass(files, columns, whole, by: str, top, bottom):
    """The --by column and the sources only: the per-source cuts of --top / --bottom and the histogram's range."""
    import numpy as np

    parts = [_values_sources(whole, by)] if whole is not None else \
        [_values_sources(_read(f, [c for c in (by, "source") if c in columns]), by) for f in files]
    values, sources = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    cuts = _fraction_cuts(values, sources, top, bottom) if top is not None or bottom is not None else {}
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    return cuts, lo, hi


def _write_recipe(out: str, name: str, n_shards: int, n_kept: int, n_tables: int, criteria: Dict) -> str:
    """recipe.toml pointing at the new shards (relative to it: the folder is swapped into place after); the shard
    pattern."""
    recipe_name = name or os.path.basename(os.path.abspath(out))
    pattern = shard_pattern("", n_shards)
    write_recipe(os.path.join(out, "recipe.toml"), recipe_name, "filtered: " + json.dumps(criteria),
                 [{"name": recipe_name, "shards": pattern, "samples": n_kept}],
                 comment=f"Written by `evaclip data filter` from {n_tables} tables: {json.dumps(criteria)}\n"
                         "  evaclip train <experiment> data.recipe=<the path of this file>")
    return pattern


def _check_out_is_no_input(out: str, paths: Sequence[str], columns, shards: str, root: str) -> None:
    """Refuse an --out that is, holds or lies inside an input (the tables and their folders, the shards): --force
    replaces --out whole, and it used to delete the score tables and the shards before writing a byte."""

    inputs = list(paths)
    if "shard" in columns:
        tables = [p for p in paths if p.endswith(".parquet")]
        inputs += sorted({u for f in tables for u in _table_shards(f)})
    if shards:
        inputs += [u for _, urls in expand_sources(shards, root) for u in urls]
    target = os.path.realpath(out)
    for path in inputs:
        if not is_local(path):
            continue
        here = os.path.realpath(path)
        if here == target or os.path.commonpath([here, target]) in (here, target):
            raise UserError(f"--out {out} would overwrite an input ({path}): write the filtered shards elsewhere")


def filter_tables(tables: Sequence[str], out: str, by: str = "score", min_value=None, max_value=None, top=None,
                  bottom=None, where: str = "", shards: str = "", root: str = "", shard_size: int = 10000,
                  name: str = "", force: bool = False, progress=None, mixed_models: bool = False) -> Dict:
    """Select samples from score / loss tables and copy them into new shards; see the comment above. One filter at
    a time writes an --out (a lock beside it); the shards are built in a hidden folder next to it and swapped in
    whole at the end, so a failed or killed filter leaves the old --out as it was (--force included)."""
    files = _table_files(tables)
    columns = _columns(files)
    _check_criteria(columns, by, min_value, max_value, top, bottom, where)
    if not mixed_models:
        _check_models(files)
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"--out {out} is not empty (pass --force to replace it)")
    if "shard" not in columns and not shards:
        raise UserError("these tables have no shard column (per-sample loss tables): pass --shards <recipe or "
                        "pattern> where the samples are")
    _check_out_is_no_input(out, list(tables) + files, columns, shards, root)
    final = os.path.abspath(out)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with exclusive(final + ".lock", f"--out {out}"):
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            summary = _build(files, columns, tmp, by, min_value, max_value, top, bottom, where, shards, root,
                             shard_size, name or os.path.basename(final), progress)
            replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _publish(final, summary)


def _build(files, columns, out, by, min_value, max_value, top, bottom, where, shards, root, shard_size, name,
           progress) -> Dict:
    """The new shards, recipe and histogram in ``out`` (the hidden folder); the summary so far."""
    import pyarrow as pa

    whole = None if "shard" in columns else _aggregate_by_key(pa.concat_tables([_read(f) for f in files]))
    has_by = by in (whole.column_names if whole is not None else columns)
    cuts, lo, hi = _first_pass(files, columns, whole, by, top, bottom) if has_by else ({}, 0.0, 1.0)
    copier = _Copier(out, shard_size, by, min_value, max_value, cuts, where, Histogram(lo, hi) if has_by else None)
    missing = copier.from_tables(files, progress) if whole is None else \
        copier.from_sources(whole, shards, root, progress)
    copier.close()
    total, kept = copier.total, copier.kept
    n_kept = sum(kept.values())
    if missing:
        raise UserError(f"{missing} kept samples were not found in their shards: the tables do not match the shards"
                        " (nothing written)")
    if not n_kept:
        raise UserError(f"nothing is kept by these criteria ({sum(total.values()):,} rows); nothing written")
    n_shards = len(copier.state["counts"])
    criteria = {k: v for k, v in {"by": by, "min": min_value, "max": max_value, "top": top, "bottom": bottom,
                                  "where": where or None}.items() if v is not None}
    pattern = _write_recipe(out, name, n_shards, n_kept, len(files), criteria)
    plot = copier.hist.save(os.path.join(out, "histogram.png"), by, cuts, min_value, max_value) if has_by else ""
    per_source = {s: {"total": total[s], "kept": kept[s], "cut": next(iter(cuts.get(s, {}).values()), min_value)}
                  for s in total}
    return {"kept": n_kept, "dropped": sum(total.values()) - n_kept, "shards": n_shards, "per_source": per_source,
            "criteria": criteria, "tables": len(files), "recipe": "recipe.toml",
            "histogram": os.path.basename(plot) if plot else "", "pattern": pattern,
            "keys_sha1": copier.digest.hexdigest()}


def _publish(final: str, summary: Dict) -> Dict:
    """After the swap: the manifest of the shards where they now are, and summary.json with the final paths."""

    man = stats(os.path.join(final, summary.pop("pattern")), out=os.path.join(final, "manifest.parquet"))
    summary.update(recipe=os.path.join(final, summary["recipe"]), manifest=man["manifest"],
                   histogram=os.path.join(final, summary["histogram"]) if summary["histogram"] else "")
    with atomic_write(os.path.join(final, "summary.json")) as f:
        json.dump(summary, f, indent=2)
    return summary
