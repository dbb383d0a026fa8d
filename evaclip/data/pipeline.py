"""The training input pipeline for image-text webdataset shards, as an explicit list of stages: stages 1-5 are
``data.streams``, 6 ``data.samples``, 7-8 and the batch state here; which logical streams a worker reads is
``data.topology``, the DataLoader and its workers ``data.loader``.

Per DataLoader worker (one stream per rank x worker, all deterministic in (seed, rank, worker)):

  1. shard list      ``expand_pattern`` of each source's brace pattern (local, ``pipe:``, URLs)
  2. shard sequence  resampled: shards drawn with replacement by a seeded RNG, so every rank/worker gets
                     data however few shards there are; epoch mode: a seeded permutation per epoch, split
                     by (rank, worker). Shards are grouped in blocks of ``block_shards``.
  3. tar -> samples  ``iter_tar_samples``: members grouped by key; an unreadable shard is counted (and, for
                     the skip fraction, by the samples it should have held), a truncated one too (the samples
                     read before the damage are kept)
  4. shuffle buffer  per block, seeded by the block index, drained at the block's end
  5. mix sources     each sample's source drawn with the recipe's true weights (e.g. 80/20 by samples)
  6. decode          PIL (JPEG draft mode); a missing image/caption, empty caption or undecodable image is
                     skipped and counted per reason
  7. transform       RandomResizedCrop + normalise; the augmentation RNG is re-seeded per batch. A reinforced
                     sample (`evaclip data reinforce`) takes one of its stored crops instead, drawn from that RNG,
                     and brings the teacher's embeddings of it
  8. tokenize, batch ``micro_batch_size`` samples -> {image, text, key, source, shard, __state__}

Bounded: a worker that assembles no batch within ``batch_timeout_s`` (every sample skipped, shards that
never end) stops with a message naming the worker, the shards it is reading and its skip counts.

Restart safety: each batch carries its worker's position (per source: block and offset in the block;
the mixer's sample count; batches emitted) and skip counters. The trainer keeps the position of the last
batch it consumed from each worker (``DataState``) and checkpoints it; a restarted worker regenerates the
block it was in and fast-forwards to the offset without decoding, then continues with exactly the samples
the uninterrupted run would have seen. Neither EVA-CLIP nor open_clip can do this.
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Dict, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from evaclip.data.samples import KD_MEMBER, SKIP_REASONS, SkipSample, decode_reinforced, decode_sample
from evaclip.data.shards import shard_identity
from evaclip.data.streams import (LOST_IN_SHARDS, MixedStream, ShardSequence, SourceStream, StreamSpec,
                                  stream_seed)
from evaclip.data.topology import owned_streams, stream_share
from evaclip.errors import TrainingStopped


UNUSABLE_LIMIT = 64  # unusable samples in a row, none usable yet, before a stream is called broken (one cause
# named: no caption -> image-only shards); past the first usable one, data.batch_timeout_s and the skip fraction


class ImageTextStream(IterableDataset):
    """Infinite, restart-safe stream of training batches for one rank (see the module docstring).
    ``tokenizer=None``: images only (masked image modeling); batches then have no ``text``."""

    def __init__(self, spec: StreamSpec, micro_batch_size: int, transform, tokenizer, min_side: int = 0,
                 stored_crop=None):
        super().__init__()
        self.spec, self.micro_batch_size = spec, micro_batch_size
        self.transform, self.tokenizer, self.min_side = transform, tokenizer, min_side
        self.stored_crop = stored_crop  # (image, crop) -> tensor: a reinforced sample's stored augmentation
        self.resume: Dict[int, Dict] = {}  # stream id -> state, set before iterating
        self.offset = 0  # stream served by DataLoader worker 0 (see set_state)
        self._identities: Dict[str, str] = {}  # shard url -> shard_identity, per worker
        self.step = 0  # logical streams: data steps already served (see set_state)

    def set_state(self, worker_states: Optional[Dict[int, Dict]]) -> None:
        """Resume from ``DataState.state_dict()``. The DataLoader polls its workers round-robin starting at
        worker 0, so worker i serves stream (i + offset) % W, where offset is the stream that was next in
        line when the state was taken: the batch order continues exactly."""
        self.resume = {int(k): v for k, v in (worker_states or {}).items()}
        if self.resume and self.spec.num_streams:  # logical streams: states per stream, at a step boundary
            if not all(st.get("logical") for st in self.resume.values()):
                raise RuntimeError("this resume state was written without logical data streams; resume it with "
                                   "the evaclip version that wrote it")
            self.step = next(iter(self.resume.values()))["step"]
        elif self.resume:
            if any(st.get("logical") for st in self.resume.values()):
                raise RuntimeError("this resume state holds logical data streams; set data.streams as it was")
            w = next(iter(self.resume.values()))["num_workers"]
            self.offset = sum(st["batches"] for st in self.resume.values()) % w

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.spec.num_streams:
            yield from self._iter_logical(worker, num_workers)
            return
        worker = (worker + self.offset) % num_workers  # the stream this DataLoader worker serves
        spec = self.spec
        st = self.resume.get(worker)
        if st is not None and st.get("num_workers", num_workers) != num_workers:
            raise RuntimeError(f"resume state was written with {st['num_workers']} workers per rank, "
                               f"this run has {num_workers}; keep data.workers unchanged to resume")
        counts: Counter = Counter(st["counts"]) if st else Counter()
        pos = st["stream"] if st else {"mixed": 0, "sources": [[0, 0]] * len(spec.urls)}
        streams = [SourceStream(ShardSequence(urls, spec, i, worker, num_workers), counts, *pos["sources"][i])
                   for i, urls in enumerate(spec.urls)]
        mixed = MixedStream(streams, spec.weights, (spec.seed, spec.rank, worker), n=pos["mixed"])
        batches = st["batches"] if st else 0
        per_source = Counter(st.get("per_source", {})) if st else Counter()
        it = iter(mixed)
        while True:
            # fork_rng: the augmentation RNG is re-seeded per batch (deterministic crops on resume) without
            # touching the global RNG of the main process when workers = 0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stream_seed(spec.seed, "aug", spec.rank, worker, batches))
                rows = self._rows()
                started, seen = time.monotonic(), bool(per_source)
                while len(rows["image"]) < self.micro_batch_size:
                    usable = self._usable(it, counts, streams, worker, started, len(rows["image"]), seen)
                    if usable is None:
                        break  # finite stream: a last, short batch
                    seen = True
                    self._take(usable, rows, per_source)
            if not rows["image"]:
                return
            batches += 1
            yield self._batch(rows,
                              {"worker": worker, "num_workers": num_workers, "batches": batches,
                               "stream": mixed.state(), "counts": dict(counts), "per_source": dict(per_source)})

    def _iter_logical(self, worker: int, num_workers: int):
        """Logical streams: one piece per data step, ``stream_share`` samples from each stream this worker owns;
        the trainer joins its workers' pieces into the rank's share of the global batch. Streams are seeded by
        (seed, stream), augmentation by (seed, data step, key): the samples of global batch s and their crops do
        not depend on the number of ranks, workers, micro-batches or accumulation steps."""
        spec = self.spec
        mine = owned_streams(spec.num_streams, spec.world_size, spec.rank, num_workers, worker)
        if not mine:
            raise RuntimeError(f"rank {spec.rank} worker {worker} owns none of the {spec.num_streams} data streams: "
                               "use fewer data.workers or more data.streams")
        streams = {}
        for lid in mine:
            st = self.resume.get(lid)
            counts: Counter = Counter(st["counts"]) if st else Counter()
            pos = st["stream"] if st else {"mixed": 0, "sources": [[0, 0]] * len(spec.urls)}
            sources = [SourceStream(ShardSequence(urls, spec, i, worker, num_workers, stream=lid), counts,
                                    *pos["sources"][i]) for i, urls in enumerate(spec.urls)]
            mixed = MixedStream(sources, spec.weights, (spec.seed, "stream", lid), n=pos["mixed"])
            streams[lid] = (mixed, iter(mixed), counts, Counter(st["per_source"]) if st else Counter(), sources)
        step = self.step
        while True:
            rows, ids = self._rows(), []
            started, seen = time.monotonic(), any(v[3] for v in streams.values())
            with torch.random.fork_rng(devices=[]):  # per-sample seeds (see _usable); the caller's RNG is left alone
                for lid in mine:
                    mixed, it, counts, per_source, sources = streams[lid]
                    need, got = stream_share(spec.step_samples, spec.num_streams, lid), 0
                    while got < need:
                        usable = self._usable(it, counts, sources, worker, started, len(rows["image"]), seen,
                                              aug_step=step)
                        if usable is None:
                            break  # finite stream: a last, short piece
                        seen = True
                        self._take(usable, rows, per_source)
                        ids.append(lid)
                        got += 1
            if not rows["image"]:
                return
            step += 1
            yield self._batch(rows,
                              {"worker": worker, "num_workers": num_workers, "step": step,
                               "streams": {lid: {"stream": v[0].state(), "counts": dict(v[2]),
                                                 "per_source": dict(v[3])} for lid, v in streams.items()}},
                              stream_ids=ids)

    @staticmethod
    def _rows() -> Dict[str, list]:
        return {"image": [], "text": [], "key": [], "source": [], "shard": [], "kd": []}

    def _take(self, usable, rows: Dict[str, list], per_source: Counter) -> None:
        """Add one usable sample (source index, raw, image, caption, teacher targets) to the batch being assembled; ``shard`` is
        its shard's identity (size and sampled digest, "" when remote): what per-sample loss tables record, so
        that `data filter --shards` copies a sample only out of the shard the run read it from."""
        src, raw, img, cap, kd = usable
        rows["kd"].append(kd)
        url = raw.get("__url__", "")
        if url not in self._identities:
            self._identities[url] = shard_identity(url) if url else ""
        for k, v in zip(("image", "text", "key", "source", "shard"),
                        (img, cap, raw["__key__"], self.spec.names[src], self._identities[url])):
            rows[k].append(v)
        per_source[self.spec.names[src]] += 1

    def _batch(self, rows: Dict[str, list], state: Dict, stream_ids=None) -> Dict:
        """The one batch layout both stream modes yield: images, tokens (CLIP), keys, sources, shard identities,
        the teacher's targets when every sample carries them (reinforced shards: kd_image, kd_text, kd_scale,
        kd_teacher), the logical stream of each sample (logical streams), and the worker's position."""
        batch = {"image": torch.stack(rows["image"])}
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(rows["text"])
        batch.update(key=rows["key"], source=rows["source"], shard=rows["shard"])
        if rows["kd"] and all(kd is not None for kd in rows["kd"]):  # reinforced shards: the teacher's targets
            batch["kd_image"] = torch.stack([kd["image"] for kd in rows["kd"]])
            batch["kd_text"] = torch.stack([kd["text"] for kd in rows["kd"]])
            batch["kd_scale"] = torch.tensor([kd["scale"] for kd in rows["kd"]])
            batch["kd_teacher"] = [kd["teacher"] for kd in rows["kd"]]
        if stream_ids is not None:
            batch["stream_id"] = stream_ids
        batch["__state__"] = state
        return batch

    def _usable(self, it, counts: Counter, sources, worker: int, started: float, have: int, seen: bool,
                aug_step: Optional[int] = None):
        """The next usable sample of one stream, (source index, raw, image, caption, teacher targets or None), or None when a finite stream
        ends; unusable samples are skipped and counted. Stops the run past ``data.batch_timeout_s`` (``started``:
        when the batch began, ``have``: its samples so far), or after ``UNUSABLE_LIMIT`` unusable samples in a row
        while this worker has ``seen`` none usable yet (undecodable images, image-only shards under CLIP). ``aug_step`` (logical
        streams): the augmentation is seeded from (seed, data step, key)."""
        spec, in_a_row = self.spec, 0
        while True:
            if spec.batch_timeout_s and time.monotonic() - started > spec.batch_timeout_s:
                raise TrainingStopped(self._stalled(worker, sources, counts, have))
            try:
                src, raw = next(it)
            except StopIteration:
                return None
            if aug_step is not None:  # the CPU generator only (torch.manual_seed also seeds every device: 75 us)
                torch.default_generator.manual_seed(stream_seed(spec.seed, "aug", aug_step, raw["__key__"]))
            try:
                kd = None
                if KD_MEMBER in raw and self.stored_crop is not None:  # reinforced: one of its stored augmentations
                    img, cap, kd = decode_reinforced(raw, self.stored_crop, self.tokenizer is not None)
                else:
                    img, cap = decode_sample(raw, self.transform, self.min_side, self.tokenizer is not None)
            except SkipSample as s:
                counts[s.reason] += 1
                in_a_row += 1
                if in_a_row >= UNUSABLE_LIMIT and not seen:
                    raise TrainingStopped(self._unusable(worker, sources, counts, in_a_row, s.reason)) from None
                continue
            return src, raw, img, cap, kd

    def _unusable(self, worker: int, sources, counts: Counter, n: int, reason: str) -> str:
        head = (f"rank {self.spec.rank} worker {worker}: the first {n} samples of "
                f"{', '.join(st.current_url or '-' for st in sources)}")
        if reason == "missing_caption" and counts[reason] >= n:
            return (f"{head} have no caption (.txt): image-only shards; CLIP training needs image-text pairs (for "
                    "masked image modeling of the image tower set objective.kind = 'mim')")
        skips = {k: v for k, v in counts.items() if v and k != LOST_IN_SHARDS}
        return f"{head} are all unusable (skipped: {skips}); `evaclip data verify` on them says why"

    def _stalled(self, worker: int, streams, counts: Counter, have: int) -> str:
        spec = self.spec
        shards = ", ".join(f"{spec.names[i]}: {st.current_url or '-'}" for i, st in enumerate(streams))
        skips = {k: v for k, v in counts.items() if v and k != LOST_IN_SHARDS}
        return (f"no batch from rank {spec.rank} worker {worker} within {spec.batch_timeout_s:g} s "
                f"({have} of {self.micro_batch_size} usable samples; skipped so far: {skips or 'none'}); reading "
                f"{shards}. Check the shards (`evaclip data verify`) or raise data.batch_timeout_s")


