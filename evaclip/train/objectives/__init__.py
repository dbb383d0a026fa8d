"""Training objectives, one file each behind one contract (``base.Objective``): ``clip`` (contrastive image-text),
``distill`` (clip plus distillation from a frozen teacher CLIP), ``coca`` (clip plus a caption decoder) and ``mim`` (masked image modeling against a frozen
CLIP teacher). ``build_objective`` picks one by ``objective.kind`` and hands it its own config sections."""
from __future__ import annotations

import torch

from evaclip.train.objectives.base import Forward, Objective
from evaclip.train.objectives.clip import ClipObjective
from evaclip.train.objectives.coca import CocaObjective
from evaclip.train.objectives.distill import DistillObjective
from evaclip.train.objectives.mim import MimObjective

__all__ = ["Forward", "Objective", "ClipObjective", "CocaObjective", "DistillObjective", "MimObjective", "build_objective"]

# objective.kind -> builder(cfg, variant, device, log): a new objective is a file and a line here
OBJECTIVES = {
    "clip": lambda cfg, variant, device, log: ClipObjective(cfg.model, variant, cfg.loss, cfg.run.seed,
                                                            cfg.log.sample_loss, device),
    "mim": lambda cfg, variant, device, log: MimObjective(cfg.mim, cfg.model, variant, cfg.run.seed,
                                                          cfg.engine.precision, device, log),
    "distill": lambda cfg, variant, device, log: DistillObjective(cfg.distill, cfg.model, variant, cfg.loss,
                                                                  cfg.run.seed, cfg.log.sample_loss,
                                                                  cfg.engine.precision, device, log),
    "coca": lambda cfg, variant, device, log: CocaObjective(cfg.coca, cfg.model, variant, cfg.loss, cfg.run.seed,
                                                            cfg.log.sample_loss, device),
}


def build_objective(cfg, variant, device: torch.device, log=print) -> Objective:
    return OBJECTIVES[cfg.objective.kind](cfg, variant, device, log)
