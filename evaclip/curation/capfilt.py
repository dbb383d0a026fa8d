"""BLIP's CapFilt over shards (Li et al. 2022): a captioner writes K synthetic captions per image (nucleus sampling),
a CLIP scores the original caption and the synthetic ones against the image, and a rule keeps some of them.

    evaclip data capfilt '/data/{00000..00099}.tar' --captioner runs/coca --out clean/ --keep best

Rules (``--keep``): ``best`` the caption of highest score among the original and the synthetic ones; ``original``
the original when its score is at least ``--threshold``, else the best synthetic one (BLIP's filter of web text,
with a synthetic caption in place of a dropped one); ``both`` the original and the best synthetic caption, each
kept when its score is at least ``--threshold``, as two samples (``<key>`` and ``<key>_syn``; a sample neither
passes is dropped). The scorer is the captioner's own contrastive half unless ``--scorer`` names another CLIP.

One output shard per input shard, ``<out>/<source>/<index>.tar``: every member of a kept sample copied byte for byte
but ``.txt`` (the kept caption), plus ``capfilt.json`` (the original and every synthetic caption with its score,
and which was kept; a sample's own ``.json`` stays as it was). A shard is published whole when done (a rerun skips
finished shards; ``--part i/n`` and torchrun ranks split them); ``capfilt.json`` at the top records the settings
(a rerun with others is refused); once every shard is there, ``recipe.toml`` and ``manifest.parquet``. The
synthetic captions are drawn per batch from (seed, shard, batch): a rerun with the same batch size writes the
same shards.
"""
from __future__ import annotations

import itertools
import json
import os
import tarfile
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

from evaclip.curation.publish import publish_parts
from evaclip.curation.score import check_out_settings, part_workers, todo
from evaclip.data.samples import SkipSample, decode_sample
from evaclip.data.shard_writer import add_sample, shard_path, write_stats
from evaclip.data.shards import ShardError, iter_tar_samples
from evaclip.data.streams import stream_seed
from evaclip.data.tools import expand_sources, source_weights
from evaclip.data.transforms import eval_transform
from evaclip.errors import UserError
from evaclip.files import replace_file

SETTINGS, MEMBER = "capfilt.json", "capfilt.json"
RULES = ("best", "original", "both")


def capfilt(source: str, root: str, captioner, scorer, out: str, settings: Dict, batch_size: int = 64,
            workers: int = 2, part: Tuple[int, int] = (0, 1), progress: Optional[Callable[[int], None]] = None) -> Dict:
    """Caption and filter this process's shards of ``source``: ``captioner`` an ``evaclip.captioning.Captioner``,
    ``scorer`` an ``evaclip.encoders.Encoders``; ``settings``: captions (K), top_p, keep, threshold, seed and the
    identities of both models (what a rerun must share)."""
    if settings["keep"] not in RULES:
        raise UserError(f"--keep must be one of {', '.join(RULES)}, got {settings['keep']!r}")
    try:
        sources, weights = expand_sources(source, root), source_weights(source)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    check_out_settings(out, dict(settings, source=source, root=root), SETTINGS)
    res = {"shards": 0, "done_before": 0, "samples": 0, "written": 0, "kept": Counter(), "skipped": Counter(),
           "unreadable": []}
    t0 = time.time()
    judge = _Judge(captioner, scorer, settings)
    with part_workers(out, part, workers) as (mine, pool):
        for name, k, url, path in todo(sources, mine, lambda n, i, u: shard_path(out, n, i), res):
            try:
                counts = _capfilt_shard(url, path, judge, pool, batch_size, (name, k), progress)
            except ShardError as e:
                res["unreadable"].append({"shard": url, "error": str(e)})  # no output: a rerun retries it
                continue
            res["shards"] += 1
            for key in ("samples", "written"):
                res[key] += counts.pop(key)
            res["skipped"].update(counts.pop("skipped"))
            res["kept"].update(counts)
    res["kept"], res["skipped"] = dict(res["kept"]), dict(res["skipped"])
    res["recipe"] = publish_parts(out, sources, weights, SETTINGS, "CapFilt: captions kept by a CLIP's scores, "
                                  "synthetic ones from a captioner", "capfilt")
    res["seconds"] = time.time() - t0
    return res


