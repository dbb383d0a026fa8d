"""The MIM objective (EVA's): the image tower, with BEiT block masking, regresses a frozen CLIP teacher's patch
features at the masked positions (negative cosine). Images only.

No feature caching is needed (the loss has no cross-sample terms): each micro-loss is its share of the rank's mean
over masked positions, so the accumulated gradient is the step's. A non-finite loss makes non-finite gradients,
which the engine's step reports as skipped (every precision and ZeRO stage).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from evaclip.data.masking import BlockMasking
from evaclip.losses import mim_loss
from evaclip.models import create_mim_student
from evaclip.models.mim import load_teacher
from evaclip.train.objectives.base import Forward


class MimObjective:
    kind = "mim"
    uses_text = False

    def __init__(self, mim_cfg, model_cfg, variant, seed: int, precision: str, device: torch.device, log=print):
        self.cfg, self.model_cfg, self.variant, self.seed, self.device, self.log = (mim_cfg, model_cfg, variant, seed,
                                                                                    device, log)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.teacher, self.masking = None, None

    @property
    def model_extras(self) -> Dict:
        return {"mim": {"target_dim": self.teacher.width}}

    def build_model(self) -> torch.nn.Module:
        """The frozen teacher first (its width sizes the student's head), then the seed again, so the student's
        init does not depend on how the teacher was built."""
        self.teacher = load_teacher(self.cfg, self.model_cfg.trust_pickle, self.log).to(self.device)
        torch.manual_seed(self.seed)
        model = create_mim_student(self.model_cfg, self.teacher.width, self.variant)
        c = self.cfg
        self.masking = BlockMasking(model.grid, c.mask_ratio, c.min_block_patches, c.min_aspect)
        self.log(f"MIM: student {self.variant.name} ({tuple(model.grid)} patches, {self.masking.num_masked} masked), "
                 f"teacher {self.teacher.name} (width {self.teacher.width}, grid {self.teacher.grid})")
        return model

    def resume_settings(self) -> Dict:
        """The teacher's weights (a run dir's newest checkpoint changes as that run goes on): a resume that
        would regress other targets is refused."""
        return {"mim.teacher_identity": self.teacher.identity}

    def frozen_modules(self) -> list:
        return [self.teacher]

    def compile(self, model, compiler, whole_step: bool) -> None:
        """The student (image tower and regression head), one graph; the frozen teacher's forward too."""
        compiler.module("student", model)
        compiler.module("teacher", self.teacher)

    def forward_backward(self, engine, micro: List[Dict], step: int) -> Forward:
        """Per micro-batch: teacher targets (no grad), the student on the masked images, backward."""
        dev, m, v = self.device, self.cfg, self.variant
        masks = [self.masking.batch(b["key"], step, self.seed).to(dev) for b in micro]
        denom = sum(int(k.sum()) for k in masks) if m.loss_on == "masked" else sum(k.numel() for k in masks)
        total = torch.zeros((), device=dev)
        for j, (b, mask) in enumerate(zip(micro, masks)):
            img = b["image"].to(dev, non_blocking=True)
            target = self.teacher(img, v.mean, v.std, engine.model.grid, self.amp)  # [b, N, C]
            out = engine(img, mask)
            loss = mim_loss(out["pred"], target, mask if m.loss_on == "masked" else None, denom)
            engine.backward(loss, boundary=j == len(micro) - 1)
            total += loss.detach()
        return Forward(total)
