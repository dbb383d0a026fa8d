"""Step-based schedules as pure functions (no optimizer state): lr multiplier and patch-dropout rate."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, name: str = "cosine", min_ratio: float = 0.0,
              cooldown_steps: int = 0) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine / constant / const+cooldown."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "const_cooldown":
        start = total_steps - cooldown_steps
        if cooldown_steps <= 0 or step < start:
            return 1.0
        frac = (step - start) / max(1, cooldown_steps)
        return 1.0 - (1.0 - min_ratio) * min(1.0, frac)
    if name == "cosine":
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {name!r}")


def patch_dropout_at(step: int, rate: float, unmasked_from_step: int) -> float:
    """FLIP: train with token dropping, then tune unmasked (rate 0) for the last steps."""
    return 0.0 if step >= unmasked_from_step else rate


class LrScheduler:
    """Sets ``lr = base_lr * lr_scale * factor(step)`` on every group (per-tower, layer-decayed groups)."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, name: str = "cosine",
                 min_ratio: float = 0.0, cooldown_steps: int = 0):
        self.optimizer = optimizer
        self.kw = dict(total_steps=total_steps, warmup_steps=warmup_steps, name=name, min_ratio=min_ratio,
                       cooldown_steps=cooldown_steps)

    def set_step(self, step: int) -> float:
        f = lr_factor(step, **self.kw)
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("base_lr", g["lr"]) * g.get("lr_scale", 1.0) * f
        return f
