"""Score every sample of a recipe or shard pattern with a CLIP model: one parquet table per input shard, written
atomically when its shard is done (a rerun skips finished shards); ``--part i/n`` splits the shards."""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

from evaclip.data.samples import SkipSample, decode_sample
from evaclip.data.shards import ShardError, iter_tar_samples, shard_identity
from evaclip.data.tools import expand_sources
from evaclip.data.transforms import IMAGE_EXTS, eval_transform
from evaclip.errors import UserError
from evaclip.files import atomic_write, exclusive

SCORE_CONFIG = "score.json"
MODEL_KEY, SHARD_KEY = "evaclip.model", "evaclip.shard"  # a table's metadata: what scored what


def parse_part(spec: str) -> Tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--part {spec!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--part {spec!r}: need 0 <= I < N")
    return i, n


def this_part(part: Tuple[int, int]) -> Tuple[int, int]:
    """--part i/n combined with torchrun's RANK / WORLD_SIZE: part i * world + rank of n * world."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return part[0] * world + rank, part[1] * world


@contextlib.contextmanager
def part_workers(out: str, part: Tuple[int, int], workers: int):
    """This process's part (i, n) of the shards (``--part`` with torchrun's ranks) and its decoding threads (None:
    inline), holding the part's lock on ``out``: a second process given the same part (a repeated --part, a rank
    run twice) is refused."""
    i, n = this_part(part)
    with exclusive(os.path.join(out, f".part-{i}-of-{n}.lock"), f"--out {out} part {i}/{n}"):
        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        try:
            yield (i, n), pool
        finally:
            if pool is not None:
                pool.shutdown()


def todo(sources, part: Tuple[int, int], path_of: Callable[[str, int, str], str], res: Dict):
    """(source name, index, url, output path) of the shards of ``part`` whose output is not there yet; those that
    are (a rerun after a kill) are counted in ``res["done_before"]``."""
    i, n = part
    index = 0
    for name, urls in sources:
        for k, url in enumerate(urls):
            mine, index = index % n == i, index + 1
            if not mine:
                continue
            path = path_of(name, k, url)
            if os.path.exists(path):
                res["done_before"] += 1
                continue
            yield name, k, url, path


def table_path(out: str, source: str, index: int, url: str) -> str:
    stem = os.path.basename(url.rstrip("/"))
    stem = stem[:-len(".tar")] if stem.endswith(".tar") else stem
    return os.path.join(out, source, f"{index:06d}_{stem}.parquet")


def check_out_settings(out: str, config: Dict, name: str = SCORE_CONFIG) -> None:
    """A resumed score (or reinforce) run must use the same model and settings as the outputs already written
    (recorded in ``<out>/<name>``)."""
    path = os.path.join(out, name)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in config if old.get(k) != config[k]]
        if changed:
            raise UserError(f"{out} holds outputs written with other settings ({', '.join(changed)}: "
                            f"{[old.get(k) for k in changed]} -> {[config[k] for k in changed]}); "
                            "use a new --out folder")
        return
    os.makedirs(out, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(config, f, indent=2)


def _prepare(raw: Dict, transform) -> Tuple:
    """(image tensor, row) or (None, skip reason), with the same checks and reasons as training."""
    from PIL import Image

    try:
        img, caption = decode_sample(raw, transform, 0)
    except SkipSample as s:
        return None, s.reason
    ext = next(e for e in IMAGE_EXTS if e in raw)
    w, h = Image.open(io.BytesIO(raw[ext])).size  # the stored size (header only)
    return img, {"key": raw["__key__"], "caption": caption, "image_bytes": len(raw[ext]), "width": w, "height": h}


def _write_table(path: str, cols: Dict, source: str, url: str, skips: Dict, embed_dim: int, identity: Dict) -> None:
    """One shard's table; its metadata: the skip counts and ``identity`` (the model and the shard scored)."""
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
    table = pa.table(fields).replace_schema_metadata({"evaclip.skipped": json.dumps(skips), **identity})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "wb") as f:  # a table exists only once its shard is complete
        pq.write_table(table, f)


def score(source: str, root: str, enc, out: str, batch_size: int = 256, workers: int = 2, device: str = "cpu",
          part: Tuple[int, int] = (0, 1), embeddings: bool = False, bf16: bool = False,
          progress: Optional[Callable[[int], None]] = None) -> Dict:
    """Score this process's shards of ``source`` with ``enc`` (``evaclip.encoders.Encoders``); see the module doc."""
    import torch
    import torch.nn.functional as F

    check_out_settings(out, {"model": enc.name, "weights": enc.identity, "source": source, "root": root,
                        "image_size": enc.image_size, "embeddings": embeddings, "precision": "bf16" if bf16 else "fp32"})
    transform = eval_transform(enc.image_size, enc.mean, enc.std, interpolation=enc.interpolation)
    dev = torch.device(device)
    res = {"scored_shards": 0, "done_before": 0, "samples": 0, "skipped": Counter(), "unreadable": []}
    t0 = time.time()

    def encode(images, captions):
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            fi = F.normalize(enc.encode_image(torch.stack(images).to(dev)).float(), dim=-1)
            ft = F.normalize(enc.encode_text(enc.tokenizer(captions).to(dev)).float(), dim=-1)
        return (fi * ft).sum(-1).cpu(), fi.cpu()

    with part_workers(out, part, workers) as (mine, pool):
        for name, _, url, path in todo(expand_sources(source, root), mine,
                                       lambda nm, k, u: table_path(out, nm, k, u), res):
            shard = shard_identity(url)  # before the read: a shard replaced meanwhile does not match
            try:
                cols, skips, dim = _score_shard(url, transform, pool, encode, batch_size, embeddings, progress)
            except ShardError as e:
                res["unreadable"].append({"shard": url, "error": str(e)})  # no table: a rerun retries it
                continue
            _write_table(path, cols, name, url, dict(skips), dim, {MODEL_KEY: f"{enc.name} {enc.identity}",
                                                                  SHARD_KEY: shard})
            res["scored_shards"] += 1
            res["samples"] += len(cols["key"])
            res["skipped"].update(skips)
    res["skipped"] = dict(res["skipped"])
    res["seconds"] = time.time() - t0
    res["pairs_per_s"] = res["samples"] / max(res["seconds"], 1e-9)
    return res


def _score_shard(url: str, transform, pool, encode, batch_size: int, embeddings: bool, progress) -> tuple:
    """One shard's table columns, its skip counts and the embedding width (0 without embeddings); ShardError
    when the shard cannot be read."""
    cols = {c: [] for c in ("key", "caption", "image_bytes", "width", "height", "score", "embedding")}
    skips: Counter = Counter()
    dim = 0
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
            dim = emb.shape[1] if embeddings else 0
            if progress:
                progress(len(ok))
    return cols, skips, dim


def _with_end(it):
    """The items of ``it``, then None (so the caller flushes its last partial batch)."""
    yield from it
    yield None
