"""``evaclip data score | filter``: curate image-text shards with a CLIP model (LAION / DataComp style).

score   streams shards through a model and writes one parquet table per input shard: key, shard, source,
        CLIP score (cosine of the normalised embeddings), image bytes / width / height, caption and its
        length, optionally the image embedding. A table is written atomically when its shard is done, so a
        killed run restarted with the same command skips the finished shards. ``--part i/n`` (and torchrun's
        RANK / WORLD_SIZE) split the shards between processes; no process talks to another.
filter  keeps samples by a threshold, a top / bottom fraction per source (DataComp) or an expression over
        the table's columns, and copies the kept samples' files, byte for byte, into new webdataset shards
        (img2dataset layout, the score added to each sample's .json) with a manifest and a recipe that points
        at them. The input shards are never modified. Tables of per-sample training losses
        (``log.sample_loss``) are valid input too.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from evaclip.data.shards import ShardError, iter_tar_samples
from evaclip.data.tools import expand_sources
from evaclip.errors import UserError
from evaclip.files import atomic_write, replace_file

SCORE_CONFIG = "score.json"


# ---------------------------------------------------------------------------------------------------- CLI
def add_parsers(dsub) -> None:
    import argparse

    s = dsub.add_parser(
        "score", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="CLIP-score every sample of a recipe or shard pattern (one parquet table per shard; resumable)",
        description="Score image-caption pairs with a model: cosine of the normalised image and text embeddings.\n\n"
                    "  evaclip data score merged2b --root /datasets --checkpoint runs/eva02_clip_b16 --out scores/\n"
                    "  evaclip data score '/data/{00000..00099}.tar' --model open_clip:ViT-B-32 \\\n"
                    "      --pretrained laion2b_s34b_b79k --out scores/ --part 0/4      # this process: shards 0, 4, 8...\n\n"
                    "Rerun the same command after a kill: finished shards are skipped. Under torchrun every rank "
                    "takes its own shards.")
    s.add_argument("source", help="a recipe (built-in name or TOML file) or a brace pattern of tar shards")
    s.add_argument("--root", default="", help="value of {root} in the pattern / recipe")
    s.add_argument("--checkpoint", default="", help="an evaclip run dir or checkpoint dir")
    s.add_argument("--model", default="", help="open_clip:<name> (with --pretrained: weights, an export folder or a tag)")
    s.add_argument("--pretrained", default="")
    s.add_argument("--out", required=True, help="folder for the tables (<out>/<source>/<shard>.parquet)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=2, help="threads decoding images (0: inline)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--embeddings", action="store_true", help="also store each image embedding (float16) for clustering")
    s.add_argument("--part", default="0/1", metavar="I/N", help="score only the shards with index %% N == I")
    s.add_argument("--trust-pickle", action="store_true", help="allow a pickled (non-safetensors) checkpoint")

    f = dsub.add_parser(
        "filter", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="keep samples by score / loss and write them as new shards with a manifest and a recipe",
        description="Keep samples from score tables (evaclip data score) or per-sample loss tables "
                    "(log.sample_loss) and copy them into new shards.\n\n"
                    "  evaclip data filter scores/ --min-score 0.28 --out laion-0.28/          # LAION style\n"
                    "  evaclip data filter scores/ --top 0.3 --out top30/                      # DataComp: top 30%% per source\n"
                    "  evaclip data filter scores/ --where 'score > 0.25 and caption_chars >= 10' --out f/\n"
                    "  evaclip data filter runs/x/sample_loss --by loss --bottom 0.99 \\\n"
                    "      --shards merged2b --root /datasets --out clean/    # drop the 1%% highest-loss samples\n\n"
                    "--where: comparisons (< <= > >= == !=), and / or / not, + - * /, numbers and 'strings' over "
                    "the table's columns. It is parsed, never executed.")
    f.add_argument("tables", nargs="+", help="parquet tables or folders of them")
    f.add_argument("--out", required=True, help="folder for the new shards, manifest.parquet, recipe.toml, summary")
    f.add_argument("--by", default="score", help="the column the thresholds and fractions apply to (default: score)")
    f.add_argument("--min-score", "--min", dest="min", type=float, default=None, help="keep rows with --by >= this")
    f.add_argument("--max", type=float, default=None, help="keep rows with --by <= this")
    f.add_argument("--top", type=float, default=None, metavar="FRAC", help="keep the highest FRAC of each source")
    f.add_argument("--bottom", type=float, default=None, metavar="FRAC", help="keep the lowest FRAC of each source")
    f.add_argument("--where", default="", help="an expression over the columns (see above)")
    f.add_argument("--shards", default="", help="recipe or pattern holding the samples, for tables without a "
                   "shard column (per-sample loss tables)")
    f.add_argument("--root", default="", help="value of {root} in --shards")
    f.add_argument("--shard-size", type=int, default=10000, help="samples per output shard (img2dataset: 10000)")
    f.add_argument("--name", default="", help="recipe name (default: the --out folder's name)")
    f.add_argument("--force", action="store_true", help="replace a non-empty --out folder")


def run(args) -> int:
    from evaclip.metrics import progress_bar

    if args.data_cmd == "score":
        from evaclip.encoders import load_encoders

        device = args.device
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per rank
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        enc = load_encoders(args.checkpoint, args.model, args.pretrained, device, args.trust_pickle)
        bar = progress_bar(None, "score", "img", leave=False)
        res = score(args.source, args.root, enc, args.out, batch_size=args.batch_size, workers=args.workers,
                    device=device, part=parse_part(args.part), embeddings=args.embeddings,
                    bf16=args.precision == "bf16", progress=bar.update)
        bar.close()
        print(f"scored {res['scored_shards']} shards ({res['samples']:,} samples, {res['pairs_per_s']:.1f} pairs/s), "
              f"skipped {res['done_before']} already scored; skipped samples: {res['skipped']}"
              + (f"; unreadable shards: {len(res['unreadable'])}" if res["unreadable"] else "")
              + f"\ntables: {args.out}")
        return 0
    if args.data_cmd == "filter":
        res = filter_tables(args.tables, args.out, by=args.by, min_value=args.min, max_value=args.max, top=args.top,
                            bottom=args.bottom, where=args.where, shards=args.shards, root=args.root,
                            shard_size=args.shard_size, name=args.name, force=args.force)
        for src, c in res["per_source"].items():
            print(f"  {src}: kept {c['kept']:,} of {c['total']:,} ({100 * c['kept'] / max(c['total'], 1):.1f}%)"
                  + (f", cut at {c['cut']:.4g}" if c.get("cut") is not None else ""))
        print(f"kept {res['kept']:,}, dropped {res['dropped']:,}; {res['shards']} shards in {args.out}\n"
              f"recipe: {res['recipe']}\nhistogram: {res['histogram']}")
        return 0
    raise ValueError(f"unknown data command {args.data_cmd}")


# ---------------------------------------------------------------------------------------------------- score
def parse_part(spec: str) -> Tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--part {spec!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--part {spec!r}: need 0 <= I < N")
    return i, n


def _this_part(part: Tuple[int, int]) -> Tuple[int, int]:
    """--part i/n combined with torchrun's RANK / WORLD_SIZE: part i * world + rank of n * world."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return part[0] * world + rank, part[1] * world


