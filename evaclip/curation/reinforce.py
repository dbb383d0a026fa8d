"""Dataset reinforcement (MobileCLIP, Vasu et al. 2024): new shards whose samples carry a frozen teacher's unit
embeddings of K augmentations of each image and of its caption (float16), with the crops that reproduce the
augmentations exactly, so a distillation run reads them (``distill.source = "shards"``) instead of running the
teacher every step.

    evaclip data reinforce '/data/{00000..00099}.tar' --teacher runs/big_clip --augmentations 10 --out kd/

One output shard per input shard, ``<out>/<source>/<index>.tar``: every member of a sample copied byte for byte,
plus ``kd.npy`` (``evaclip.data.samples.KD_MEMBER``). A shard is published whole when done (a rerun skips finished
shards; ``--part i/n`` and torchrun ranks split them); ``reinforce.json`` records the teacher (source, weights
identity, logit scale, width) and the augmentation settings, and a rerun with others is refused. Once every shard
is there: ``recipe.toml`` (train on it with ``data.recipe=<out>/recipe.toml``) and ``manifest.parquet``.
The crops are drawn per sample from (seed, key), so they do not depend on the part or batch a sample is in.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

from evaclip.curation.publish import publish_parts
from evaclip.curation.score import check_out_settings, part_workers, todo
from evaclip.data.samples import KD_MEMBER, SkipSample, decode_sample
from evaclip.data.shard_writer import add_sample, shard_path, write_stats
from evaclip.data.shards import ShardError, iter_tar_samples
from evaclip.data.streams import stream_seed
from evaclip.data.tools import expand_sources, source_weights
from evaclip.data.transforms import crop_view, draw_crops
from evaclip.errors import UserError
from evaclip.files import replace_file

SETTINGS = "reinforce.json"


def reinforce(source: str, root: str, enc, teacher: str, out: str, augmentations: int = 10,
              crop_scale: Tuple[float, float] = (0.9, 1.0), hflip: bool = False, seed: int = 0,
              batch_size: int = 64, workers: int = 2, device: str = "cpu", part: Tuple[int, int] = (0, 1),
              bf16: bool = False, progress: Optional[Callable[[int], None]] = None) -> Dict:
    """Reinforce this process's shards of ``source`` with the teacher ``enc`` (``evaclip.encoders.Encoders``,
    loaded from ``teacher``); see the module docstring."""
    try:
        sources, weights = expand_sources(source, root), source_weights(source)
    except ValueError as e:  # e.g. a {root} pattern without --root
        raise UserError(f"{source}: {e}") from None
    teacher = teacher if teacher.startswith("open_clip:") else os.path.abspath(teacher)
    settings = {"teacher": teacher, "teacher_identity": enc.identity, "teacher_name": enc.name,
                "teacher_scale": enc.logit_scale, "teacher_image_size": enc.image_size, "augmentations": augmentations,
                "crop_scale": list(crop_scale), "hflip": hflip, "seed": seed, "source": source, "root": root,
                "precision": "bf16" if bf16 else "fp32"}
    check_out_settings(out, settings, SETTINGS)
    res = {"shards": 0, "done_before": 0, "samples": 0, "skipped": Counter(), "unreadable": [], "settings": settings}
    t0 = time.time()
    view = _Views(enc, settings, device, bf16)
    with part_workers(out, part, workers) as (mine, pool):
        for _, _, url, path in todo(sources, mine, lambda name, k, u: shard_path(out, name, k), res):
            try:
                count, skips = _reinforce_shard(url, path, view, pool, batch_size, progress)
            except ShardError as e:
                res["unreadable"].append({"shard": url, "error": str(e)})  # no output: a rerun retries it
                continue
            res["shards"] += 1
            res["samples"] += count
            res["skipped"].update(skips)
    res["skipped"] = dict(res["skipped"])
    res["recipe"] = publish_parts(out, sources, weights, SETTINGS, "reinforced: a teacher's embeddings of K augmentations per sample", "reinforce")
    res["seconds"] = time.time() - t0
    res["samples_per_s"] = res["samples"] / max(res["seconds"], 1e-9)
    return res


class _Views:
    """A sample's K crops and the teacher's embeddings of them and of its caption."""

    def __init__(self, enc, settings: Dict, device: str, bf16: bool):
        self.enc, self.s, self.bf16 = enc, settings, bf16
        import torch

        self.dev = torch.device(device)

    def prepare(self, raw: Dict):
        """(views [K, 3, S, S], crops, caption) or (None, skip reason, None): the checks and reasons of training."""
        import torch

        try:
            img, caption = decode_sample(raw, lambda im: im, 0)  # full size: the crops' pixels
        except SkipSample as e:
            return None, e.reason, None
        gen = torch.Generator().manual_seed(stream_seed(self.s["seed"], "reinforce", raw["__key__"]))
        crops = draw_crops(img, self.s["augmentations"], self.s["crop_scale"], self.s["hflip"], gen)
        e = self.enc
        views = torch.stack([crop_view(img, c, e.image_size, e.mean, e.std, e.interpolation) for c in crops])
        return views, crops, caption

    def embed(self, views: List, captions: List[str]):
        """Unit image embeddings [B, K, D] and text embeddings [B, D], float16 numpy."""
        import torch
        import torch.nn.functional as F

        b, k = len(views), views[0].shape[0]
        with torch.no_grad(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            fi = self.enc.encode_image(torch.cat(views).to(self.dev)).float()
            ft = self.enc.encode_text(self.enc.tokenizer(captions).to(self.dev)).float()
        fi, ft = F.normalize(fi, dim=-1), F.normalize(ft, dim=-1)
        return fi.reshape(b, k, -1).cpu().half().numpy(), ft.cpu().half().numpy()

    def record(self, image, text, crops) -> bytes:
        """The sample's KD_MEMBER: one record (a 0-d structured array; what ``np.load`` reads, no pickle)."""
        import numpy as np

        teacher = self.s["teacher_identity"]
        dtype = np.dtype([("image", np.float16, image.shape), ("text", np.float16, text.shape),
                          ("boxes", np.int32, (len(crops), 5)), ("teacher", f"U{max(1, len(teacher))}"),
                          ("scale", np.float32)])
        rec = np.zeros((), dtype)
        rec["image"], rec["text"], rec["boxes"], rec["teacher"], rec["scale"] = (image, text, crops, teacher,
                                                                                  self.s["teacher_scale"])
        buf = io.BytesIO()
        np.lib.format.write_array(buf, rec, allow_pickle=False)
        return buf.getvalue()


