"""Self-healing bookkeeping (``[spike]``): when a run must roll back, to which checkpoints, which data to skip
afterwards and the lr scaled for a while; its state rides in every checkpoint's metadata, and a rollback is
also written to the run's ``rollbacks.json`` before training goes on (``record``), so that a crash right after
it neither resumes a checkpoint from after the spike nor forgets the rollback (``abandoned``, ``load_state_dict``).

The trainer performs a rollback (it owns the engine, the data and the logs); this module decides and remembers.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

from evaclip.checkpoint import read_meta
from evaclip.errors import TrainingStopped
from evaclip.files import atomic_write
from evaclip.train.spike import SpikeDetector

RECORD = "rollbacks.json"  # in the run dir: the healing state as of the newest rollback


class Healing:
    """Spike detection, pending rollbacks, skip windows and the post-rollback lr window of one run."""

    def __init__(self, cfg, global_batch: int):
        self.cfg, self.global_batch = cfg, global_batch
        self.detector = SpikeDetector(cfg.window, cfg.k_mad, cfg.patience) if cfg.enabled else None
        self.rollbacks: List[Dict] = []
        self.skip_windows: Dict[int, int] = {}  # step -> samples to skip when the run gets there
        self.lr_window = [0, 0, 1.0]  # [from step, until step, lr multiplier]
        self.pending: Optional[int] = None  # the first step of a spike awaiting its rollback

    def observe(self, step: int, loss: float) -> None:
        """One step's global loss; a confirmed spike becomes the pending rollback."""
        if self.detector is not None:
            first = self.detector.observe(step, loss)
            self.pending = first if first is not None else self.pending

    def nonfinite(self, step: int, in_a_row: int) -> None:
        """``in_a_row`` non-finite steps ending at ``step``: enough of them count as a spike."""
        if self.detector is not None and in_a_row >= self.cfg.max_nonfinite:
            self.pending = step - in_a_row + 1  # the first of the non-finite steps

    def lr_multiplier(self, step: int) -> Optional[float]:
        """The lr multiplier at ``step`` while a post-rollback window is open, else None."""
        lo, hi, scale = self.lr_window
        return scale if lo <= step < hi else None

    def targets(self, first: int, checkpoints: List[str], step_of: Callable[[str], Optional[int]]) -> List[str]:
        """The checkpoints a rollback from a spike at ``first`` may restore, newest first; a stop with the reason
        when the run has rolled back too often or has none from before the spike."""
        if len(self.rollbacks) >= self.cfg.max_rollbacks:
            raise TrainingStopped(f"loss spike at step {first} after {len(self.rollbacks)} rollbacks "
                                  f"(spike.max_rollbacks = {self.cfg.max_rollbacks}); stopping: look at the data and the lr")
        steps = [(p, step_of(p)) for p in checkpoints]
        before = [p for p, s in steps if s is not None and s <= first]
        if not before:
            kept = sorted(s for _, s in steps if s is not None)
            raise TrainingStopped(f"loss spike at step {first} but no checkpoint from before it to roll back to (kept: "
                                  f"{', '.join(map(str, kept)) or 'none'}): lower checkpoint.every_steps so one is "
                                  "saved between spikes, and raise checkpoint.keep_last above the checkpoints saved "
                                  "while a spike is confirmed (spike.patience steps)")
        return before

    def rolled_back(self, first: int, detected: int, to_step: int, checkpoint: str) -> Dict:
        """Record a rollback to ``to_step``: the data from ``first`` on is skipped, the lr window opens, the
        detector forgets the steps being redone; the pending rollback is done. Returns the event."""
        c = self.cfg
        self.pending = None
        skip = c.skip_samples or (detected + 1 - first) * self.global_batch
        self.skip_windows[first] = self.skip_windows.get(first, 0) + skip
        if c.lr_scale != 1.0 and c.lr_scale_steps > 0:
            self.lr_window = [first, first + c.lr_scale_steps, c.lr_scale]
        self.detector.forget_from(to_step)
        event = {"spike_step": first, "detected_step": detected, "rolled_back_to": to_step,
                 "checkpoint": checkpoint, "skip_samples": skip}
        self.rollbacks.append(event)
        return event

    def state_dict(self) -> Dict:
        return {"rollbacks": self.rollbacks, "skip_windows": {str(k): v for k, v in self.skip_windows.items()},
                "lr_window": self.lr_window}

    def load_state_dict(self, meta: Dict, run_dir: Optional[str] = None) -> None:
        """From a checkpoint's metadata (keys absent in older checkpoints keep their defaults), or from the run's
        rollback record when that knows more rollbacks (written after this checkpoint: its rollback went to it)."""
        record = read_record(run_dir) if run_dir else {}
        if len(record.get("rollbacks", [])) > len(meta.get("rollbacks", [])):
            meta = record
        self.rollbacks = list(meta.get("rollbacks", self.rollbacks))
        self.skip_windows = {int(k): v for k, v in meta.get("skip_windows", {}).items()}
        self.lr_window = list(meta.get("lr_window", self.lr_window))

    def record(self, run_dir: str) -> None:
        """Write the state with its newest rollback to the run's record, before training goes on (rank 0)."""
        with atomic_write(os.path.join(run_dir, RECORD)) as f:
            f.write(json.dumps(self.state_dict(), indent=2))


def read_record(run_dir: str) -> Dict:
    try:
        with open(os.path.join(run_dir, RECORD)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def abandoned(run_dir: str, meta: Dict) -> Optional[Dict]:
    """The recorded rollback that went back past this checkpoint without it knowing (a checkpoint of the timeline
    the rollback abandoned, as left by a crash right after it), else None."""
    known = len(meta.get("rollbacks", []))  # rollbacks only append: a checkpoint knows a prefix of the record
    for e in read_record(run_dir).get("rollbacks", [])[known:]:
        if meta.get("step", 0) > e["rolled_back_to"]:
            return e
    return None


def without_abandoned(run_dir: str, paths: List[str], log: Callable) -> List[str]:
    """The resume candidates less the checkpoints a recorded rollback abandoned (see ``abandoned``)."""
    out = []
    for p in paths:
        try:
            e = abandoned(run_dir, read_meta(p))
        except (OSError, ValueError):
            e = None  # unreadable: the load reports it
        if e is None:
            out.append(p)
        else:
            log(f"not resuming {p}: written after the loss spike at step {e['spike_step']} that the run rolled "
                f"back from (to step {e['rolled_back_to']})")
    return out
