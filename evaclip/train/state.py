"""The loop's own state: the step and the samples seen, which a checkpoint's meta carries, and the streaks of
non-finite steps and fp16 overflows, which start again at zero from a loaded checkpoint (a resume or a rollback).

The other parts a checkpoint carries keep their own ``state_dict`` / ``load_state_dict``: the engine's weights and
optimizer (``evaclip.engine``), this rank's data position (``train.data``), the rollbacks and skip windows
(``train.healing``); ``Trainer.save`` puts them together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # global samples trained on (step x global batch, rollbacks undone)
    bad_steps: int = 0  # consecutive non-finite steps
    overflows: int = 0  # consecutive fp16 loss-scale overflows

    def advance(self, global_batch: int) -> None:
        """One optimizer step over ``global_batch`` samples done."""
        self.step += 1
        self.samples_seen += global_batch

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, meta: Dict) -> None:
        self.step, self.samples_seen = int(meta["step"]), int(meta["samples_seen"])
        self.bad_steps = self.overflows = 0
