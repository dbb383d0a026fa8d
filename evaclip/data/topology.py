"""Logical data streams over ranks and workers: which streams a (rank, worker) reads, and what each gives a step.

A run fixes its number of logical streams; each data step takes the global batch from them, spread as evenly as
it goes. Rank r owns the streams l = r mod W and hands them to its workers in turn, so the samples of a step do not
depend on the number of ranks or workers, only on the streams (what makes an elastic resume exact).
"""
from __future__ import annotations

from typing import List, Optional


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