def _reinforce_shard(url: str, path: str, view: _Views, pool, batch_size: int, progress) -> Tuple[int, Counter]:
    """Write ``path`` (under a temporary name, renamed when complete) from ``url``; (samples written, skips)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, skips, count = path + ".tmp", Counter(), 0
    with tarfile.open(tmp, "w") as tar:
        chunk: List[Dict] = []
        for raw in _with_end(iter_tar_samples(url)):
            if raw is not None:
                chunk.append(raw)
            if not chunk or (len(chunk) < batch_size and raw is not None):
                continue
            prepared = list(pool.map(view.prepare, chunk)) if pool else [view.prepare(r) for r in chunk]
            ok = [(r, p) for r, p in zip(chunk, prepared) if p[0] is not None]
            skips.update(p[1] for p in prepared if p[0] is None)
            chunk = []
            if not ok:
                continue
            images, texts = view.embed([p[0] for _, p in ok], [p[2] for _, p in ok])
            for (r, (_, crops, _)), im, tx in zip(ok, images, texts):
                members = {e: v for e, v in r.items() if not e.startswith("__") and e != KD_MEMBER}
                members[KD_MEMBER] = view.record(im, tx, crops)
                add_sample(tar, r["__key__"], members)
            count += len(ok)
            if progress:
                progress(len(ok))
    write_stats(path, count, skips)
    replace_file(tmp, path)
    return count, skips


def _with_end(it):
    yield from it
    yield None
