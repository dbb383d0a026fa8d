"""``evaclip data stats | verify | preview``: manifests, corruption scans, contact sheets."""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List, Tuple

from evaclip.data.recipes import load_recipe
from evaclip.data.samples import SkipSample, decode_sample
from evaclip.data.shards import ShardError, count_tar_samples, expand_pattern, is_local, iter_tar_samples
from evaclip.data.transforms import IMAGE_EXTS
from evaclip.errors import ConfigError
from evaclip.files import is_name
from evaclip.metrics import progress_bar


def add_parsers(dsub) -> None:
    for name, help_ in [("stats", "count samples per shard and write a parquet manifest"),
                        ("verify", "scan shards, decode every sample, report corrupt ones"),
                        ("preview", "print a few samples and write a contact sheet PNG")]:
        p = dsub.add_parser(name, help=help_)
        p.add_argument("source", help="a brace pattern of tar shards, a recipe TOML file, or a built-in recipe name "
                       "(merged2b, laion2b, ...)")
        p.add_argument("--root", default="", help="value of {root} in the pattern / recipe")
        if name == "stats":
            p.add_argument("--out", default="", help="manifest path (default: manifest.parquet next to the shards)")
        if name == "verify":
            p.add_argument("--out", default="", help="also write the report as JSON here")
            p.add_argument("--fail", action="store_true", help="exit 1 when anything is corrupt")
        if name == "preview":
            p.add_argument("-n", type=int, default=16, help="samples to show")
            p.add_argument("--out", default="preview.png", help="contact sheet PNG")


def _is_recipe(source: str) -> bool:
    return source.endswith(".toml") or (is_name(source) and "{" not in source and ".tar" not in source)


def expand_sources(source: str, root: str) -> List[Tuple[str, List[str]]]:
    """[(source name, urls)] from a recipe (file or built-in name) or a single pattern."""
    if _is_recipe(source):
        return [(s.name, expand_pattern(s.shards, root)) for s in load_recipe(source).source]
    return [("shards", expand_pattern(source, root))]


def source_weights(source: str) -> Dict[str, float]:
    """The sampling weights a recipe gives its sources ({} for a shard pattern, and without the sources it leaves
    proportional to their samples)."""
    if not _is_recipe(source):
        return {}

    return {s.name: s.weight for s in load_recipe(source).source if s.weight > 0}


def _stats_json(url: str):
    """img2dataset writes <shard>_stats.json next to each <shard>.tar with a 'successes' count."""
    if not is_local(url):
        return None
    path = url[:-len(".tar")] + "_stats.json" if url.endswith(".tar") else None
    if path and os.path.exists(path):
        with open(path) as f:
            st = json.load(f)
        if "successes" in st:
            return int(st["successes"])
    return None


def stats(source: str, root: str = "", out: str = "", progress=None) -> Dict:
    """The manifest (``manifest.parquet``: samples and bytes per shard) of a recipe or shard pattern."""
    return manifest(expand_sources(source, root), out, progress)


