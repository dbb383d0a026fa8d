"""The training input pipeline for image-text webdataset shards, as an explicit list of stages.

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
  7. transform       RandomResizedCrop + normalise; the augmentation RNG is re-seeded per batch
  8. tokenize, batch ``micro_batch_size`` samples -> {image, text, key, source, __state__}

Bounded: a worker that assembles no batch within ``batch_timeout_s`` (every sample skipped, shards that
never end) stops with a message naming the worker, the shards it is reading and its skip counts.

Restart safety: each batch carries its worker's position (per source: block and offset in the block;
the mixer's sample count; batches emitted) and skip counters. The trainer keeps the position of the last
batch it consumed from each worker (``DataState``) and checkpoints it; a restarted worker regenerates the
block it was in and fast-forwards to the offset without decoding, then continues with exactly the samples
the uninterrupted run would have seen. Neither EVA-CLIP nor open_clip can do this.
"""
from __future__ import annotations

import atexit
import copy
import hashlib
import random
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from evaclip.data.recipes import Recipe
from evaclip.errors import TrainingStopped
from evaclip.data.shards import ShardError, expand_pattern, is_local, iter_tar_samples
from evaclip.data.transforms import IMAGE_EXTS, decode_image

SKIP_REASONS = ("decode_error", "missing_image", "missing_caption", "empty_caption", "unreadable_shard",
                "truncated_shard")
# counts that are not skip events: the samples unreadable shards should have held (for the skip fraction)
LOST_IN_SHARDS = "unreadable_shard_samples"
_MIX_CHUNK = 1024


