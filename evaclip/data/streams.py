"""Sample streams of a recipe's sources, deterministic in (seed, stream) and restartable from a position.

A source's shards form a sequence (resampled: drawn with replacement by a seeded RNG; epoch mode: a seeded
permutation per epoch, split by reader), grouped in blocks of ``block_shards``; a block's samples pass a shuffle
buffer seeded by the block index and drained at the block's end; the sources are mixed with the recipe's true
weights. A position (per source: block and offset in the block; the mixer's count) regenerates the same samples.
"""
from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np

from evaclip.data.recipes import Recipe
from evaclip.data.shards import ShardError, expand_pattern, is_local, iter_tar_samples

# counts that are not skip events: the samples unreadable shards should have held (for the skip fraction)
LOST_IN_SHARDS = "unreadable_shard_samples"
_MIX_CHUNK = 1024


def stream_seed(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (Python's hash() is salted per process)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


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
            rng = np.random.default_rng(stream_seed(spec.seed, "shards", self.source, *self.ident, b))
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
            self._perm_cache = np.random.default_rng(stream_seed(self.spec.seed, "epoch", self.source, epoch)).permutation(
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
            rng = random.Random(stream_seed(self.seq.spec.seed, "buffer", self.seq.source, *self.seq.ident, b))
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
            rng = np.random.default_rng(stream_seed(*self.seed_parts, "mix", chunk))
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
