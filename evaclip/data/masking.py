"""Block-wise masking for masked image modeling (BEiT, arXiv 2106.08254, section 2.2; used by EVA and EVA-02).

Blocks of random area (at least ``min_patches``) and log-uniform aspect ratio are placed at random until the
target count is reached; a block may overlap earlier ones but never adds more than the patches still
missing. BEiT's generator can stop short when ten placements in a row add nothing; here the last few
patches are then drawn one by one, so every image has exactly ``round(ratio * N)`` masked patches (the MIM
loss is then a mean over equal counts on every rank, which keeps it exact under data parallelism).

Masks are a function of (seed, step, sample key) only, not of a rank's or worker's RNG: the same sample at
the same step gets the same mask on any number of ranks, and a resumed run draws the masks it would have.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence, Tuple

import numpy as np
import torch


class BlockMasking:
    """``BlockMasking(grid=(14, 14), ratio=0.4)(rng) -> bool [14, 14]`` with exactly round(0.4 * 196) True."""

    def __init__(self, grid: Tuple[int, int], ratio: float, min_patches: int = 4, min_aspect: float = 0.3,
                 attempts: int = 10):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.height, self.width = grid
        self.num_masked = int(round(ratio * self.height * self.width))
        self.min_patches = min_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.attempts = attempts

    def _block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Place one block adding 1..budget new patches; returns how many it added (0: no placement found)."""
        for _ in range(self.attempts):
            area = rng.uniform(min(self.min_patches, budget), budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top, left = int(rng.integers(0, self.height - h + 1)), int(rng.integers(0, self.width - w + 1))
            window = mask[top:top + h, left:left + w]
            new = int(h * w - window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        if count < self.num_masked:  # exact count: the rest one by one among the unmasked patches
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, self.num_masked - count, replace=False)] = True
        return mask

    def batch(self, keys: Sequence[str], step: int, seed: int) -> torch.Tensor:
        """Masks [B, N] (bool, row-major patch order) for the samples ``keys`` at optimizer step ``step``."""
        out = np.stack([self(sample_rng(seed, step, k)).reshape(-1) for k in keys])
        return torch.from_numpy(out)


def sample_rng(seed: int, step: int, key: str, purpose: str = "mim") -> np.random.Generator:
    """A generator that depends on (seed, step, sample key, purpose) alone: per-sample randomness (MIM masks,
    token-dropping masks) that does not change with the batch, micro-batch, rank or worker a sample is in."""
    return np.random.default_rng([seed & 0xFFFFFFFF, step, zlib.crc32(key.encode()), zlib.crc32(purpose.encode())])