def _seed(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (Python's hash() is salted per process)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class StreamSpec:
    """What a worker needs to build its streams (picklable; no open files)."""

    urls: List[List[str]]  # per source
    names: List[str]
    weights: List[float]
    seed: int
    rank: int
    world_size: int
    resampled: bool = True
    shuffle_buffer: int = 1000
    block_shards: int = 4
    epochs: int = 0  # epoch mode only: stop after this many passes (0: infinite, what training uses)
    expected_per_shard: Optional[List[float]] = None  # per source, from the recipe's sample counts (0: unknown)
    batch_timeout_s: float = 0.0  # a worker that yields no batch for this long stops the run (0: no bound)
    num_streams: int = 0  # logical streams (see ImageTextStream); 0: one stream per (rank, worker)
    step_samples: int = 0  # with num_streams: the samples of one global batch (what one data step takes)


class ShardSequence:
    """Deterministic, infinite sequence of shard urls for one (source, rank, worker), in blocks."""

    def __init__(self, urls: List[str], spec: StreamSpec, source: int, worker: int, num_workers: int,
                 stream: Optional[int] = None):
        self.urls, self.spec, self.source, self.worker = urls, spec, source, worker
        if stream is None:  # one stream per (rank, worker)
            self.ident = (spec.rank, worker)
            self.global_worker = spec.rank * num_workers + worker
            self.total_workers = spec.world_size * num_workers
        else:  # logical stream ``stream`` of ``spec.num_streams``: the same shards whoever reads it
            self.ident = ("stream", stream)
            self.global_worker, self.total_workers = stream, spec.num_streams
        self._perm_epoch, self._perm_cache = -1, None  # epoch mode: this epoch's shard permutation
        if spec.resampled and spec.epochs:
            raise ValueError("a finite number of epochs needs epoch mode (resampled = false)")
        if not spec.resampled and len(urls) < self.total_workers:
            raise ValueError(
                f"source {spec.names[source]!r}: {len(urls)} shards for {self.total_workers} rank x worker streams; "
                "use data.resampled = true (shards drawn with replacement) or fewer workers")

    def block(self, b: int) -> List[str]:
        n, bs, spec = len(self.urls), self.spec.block_shards, self.spec
        if spec.resampled:
            rng = np.random.default_rng(_seed(spec.seed, "shards", self.source, *self.ident, b))
            return [self.urls[i] for i in rng.integers(0, n, size=bs)]
        g, total = self.global_worker, self.total_workers
        mine = len(range(g, n, total))
        out = []
        for k in range(b * bs, (b + 1) * bs):
            epoch, idx = divmod(k, mine)
            if spec.epochs and epoch >= spec.epochs:
                break
            out.append(self.urls[self._perm(epoch)[g + idx * total]])
        return out

    def _perm(self, epoch: int):
        if self._perm_epoch != epoch:  # one permutation of all shards per epoch, cached
            self._perm_epoch = epoch
            self._perm_cache = np.random.default_rng(_seed(self.spec.seed, "epoch", self.source, epoch)).permutation(
                len(self.urls))
        return self._perm_cache


class SourceStream:
    """Raw samples of one source for one worker: shard blocks -> tar samples -> seeded shuffle buffer."""

    MAX_CONSECUTIVE_FAILURES = 1000

    def __init__(self, seq: ShardSequence, counts: Counter, block: int = 0, offset: int = 0):
        self.seq, self.counts = seq, counts
        self.block, self.offset = block, offset  # position: `offset` samples of `block` already emitted
        self._replay_until = (block, offset)
        self.successes, self.consecutive_failures = 0, 0
        self.failed_urls: set = set()
        self.current_url, self.read_from_good = "", 0

    def _replaying(self, block: int, emitted: int) -> bool:
        return (block, emitted) < self._replay_until

    def _raw_block(self, b: int, urls: List[str], emitted_ref: List[int]) -> Iterator[Dict]:
        for url in urls:
            got = 0
            self.current_url = url
            try:
                for sample in iter_tar_samples(url):
                    got += 1
                    yield sample
            except ShardError as e:
                if got:  # truncated: what was read before the damage was used; one partial sample lost
                    if not self._replaying(b, emitted_ref[0]):
                        self.counts["truncated_shard"] += 1
                    self._on_success(got)
                    continue
                if not self._replaying(b, emitted_ref[0]):
                    self.counts["unreadable_shard"] += 1
                    self.counts[LOST_IN_SHARDS] += self._expected_samples()
                self._on_failure(url, e)
                continue
            if got:
                self._on_success(got)

    def _on_success(self, got: int) -> None:
        self.successes += 1
        self.read_from_good += got
        self.consecutive_failures = 0

    def _expected_samples(self) -> int:
        """Samples an unreadable shard should have held: the recipe's count per shard, else the mean so far."""
        spec = self.seq.spec
        known = (spec.expected_per_shard or [0] * len(spec.urls))[self.seq.source]
        if known > 0:
            return max(1, round(known))
        return max(1, round(self.read_from_good / self.successes)) if self.successes else 1

    def _on_failure(self, url: str, err: Exception) -> None:
        self.consecutive_failures += 1
        self.failed_urls.add(url)
        name = self.seq.spec.names[self.seq.source]
        if self.successes == 0 and (len(self.failed_urls) >= len(set(self.seq.urls)) or self.consecutive_failures >= 50):
            raise RuntimeError(f"data source {name!r}: every shard tried is unreadable "
                               f"({len(self.failed_urls)} distinct, last: {err})")
        if self.consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"data source {name!r}: {self.consecutive_failures} consecutive shards failed "
                               f"(last: {err})")

    def __iter__(self) -> Iterator[Dict]:
        size = self.seq.spec.shuffle_buffer
        while True:
            b = self.block
            urls = self.seq.block(b)
            if not urls:
                return  # a finite (epochs > 0) stream is done
            rng = random.Random(_seed(self.seq.spec.seed, "buffer", self.seq.source, *self.seq.ident, b))
            emitted = [0]
            buf: List[Dict] = []
            for sample in self._raw_block(b, urls, emitted):
                if len(buf) < size:
                    buf.append(sample)
                    continue
                i = rng.randrange(len(buf))
                out, buf[i] = buf[i], sample
                yield from self._emit(b, emitted, out)
            while buf:  # drain at the block's end
                out = buf.pop(rng.randrange(len(buf)))
                yield from self._emit(b, emitted, out)
            self.block, self.offset = b + 1, 0

    def _emit(self, b: int, emitted: List[int], sample: Dict):
        emitted[0] += 1
        if self._replaying(b, emitted[0] - 1):
            return  # fast-forward after a restart: already consumed before the checkpoint
        self.offset = emitted[0]
        yield sample


class MixedStream:
    """Draws each sample's source with the recipe weights (seeded in chunks, so the position is a count)."""

    def __init__(self, streams: List[SourceStream], weights: List[float], seed_parts: tuple, n: int = 0):
        self.streams, self.weights, self.seed_parts, self.n = streams, np.asarray(weights), seed_parts, n

    def __iter__(self):
        iters = [iter(s) for s in self.streams]
        while True:
            chunk, start = divmod(self.n, _MIX_CHUNK)
            rng = np.random.default_rng(_seed(*self.seed_parts, "mix", chunk))
            choice = rng.choice(len(self.streams), size=_MIX_CHUNK, p=self.weights)
            for k in range(start, _MIX_CHUNK):
                src = int(choice[k])
                try:
                    sample = next(iters[src])
                except StopIteration:
                    return  # finite streams end with their first exhausted source
                self.n += 1
                yield src, sample

    def state(self) -> Dict:
        return {"mixed": self.n, "sources": [[s.block, s.offset] for s in self.streams]}


def decode_sample(raw: Dict, transform, min_side: int, captions: bool = True):
    """(image tensor, caption) or SkipSample(reason); ``captions=False`` (MIM): images only, caption None."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image")
    caption = None
    if captions:
        if "txt" not in raw:
            raise SkipSample("missing_caption")
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SkipSample("missing_caption") from None
        if not caption:
            raise SkipSample("empty_caption")
    try:
        img = decode_image(raw[ext], min_side)
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise SkipSample("decode_error") from None
    return transform(img), caption


def stream_share(step_samples: int, num_streams: int, stream: int) -> int:
    """Samples logical stream ``stream`` gives every data step: the global batch spread as evenly as it goes."""
    return step_samples // num_streams + (1 if stream < step_samples % num_streams else 0)


def owned_streams(num_streams: int, world_size: int, rank: int, num_workers: int, worker: int) -> List[int]:
    """The logical streams a (rank, worker) reads: rank r owns l = r mod W, its workers every N-th of those."""
    return list(range(rank, num_streams, world_size))[worker::num_workers]


def check_streams(num_streams: int, step_samples: int, world_size: int, num_workers: int) -> Optional[str]:
    """Why ``num_streams`` logical streams cannot serve this topology (None: they can): every rank must get
    exactly its share of the global batch from its streams, and every worker at least one stream."""
    per_rank, left = divmod(step_samples, world_size)
    if left:
        return f"the global batch {step_samples} does not split over {world_size} ranks"
    for r in range(world_size):
        mine = range(r, num_streams, world_size)
        got = sum(stream_share(step_samples, num_streams, x) for x in mine)
        if got != per_rank:
            return f"rank {r}'s {len(mine)} streams give {got} samples a step, not its {per_rank}"
        if len(mine) < num_workers:
            return f"rank {r} has {len(mine)} streams for {num_workers} workers"
    return None


NO_CAPTION_LIMIT = 64  # samples without a caption before a stream with no usable one is called image-only


class ImageTextStream(IterableDataset):
    """Infinite, restart-safe stream of training batches for one rank (see the module docstring).
    ``tokenizer=None``: images only (masked image modeling); batches then have no ``text``."""

    def __init__(self, spec: StreamSpec, micro_batch_size: int, transform, tokenizer, min_side: int = 0):
        super().__init__()
        self.spec, self.micro_batch_size = spec, micro_batch_size
        self.transform, self.tokenizer, self.min_side = transform, tokenizer, min_side
        self.resume: Dict[int, Dict] = {}  # stream id -> state, set before iterating
        self.offset = 0  # stream served by DataLoader worker 0 (see set_state)
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
                torch.manual_seed(_seed(spec.seed, "aug", spec.rank, worker, batches))
                images, texts, keys, sources = [], [], [], []
                started, seen = time.monotonic(), bool(per_source)
                while len(images) < self.micro_batch_size:
                    usable = self._usable(it, counts, streams, worker, started, len(images), seen)
                    if usable is None:
                        break  # finite stream: a last, short batch
                    src, raw, img, cap = usable
                    seen = True
                    images.append(img)
                    texts.append(cap)
                    keys.append(raw["__key__"])
                    sources.append(spec.names[src])
                    per_source[spec.names[src]] += 1
            if not images:
                return
            batches += 1
            batch = {"text": self.tokenizer(texts)} if self.tokenizer is not None else {}
            yield {
                "image": torch.stack(images),
                **batch,
                "key": keys,
                "source": sources,
                "__state__": {"worker": worker, "num_workers": num_workers, "batches": batches,
                              "stream": mixed.state(), "counts": dict(counts), "per_source": dict(per_source)},
            }

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
            images, texts, keys, names, ids = [], [], [], [], []
            started, seen = time.monotonic(), any(v[3] for v in streams.values())
            with torch.random.fork_rng(devices=[]):  # per-sample seeds (see _usable); the caller's RNG is left alone
                for lid in mine:
                    mixed, it, counts, per_source, sources = streams[lid]
                    need, got = stream_share(spec.step_samples, spec.num_streams, lid), 0
                    while got < need:
                        usable = self._usable(it, counts, sources, worker, started, len(images), seen, aug_step=step)
                        if usable is None:
                            break  # finite stream: a last, short piece
                        src, raw, img, cap = usable
                        seen = True
                        images.append(img)
                        texts.append(cap)
                        keys.append(raw["__key__"])
                        names.append(spec.names[src])
                        ids.append(lid)
                        per_source[spec.names[src]] += 1
                        got += 1
            if not images:
                return
            step += 1
            batch = {"text": self.tokenizer(texts)} if self.tokenizer is not None else {}
            yield {
                "image": torch.stack(images),
                **batch,
                "key": keys,
                "source": names,
                "stream_id": ids,
                "__state__": {"worker": worker, "num_workers": num_workers, "step": step,
                              "streams": {lid: {"stream": v[0].state(), "counts": dict(v[2]), "per_source": dict(v[3])}
                                          for lid, v in streams.items()}},
            }

    def _usable(self, it, counts: Counter, sources, worker: int, started: float, have: int, seen: bool,
                aug_step: Optional[int] = None):
        """The next usable sample of one stream, (source index, raw, image, caption), or None when a finite stream
        ends; unusable samples are skipped and counted. Stops the run past ``data.batch_timeout_s`` (``started``:
        when the batch began, ``have``: its samples so far), or when a stream's first samples all lack a caption
        and this worker has ``seen`` none usable yet (image-only shards under CLIP). ``aug_step`` (logical
        streams): the augmentation is seeded from (seed, data step, key)."""
        spec = self.spec
        while True:
            if spec.batch_timeout_s and time.monotonic() - started > spec.batch_timeout_s:
                raise TrainingStopped(self._stalled(worker, sources, counts, have))
            try:
                src, raw = next(it)
            except StopIteration:
                return None
            if aug_step is not None:  # the CPU generator only (torch.manual_seed also seeds every device: 75 us)
                torch.default_generator.manual_seed(_seed(spec.seed, "aug", aug_step, raw["__key__"]))
            try:
                img, cap = decode_sample(raw, self.transform, self.min_side, self.tokenizer is not None)
            except SkipSample as s:
                counts[s.reason] += 1
                if s.reason == "missing_caption" and counts[s.reason] >= NO_CAPTION_LIMIT and not seen:
                    raise TrainingStopped(self._no_captions(worker, sources, counts[s.reason])) from None
                continue
            return src, raw, img, cap

    def _no_captions(self, worker: int, sources, n: int) -> str:
        return (f"rank {self.spec.rank} worker {worker}: the first {n} samples of "
                f"{', '.join(st.current_url or '-' for st in sources)} have no caption (.txt): image-only shards; "
                "CLIP training needs image-text pairs (for masked image modeling of the image tower set "
                "objective.kind = 'mim')")

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


def build_stream_spec(recipe: Recipe, root: str, seed: int, rank: int, world_size: int, resampled: bool,
                      shuffle_buffer: int, block_shards: int = 4, batch_timeout_s: float = 0.0,
                      num_streams: int = 0, step_samples: int = 0) -> StreamSpec:
    """Expand and check the recipe's sources in the main process (clear errors before workers start)."""
    urls = []
    for s in recipe.source:
        u = expand_pattern(s.shards, root)
        if not u:
            raise ValueError(f"data source {s.name!r}: pattern {s.shards!r} expands to no shards")
        local = [x for x in u if is_local(x)]
        if local and len(local) == len(u):
            import os

            if not any(os.path.exists(x) for x in local):
                raise FileNotFoundError(f"data source {s.name!r}: none of its {len(u)} shards exist "
                                        f"(first: {u[0]}); check data.root / the recipe pattern")
        urls.append(u)
    return StreamSpec(urls=urls, names=[s.name for s in recipe.source], weights=recipe.weights(), seed=seed,
                      rank=rank, world_size=world_size, resampled=resampled, shuffle_buffer=shuffle_buffer,
                      block_shards=block_shards, batch_timeout_s=batch_timeout_s, num_streams=num_streams,
                      step_samples=step_samples,
                      expected_per_shard=[s.samples / len(u) if s.samples > 0 else 0.0
                                          for s, u in zip(recipe.source, urls)])


def worker_init(_worker_id: int) -> None:
    """DataLoader workers leave signals to the main process and die with it.

    SIGTERM / SIGINT sent to the whole process group (``timeout``, Slurm, Ctrl-C) must not kill the workers
    before the main process has checkpointed; and a worker must not outlive a main process killed with -9
    (Linux: the parent-death signal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BatchLoader(DataLoader):
    """A DataLoader whose workers are always stopped, whatever ends their iterator.

    Our workers ignore SIGTERM (``worker_init``), and torch's own shutdown relies on SIGTERM as its fallback:
    it asks each worker to leave (a None on its index queue), waits 5 s, then terminates the ones still
    there. A worker that missed the request (busy past the wait, or the message lost when the queue was
    closed) would poll for ever, and at interpreter exit multiprocessing would SIGTERM it and wait for it
    for ever. So every iterator's shutdown ends with SIGKILL for any worker still alive, and an exit hook
    stops whatever iterators are still referenced when the interpreter exits."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        it = _StoppingIterator(self)
        _LIVE_ITERATORS.add(it)
        return it


class _StoppingIterator(_MultiProcessingDataLoaderIter):
    def _shutdown_workers(self):
        try:
            super()._shutdown_workers()
        finally:
            _kill_left_workers(self)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _kill_left_workers(it) -> None:
    """SIGKILL the workers of ``it`` that are still alive (after torch's shutdown, or instead of it at exit)."""
    workers = [w for w in (getattr(it, "_workers", None) or []) if w.is_alive()]
    if not workers:
        return
    if getattr(it, "_worker_pids_set", False):  # stop torch's SIGCHLD check from reporting them as failures
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        _remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in workers:
        w.kill()
        w.join(timeout=10)


def stop_workers(it) -> None:
    """Stop a loader iterator's workers now (close_data; the exit hook). At exit torch's part of the shutdown
    is a no-op; ``_StoppingIterator`` then kills the workers itself."""
    if isinstance(it, _StoppingIterator):  # an iterator without workers has nothing to stop
        _LIVE_ITERATORS.discard(it)
        it._shutdown_workers()


@atexit.register  # registered after torch's exit hook, so it runs before it (atexit runs last-in first-out)
def _stop_all_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        try:
            stop_workers(it)
        except Exception:  # noqa: BLE001 - best effort at exit; never block the interpreter's shutdown
            pass


def make_loader(stream: ImageTextStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches; workers are polled round-robin, so the batch order is deterministic.

    It gets its own generator: creating an iterator draws a base seed, which must not consume the global
    RNG (that would shift patch-dropout masks after a resume). With a batch time bound, the loader's own
    timeout backs up the workers' (a read that blocks in I/O cannot check the time itself)."""
    gen = torch.Generator().manual_seed(_seed(stream.spec.seed, "loader", stream.spec.rank))
    bound = stream.spec.batch_timeout_s
    return BatchLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, generator=gen,
                      persistent_workers=False, prefetch_factor=2 if workers > 0 else None,
                      worker_init_fn=worker_init if workers > 0 else None,
                      timeout=(2 * bound + 30) if workers > 0 and bound else 0)
