"""Loss-spike detection for self-healing runs (``[spike]`` in an experiment).

PaLM and OPT recovered from loss spikes by hand: restart from a checkpoint before the spike and skip the
data that caused it. evaclip knows its exact data position, so the trainer does it itself: a spike is the
global loss above ``median + k * MAD`` of the last ``window`` steps for ``patience`` consecutive steps (or
``max_nonfinite`` non-finite steps in a row); the trainer then restores the newest checkpoint from before
the spike, skips ``skip_samples`` of data from the spike's position on, optionally lowers the lr for a while,
and logs the event. The median / MAD pair is robust: one outlier does not move the threshold.
"""
from __future__ import annotations

import statistics
from collections import deque
from typing import Deque, List, Optional, Tuple


class SpikeDetector:
    """Feeds on (step, loss); ``observe`` returns the first step of a confirmed spike, else None."""

    def __init__(self, window: int, k_mad: float, patience: int):
        self.window, self.k, self.patience = window, k_mad, patience
        self.history: Deque[Tuple[int, float]] = deque(maxlen=window)
        self.high: List[int] = []  # consecutive steps above the threshold

    def threshold(self) -> Optional[float]:
        if len(self.history) < self.window:
            return None  # not enough history for a robust statistic yet
        losses = [x for _, x in self.history]
        med = statistics.median(losses)
        mad = statistics.median(abs(x - med) for x in losses)
        return med + self.k * max(mad, 1e-3 * abs(med), 1e-6)

    def observe(self, step: int, loss: float) -> Optional[int]:
        t = self.threshold()
        if t is not None and loss > t:
            self.high.append(step)  # spike candidates do not enter the statistic
            if len(self.high) >= self.patience:
                return self.high[0]
            return None
        self.high = []
        self.history.append((step, loss))
        return None

    def forget_from(self, step: int) -> None:
        """Drop what was seen at or after ``step`` (the run went back there)."""
        kept = [(s, x) for s, x in self.history if s < step]
        self.history.clear()
        self.history.extend(kept)
        self.high = []