def manifest(sources: List[Tuple[str, List[str]]], out: str = "", progress=None) -> Dict:
    """The manifest of [(source name, shard urls)]: samples per shard from img2dataset's ``_stats.json`` where
    there is one, else counted from the tar headers; per-source totals returned."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"source": [], "shard": [], "samples": [], "bytes": [], "counted_from": []}
    for name, urls in sources:
        for url in urls:
            n = _stats_json(url)
            how = "img2dataset_stats"
            if n is None:
                try:
                    n, how = count_tar_samples(url), "tar_headers"
                except Exception as e:  # noqa: BLE001
                    n, how = -1, f"error: {e}"
            rows["source"].append(name)
            rows["shard"].append(url)
            rows["samples"].append(n)
            rows["bytes"].append(os.path.getsize(url) if is_local(url) and os.path.exists(url) else -1)
            rows["counted_from"].append(how)
            if progress:
                progress(1)
    table = pa.table(rows)
    if not out:
        first = rows["shard"][0] if rows["shard"] else "."
        out = os.path.join(os.path.dirname(first) if is_local(first) else ".", "manifest.parquet")
    pq.write_table(table, out)
    per_source = Counter()
    for s, n in zip(rows["source"], rows["samples"]):
        per_source[s] += max(n, 0)
    return {"manifest": out, "shards": len(rows["shard"]), "samples": dict(per_source),
            "unreadable": sum(1 for n in rows["samples"] if n < 0)}


def verify(source: str, root: str = "", progress=None) -> Dict:
    report = {"shards": [], "totals": Counter()}
    for name, urls in expand_sources(source, root):
        for url in urls:
            c = Counter()
            err = None
            try:
                for raw in iter_tar_samples(url):
                    try:
                        decode_sample(raw, lambda img: None, 0)
                        c["ok"] += 1
                    except SkipSample as s:
                        c[s.reason] += 1
            except ShardError as e:
                err = str(e)
                c["unreadable_shard"] += 1
            report["shards"].append({"source": name, "shard": url, "counts": dict(c), "error": err})
            report["totals"].update(c)
            if progress:
                progress(1)
    report["totals"] = dict(report["totals"])
    report["corrupt_shards"] = [s["shard"] for s in report["shards"] if set(s["counts"]) - {"ok"}]
    return report


def preview(source: str, root: str = "", n: int = 16, out: str = "preview.png") -> List[Dict]:
    import io
    import textwrap

    from PIL import Image, ImageDraw

    if n < 1:
        raise ConfigError(f"data preview -n must be >= 1, got {n}")
    samples, tried = [], 0
    for _, urls in expand_sources(source, root):
        for url in urls:
            tried += 1
            try:
                for raw in iter_tar_samples(url):
                    samples.append(raw)
                    if len(samples) >= n:
                        break
            except ShardError:
                continue
            if len(samples) >= n:
                break
        if len(samples) >= n:
            break
    if not samples:
        raise ConfigError(f"data preview: no readable sample in {source} ({tried} shard(s) tried; "
                          "`evaclip data verify` says why)")
    cell, cols = 160, 4
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 48)), "white")
    draw = ImageDraw.Draw(sheet)
    info = []
    for i, raw in enumerate(samples):
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        cap = raw.get("txt", b"").decode("utf-8", "replace").strip()
        x, y = (i % cols) * cell, (i // cols) * (cell + 48)
        size = None
        if ext:
            try:
                img = Image.open(io.BytesIO(raw[ext])).convert("RGB")
                size = img.size
                img.thumbnail((cell - 8, cell - 8))
                sheet.paste(img, (x + 4, y + 4))
            except Exception:  # noqa: BLE001
                draw.text((x + 8, y + 60), "undecodable", fill="red")
        draw.multiline_text((x + 4, y + cell), "\n".join(textwrap.wrap(cap, 26)[:3]), fill="black")
        info.append({"key": raw["__key__"], "caption": cap, "image_size": size, "shard": raw["__url__"]})
    sheet.save(out)
    return info


def run(args) -> int:
    if args.data_cmd == "stats":
        bar = progress_bar(None, "shards", "shard", leave=False)
        res = stats(args.source, args.root, args.out, bar.update)
        bar.close()
        print(f"{res['shards']} shards, samples per source: {res['samples']}, unreadable shards: {res['unreadable']}"
              f"\nmanifest: {res['manifest']}")
        return 0
    if args.data_cmd == "verify":
        bar = progress_bar(None, "verify", "shard", leave=False)
        rep = verify(args.source, args.root, bar.update)
        bar.close()
        for s in rep["shards"]:
            if s["shard"] in rep["corrupt_shards"]:
                print(f"  {s['shard']}: {s['counts']}" + (f" ({s['error']})" if s["error"] else ""))
        print(f"{len(rep['shards'])} shards, {len(rep['corrupt_shards'])} with problems; totals: {rep['totals']}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rep, f, indent=2)
            print(f"report: {args.out}")
        return 1 if args.fail and rep["corrupt_shards"] else 0
    if args.data_cmd == "preview":
        info = preview(args.source, args.root, args.n, args.out)
        for s in info:
            print(f"  {s['key']}  {s['image_size']}  {s['caption']!r}")
        print(f"contact sheet: {args.out}")
        return 0
    raise ValueError(f"unknown data command {args.data_cmd}")