def table_path(out: str, source: str, index: int, url: str) -> str:
    stem = os.path.basename(url.rstrip("/"))
    stem = stem[:-len(".tar")] if stem.endswith(".tar") else stem
    return os.path.join(out, source, f"{index:06d}_{stem}.parquet")


def check_score_folder(out: str, config: Dict) -> None:
    """A resumed score run must use the same model and settings as the tables already written."""
    path = os.path.join(out, SCORE_CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in config if old.get(k) != config[k]]
        if changed:
            raise UserError(f"{out} holds tables scored with other settings ({', '.join(changed)}: "
                            f"{[old.get(k) for k in changed]} -> {[config[k] for k in changed]}); "
                            "use a new --out folder")
        return
    os.makedirs(out, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(config, f, indent=2)


def _prepare(raw: Dict, transform) -> Tuple:
    """(image tensor, row) or (None, skip reason), with the same checks and reasons as training."""
    from PIL import Image

    from evaclip.data.transforms import IMAGE_EXTS
    from evaclip.data.samples import SkipSample, decode_sample

    try:
        img, caption = decode_sample(raw, transform, 0)
    except SkipSample as s:
        return None, s.reason
    ext = next(e for e in IMAGE_EXTS if e in raw)
    w, h = Image.open(io.BytesIO(raw[ext])).size  # the stored size (header only)
    return img, {"key": raw["__key__"], "caption": caption, "image_bytes": len(raw[ext]), "width": w, "height": h}


def _write_table(path: str, cols: Dict, source: str, url: str, skips: Dict, embed_dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(cols["key"])
    fields = {"key": pa.array(cols["key"], pa.string()), "shard": pa.array([url] * n, pa.string()),
              "source": pa.array([source] * n, pa.string()), "score": pa.array(cols["score"], pa.float32()),
              "image_bytes": pa.array(cols["image_bytes"], pa.int64()), "width": pa.array(cols["width"], pa.int32()),
              "height": pa.array(cols["height"], pa.int32()), "caption": pa.array(cols["caption"], pa.string()),
              "caption_chars": pa.array([len(c) for c in cols["caption"]], pa.int32())}
    if embed_dim:
        import numpy as np

        flat = np.concatenate(cols["embedding"]).astype(np.float16).reshape(-1) if n else np.zeros(0, np.float16)
        fields["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), embed_dim)
    table = pa.table(fields).replace_schema_metadata({"evaclip.skipped": json.dumps(skips)})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "wb") as f:  # a table exists only once its shard is complete
        pq.write_table(table, f)


def score(source: str, root: str, enc, out: str, batch_size: int = 256, workers: int = 2, device: str = "cpu",
          part: Tuple[int, int] = (0, 1), embeddings: bool = False, bf16: bool = False,
          progress: Optional[Callable[[int], None]] = None) -> Dict:
    """Score this process's shards of ``source`` with ``enc`` (``evaclip.encoders.Encoders``); see the module doc."""
    import torch
    import torch.nn.functional as F

    from evaclip.data.transforms import eval_transform

    i, n = _this_part(part)
    check_score_folder(out, {"model": enc.name, "weights": enc.identity, "source": source, "root": root,
                        "image_size": enc.image_size, "embeddings": embeddings, "precision": "bf16" if bf16 else "fp32"})
    transform = eval_transform(enc.image_size, enc.mean, enc.std, interpolation=enc.interpolation)
    dev = torch.device(device)
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    res = {"scored_shards": 0, "done_before": 0, "samples": 0, "skipped": Counter(), "unreadable": []}
    t0 = time.time()

    def encode(images, captions):
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            fi = F.normalize(enc.encode_image(torch.stack(images).to(dev)).float(), dim=-1)
            ft = F.normalize(enc.encode_text(enc.tokenizer(captions).to(dev)).float(), dim=-1)
        return (fi * ft).sum(-1).cpu(), fi.cpu()

    try:
        index = 0
        for name, urls in expand_sources(source, root):
            for k, url in enumerate(urls):
                mine, index = index % n == i, index + 1
                path = table_path(out, name, k, url)
                if not mine:
                    continue
                if os.path.exists(path):
                    res["done_before"] += 1
                    continue
                cols = {c: [] for c in ("key", "caption", "image_bytes", "width", "height", "score", "embedding")}
                skips: Counter = Counter()
                try:
                    chunk: List[Dict] = []
                    for raw in _with_end(iter_tar_samples(url)):
                        if raw is not None:
                            chunk.append(raw)
                        if chunk and (len(chunk) == batch_size or raw is None):
                            prepared = (list(pool.map(lambda r: _prepare(r, transform), chunk)) if pool
                                        else [_prepare(r, transform) for r in chunk])
                            chunk = []
                            ok = [(img, row) for img, row in prepared if img is not None]
                            skips.update(row for img, row in prepared if img is None)
                            if not ok:
                                continue
                            sc, emb = encode([img for img, _ in ok], [row["caption"] for _, row in ok])
                            for (_, row), s, e in zip(ok, sc.tolist(), emb):
                                for c in ("key", "caption", "image_bytes", "width", "height"):
                                    cols[c].append(row[c])
                                cols["score"].append(s)
                                if embeddings:
                                    cols["embedding"].append(e.numpy())
                            if progress:
                                progress(len(ok))
                except ShardError as e:
                    res["unreadable"].append({"shard": url, "error": str(e)})  # no table: a rerun retries it
                    continue
                _write_table(path, cols, name, url, dict(skips), emb.shape[1] if embeddings and cols["key"] else 0)
                res["scored_shards"] += 1
                res["samples"] += len(cols["key"])
                res["skipped"].update(skips)
    finally:
        if pool is not None:
            pool.shutdown()
    res["skipped"] = dict(res["skipped"])
    res["seconds"] = time.time() - t0
    res["pairs_per_s"] = res["samples"] / max(res["seconds"], 1e-9)
    return res


def _with_end(it):
    """The items of ``it``, then None (so the caller flushes its last partial batch)."""
    yield from it
    yield None


# ---------------------------------------------------------------------------------------------------- where
_CMP = {ast.Lt: "less", ast.LtE: "less_equal", ast.Gt: "greater", ast.GtE: "greater_equal", ast.Eq: "equal",
        ast.NotEq: "not_equal"}
_ARITH = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide"}


def parse_where(text: str, columns: Sequence[str]):
    """A pyarrow compute expression from a small, safe expression language (parsed with ``ast``, never run)."""
    import pyarrow.compute as pc

    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise UserError(f"--where {text!r}: {e.msg}") from None

    def conv(node):
        if isinstance(node, ast.BoolOp):
            parts = [conv(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~conv(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return pc.negate(conv(node.operand))
        if isinstance(node, ast.Compare):
            out, left = None, conv(node.left)
            for op, right in zip(node.ops, node.comparators):
                if type(op) not in _CMP:
                    break
                r = conv(right)
                term = getattr(pc, _CMP[type(op)])(left, r)
                out = term if out is None else out & term
                left = r
            else:
                return out
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return getattr(pc, _ARITH[type(node.op)])(conv(node.left), conv(node.right))
        if isinstance(node, ast.Name):
            if node.id not in columns:
                raise UserError(f"--where {text!r}: no column {node.id!r} (columns: {', '.join(columns)})")
            return pc.field(node.id)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
            return pc.scalar(node.value)
        raise UserError(f"--where {text!r}: {ast.unparse(node)!r} is not allowed (columns, numbers, 'strings', "
                        "comparisons, and / or / not, + - * /)")

    return conv(tree)


# ---------------------------------------------------------------------------------------------------- filter
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


def _aggregate_by_key(table):
    """Per-sample loss tables hold a row per (step, sample) seen: one row per (source, key), the mean loss."""
    if "step" not in table.column_names:
        return table
    numeric = [c for c in table.column_names if c not in ("step", "key", "source", "shard")]
    keys = [c for c in ("source", "key", "shard") if c in table.column_names]
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
    import pyarrow.dataset as ds

    got = ds.dataset(table).to_table(columns={"m": expr}).column("m").to_numpy(zero_copy_only=False)
    return np.asarray(got, dtype=bool)


class _Histogram:
    """Per-source kept / dropped counts of the --by column over fixed bins (memory: the bins, not the rows)."""

    def __init__(self, lo: float, hi: float, bins: int = 60):
        import numpy as np

        self.edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        self.counts: Dict[str, Dict[str, "np.ndarray"]] = {}

    def add(self, values, sources, keep) -> None:
        import numpy as np

        for src in np.unique(sources):
            sel = sources == src
            c = self.counts.setdefault(str(src), {"kept": np.zeros(len(self.edges) - 1), "dropped": np.zeros(len(self.edges) - 1)})
            c["kept"] += np.histogram(values[sel & keep], self.edges)[0]
            c["dropped"] += np.histogram(values[sel & ~keep], self.edges)[0]

    def save(self, path: str, by: str, cuts: Dict, min_value, max_value) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted(self.counts) or [""]
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
        width = self.edges[1] - self.edges[0]
        for ax, src in zip(axes[:, 0], names):
            c = self.counts.get(src, {})
            for what, colour in (("kept", "tab:green"), ("dropped", "tab:red")):
                if what in c:
                    ax.bar(self.edges[:-1], c[what], width=width, align="edge", color=colour, alpha=0.65,
                           label=f"{what} ({int(c[what].sum()):,})")
            marks = [v for v in (min_value, max_value, *cuts.get(src, {}).values()) if v is not None]
            for v in marks:
                if abs(v) != float("inf"):
                    ax.axvline(v, color="black", linestyle="--", label=f"cut {v:.4g}")
            ax.set_title(f"{src or 'all'}: {by}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _shard_writer(out: str, shard_size: int):
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
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            state["tar"].addfile(info, io.BytesIO(data))
        state["n"] += 1

    return add, close, state


def _copy_kept(url: str, match: Callable[[str], Optional[Dict]], add) -> int:
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


def filter_tables(tables: Sequence[str], out: str, by: str = "score", min_value=None, max_value=None, top=None,
                  bottom=None, where: str = "", shards: str = "", root: str = "", shard_size: int = 10000,
                  name: str = "", force: bool = False, progress=None) -> Dict:
    """Select samples from score / loss tables and copy them into new shards; see the comment above."""
    import numpy as np

    from evaclip.data.tools import stats

    files = _table_files(tables)
    columns = _columns(files)
    _check_criteria(columns, by, min_value, max_value, top, bottom, where)
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"--out {out} is not empty (pass --force to replace it)")
    loss_tables = "shard" not in columns
    if loss_tables and not shards:
        raise UserError("these tables have no shard column (per-sample loss tables): pass --shards <recipe or "
                        "pattern> where the samples are")
    import pyarrow as pa

    whole = _aggregate_by_key(pa.concat_tables([_read(f) for f in files])) if loss_tables else None
    # pass 1: the --by column and the sources only
    has_by = by in (whole.column_names if whole is not None else columns)
    cuts, lo, hi = {}, 0.0, 1.0
    if has_by:
        parts = [_values_sources(whole, by)] if whole is not None else \
            [_values_sources(_read(f, [c for c in (by, "source") if c in columns]), by) for f in files]
        values, sources = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if top is not None or bottom is not None:
            cuts = _fraction_cuts(values, sources, top, bottom)
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        del values, sources, parts
    hist = _Histogram(lo, hi)
    if os.path.isdir(out) and force:
        import shutil

        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    add, close, state = _shard_writer(out, shard_size)
    total: Counter = Counter()
    kept: Counter = Counter()
    digest = hashlib.sha1()

    def selected(t):
        keep = _row_mask(t, by, min_value, max_value, cuts, where)
        if has_by:
            hist.add(*_values_sources(t, by), keep)
        srcs = t.column("source").to_pylist() if "source" in t.column_names else [""] * t.num_rows
        total.update(srcs)
        extra = [c for c in t.column_names if c not in ("key", "source", "shard", "caption", "step")]
        cols = {c: t.column(c).to_pylist() for c in extra}
        keys = t.column("key").to_pylist()
        return {(srcs[j], keys[j]): {c: cols[c][j] for c in extra} for j in np.nonzero(keep)[0]}, \
            (t.column("shard").to_pylist() if "shard" in t.column_names else None)

    def copy(url, wanted, src=None):
        by_key = {}
        for s_, k_ in wanted:
            by_key[k_] = None if k_ in by_key else (s_, k_)
        done = set()

        def match(key):
            k = (src, key) if (src, key) in wanted else by_key.get(key)
            if k is None or k in done:
                return None
            done.add(k)
            return wanted[k]
        _copy_kept(url, match, add)
        return done

    missing = 0
    if whole is None:  # pass 2, a table at a time: its rows come from the shard(s) it names
        for f in files:
            wanted, shard_col = selected(_read(f))
            for url in dict.fromkeys(shard_col):
                for k in copy(url, wanted):
                    wanted.pop(k)
                    kept[k[0]] += 1
                    digest.update(f"{k[0]}/{k[1]}\n".encode())
            missing += len(wanted)
            if progress:
                progress(1)
    else:
        wanted, _ = selected(whole)
        for src, urls in expand_sources(shards, root):
            for url in urls:
                for k in copy(url, wanted, src):
                    wanted.pop(k)
                    kept[k[0]] += 1
                    digest.update(f"{k[0]}/{k[1]}\n".encode())
                if progress:
                    progress(1)
        missing = len(wanted)
    close()
    n_kept = sum(kept.values())
    if missing:
        raise UserError(f"{missing} kept samples were not found in their shards: the tables do not match the shards"
                        f" (nothing in {out} is usable)")
    if not n_kept:
        raise UserError(f"nothing is kept by these criteria ({sum(total.values()):,} rows); nothing written")
    n_shards = len(state["counts"])
    recipe_name = name or os.path.basename(os.path.abspath(out))
    recipe = os.path.join(out, "recipe.toml")
    pattern = "{00000..%05d}.tar" % (n_shards - 1) if n_shards > 1 else "00000.tar"
    criteria = {k: v for k, v in {"by": by, "min": min_value, "max": max_value, "top": top, "bottom": bottom,
                                  "where": where or None}.items() if v is not None}
    with open(recipe, "w") as f:
        f.write(f"# Written by `evaclip data filter` from {len(files)} tables: {json.dumps(criteria)}\n"
                f"#   evaclip train <experiment> data.recipe={recipe}\n"
                f"name = {json.dumps(recipe_name)}\ndescription = {json.dumps('filtered: ' + json.dumps(criteria))}\n\n"
                f"[[source]]\nname = {json.dumps(recipe_name)}\nshards = {json.dumps(pattern)}\n"
                f"samples = {n_kept}\n")
    plot = hist.save(os.path.join(out, "histogram.png"), by, cuts, min_value, max_value) if has_by else ""
    man = stats(os.path.join(out, pattern), out=os.path.join(out, "manifest.parquet"))
    per_source = {s: {"total": total[s], "kept": kept[s], "cut": next(iter(cuts.get(s, {}).values()), min_value)}
                  for s in total}
    summary = {"kept": n_kept, "dropped": sum(total.values()) - n_kept, "shards": n_shards, "per_source": per_source,
               "criteria": criteria, "tables": len(files), "recipe": recipe, "histogram": plot,
               "manifest": man["manifest"], "keys_sha1": digest.hexdigest()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