class _Judge:
    """A batch's synthetic captions, every candidate's score, and what the rule keeps."""

    def __init__(self, captioner, scorer, settings: Dict):
        self.cap, self.enc, self.s = captioner, scorer, settings
        e = scorer
        self.transform = eval_transform(e.image_size, e.mean, e.std, interpolation=e.interpolation)

    def prepare(self, raw: Dict):
        """(PIL image, original caption) or (None, skip reason): the checks and reasons of training."""
        try:
            return decode_sample(raw, lambda im: im, 0)
        except SkipSample as e:
            return None, e.reason

    def __call__(self, images: List, originals: List[str], seed: int) -> List[Dict]:
        import torch
        import torch.nn.functional as F

        k = self.s["captions"]
        synthetic = [self.cap.caption(images, "top_p", self.s["max_len"], top_p=self.s["top_p"], seed=seed + j)
                     for j in range(k)]  # k lists of len(images)
        texts = [t for i, o in enumerate(originals) for t in [o] + [synthetic[j][i] for j in range(k)]]
        dev = self.cap.device
        with torch.no_grad():
            fi = F.normalize(self.enc.encode_image(torch.stack([self.transform(im) for im in images]).to(dev)).float(), dim=-1)
            ft = F.normalize(self.enc.encode_text(self.enc.tokenizer(texts).to(dev)).float(), dim=-1)
        scores = (ft.view(len(images), k + 1, -1) * fi[:, None]).sum(-1).cpu().tolist()  # [B, 1 + K] cosines
        return [self._decide(texts[i * (k + 1):(i + 1) * (k + 1)], scores[i]) for i in range(len(images))]

    def _decide(self, texts: List[str], scores: List[float]) -> Dict:
        """The record of one sample: its candidates, their scores, and the kept captions ([(text, which)])."""
        best = max(range(1, len(texts)), key=lambda j: scores[j])  # the best synthetic caption
        rule, th = self.s["keep"], self.s["threshold"]
        if rule == "best":
            j = 0 if scores[0] >= scores[best] else best
            kept = [(texts[j], "original" if j == 0 else "synthetic")]
        elif rule == "original":
            kept = [(texts[0], "original")] if scores[0] >= th else [(texts[best], "synthetic")]
        else:
            kept = [(t, w) for t, w, sc in ((texts[0], "original", scores[0]), (texts[best], "synthetic", scores[best]))
                    if sc >= th]
        return {"original": {"text": texts[0], "score": scores[0]},
                "synthetic": [{"text": t, "score": s} for t, s in zip(texts[1:], scores[1:])],
                "kept": [w for _, w in kept], "captions": [t for t, _ in kept]}


def _capfilt_shard(url: str, path: str, judge: _Judge, pool, batch_size: int, shard: Tuple[str, int],
                   progress) -> Dict:
    """Write ``path`` (under a temporary name, renamed when complete) from ``url``; the shard's counts."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, counts, skips = path + ".tmp", Counter(), Counter()
    with tarfile.open(tmp, "w") as tar:
        samples = iter_tar_samples(url)
        for batch_index in itertools.count():
            chunk = list(itertools.islice(samples, batch_size))  # streamed: a shard is never held whole
            if not chunk:
                break
            prepared = list(pool.map(judge.prepare, chunk)) if pool else [judge.prepare(r) for r in chunk]
            ok = [(r, p) for r, p in zip(chunk, prepared) if p[0] is not None]
            skips.update(p[1] for p in prepared if p[0] is None)
            counts["samples"] += len(chunk)
            if ok:
                seed = stream_seed(judge.s["seed"], "capfilt", f"{shard[0]}/{shard[1]}/{batch_index}") % (2 ** 31)
                for (r, _), rec in zip(ok, judge([p[0] for _, p in ok], [p[1] for _, p in ok], seed)):
                    counts.update(rec["kept"] or ["dropped"])
                    _write(tar, r, rec, counts)
            if progress:
                progress(len(chunk))
    write_stats(path, counts["written"], skips)
    replace_file(tmp, path)
    return dict(counts, skipped=skips)


def _write(tar, raw: Dict, rec: Dict, counts: Counter) -> None:
    """The kept caption(s) of one sample as samples of the output shard."""
    record = json.dumps({k: rec[k] for k in ("original", "synthetic", "kept")}).encode()
    members = {e: v for e, v in raw.items() if not e.startswith("__") and e not in ("txt", MEMBER)}
    for text, which in zip(rec["captions"], rec["kept"]):
        key = raw["__key__"] + ("_syn" if which == "synthetic" and len(rec["kept"]) > 1 else "")
        add_sample(tar, key, dict(members, txt=text.encode(), **{MEMBER: record}))
        counts["written"] += 1
