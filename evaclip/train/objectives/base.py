"""The objective contract: what the trainer asks of an objective, so a new objective is a new file plus a registry
line (``objectives/__init__.py``), never a branch in the loop.

An objective builds its model (and whatever it needs beside it: a frozen teacher, a masking generator) and, per
optimizer step, runs the forward and backward passes of the step's micro-batches through the engine. The trainer
owns everything around that: the engine's step, skipped and overflowing steps, logging, checkpoints, rollback.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Protocol

import torch


@dataclasses.dataclass
class Forward:
    """One step's forward/backward. ``loss``: this rank's loss (detached); ``finite`` False: the loss was not
    finite on some rank and nothing was back-propagated (every rank agrees); ``metrics``: the objective's own
    (besides train/loss and train/grad_norm); ``sample_losses``: per-sample losses of this rank's rows
    (``log.sample_loss``), in the order of the micro-batches' keys."""

    loss: torch.Tensor
    finite: bool = True
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    sample_losses: Optional[torch.Tensor] = None


class Objective(Protocol):
    kind: str
    uses_text: bool  # the data pipeline tokenizes captions (False: image-only shards will do)
    model_extras: Dict  # recorded with the model to rebuild it (a MIM student's or distillation head's width)

    def build_model(self) -> torch.nn.Module:
        """The trained model, built after the run's seed is set (same init on every rank)."""

    def resume_settings(self) -> Dict:
        """What a resume must find unchanged beyond the config (e.g. the identity of a frozen teacher's weights):
        recorded in every checkpoint and compared like the config's resume settings."""

    def frozen_modules(self) -> List[torch.nn.Module]:
        """What runs beside the trained model and is never trained (a teacher): outside the engine, so never in
        the optimizer or a ZeRO partition; the trainer checks it shares no parameter with the model."""

    def compile(self, model: torch.nn.Module, compiler, whole_step: bool) -> None:
        """Compile what this objective runs with ``compiler`` (``engine.compile``): its towers, one graph each;
        with ``whole_step`` also its loss where the loss can be traced."""

    def forward_backward(self, engine, micro: List[Dict], step: int) -> Forward:
        """Forward and backward over the micro-batches of optimizer step ``step`` (0-based), through ``engine``;
        the last backward is the accumulation boundary."""