class DataState:
    """Main-process record of the position of the last batch consumed from each worker of this rank (with
    logical streams: of each logical stream this rank reads)."""

    def __init__(self, initial: Optional[Dict[int, Dict]] = None):
        self.workers: Dict[int, Dict] = {int(k): v for k, v in (initial or {}).items()}

    def update(self, batch_state: Dict) -> None:
        if "streams" in batch_state:  # logical streams: one entry per stream (``workers`` is keyed by stream)
            for lid, st in batch_state["streams"].items():
                self.workers[int(lid)] = dict(copy.deepcopy(st), step=batch_state["step"], logical=True)
        else:
            self.workers[batch_state["worker"]] = copy.deepcopy(batch_state)

    def state_dict(self) -> Dict[int, Dict]:
        return copy.deepcopy(self.workers)

    def skip_counts(self) -> Dict[str, int]:
        total: Counter = Counter()
        for st in self.workers.values():
            total.update(st["counts"])
        return {k: total.get(k, 0) for k in SKIP_REASONS}

    def lost_samples(self) -> int:
        """Samples the skip fraction counts as lost: skipped ones, unreadable shards by their expected size."""
        total: Counter = Counter()
        for st in self.workers.values():
            total.update(st["counts"])
        return sum(v for k, v in total.items() if k in SKIP_REASONS and k != "unreadable_shard") + \
            total.get(LOST_IN_SHARDS, 0)

    def samples(self) -> int:
        return sum(sum(st["per_source"].values()) for st in self.workers.values())

    def per_source(self) -> Dict[str, int]:
        total: Counter = Counter()
        for st in self.workers.values():
            total.update(st["per_source"])
        return dict(total)
