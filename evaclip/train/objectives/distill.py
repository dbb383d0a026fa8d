"""The distillation objective: CLIP's contrastive loss on the true pairs plus a frozen teacher CLIP's knowledge
(``[distill]``): the soft cross-entropy of the student's similarity distributions over the global batch to the
teacher's (open_clip's distillation task), or each sample's embeddings regressed to the teacher's.

It is the CLIP objective with a teacher: the same feature caching over micro-batches (the teacher's features of
the step are computed once, without grad, and concatenated like the student's), the same towers, token dropping
(the teacher sees every patch) and engines. The teacher lives outside the engine: never in the optimizer, never
in a ZeRO partition, never in train mode.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from evaclip.data.transforms import make_tokenizer, reframe
from evaclip.encoders import Encoders, load_encoders
from evaclip.errors import ConfigError, UserError
from evaclip.losses.distill import DistillLoss
from evaclip.train.objectives.clip import ClipObjective

PROBE = "a photo of a dog, 3 cats and a 🐈 on a red sofa."  # tokenised by both: the tokenizers must agree


def load_teacher_clip(cfg, trust_pickle: bool, device: torch.device) -> Encoders:
    """The teacher ``distill.teacher`` names (``cfg`` is the ``[distill]`` section), frozen, read weights-only."""
    src = cfg.teacher
    try:
        if src.startswith("open_clip:"):
            enc = load_encoders(model=src, pretrained=cfg.teacher_weights, device=str(device), trust_pickle=trust_pickle)
        elif os.path.isfile(os.path.join(src, "open_clip_config.json")):
            enc = load_encoders(model="open_clip:export", pretrained=src, device=str(device), trust_pickle=trust_pickle)
        elif os.path.exists(src):
            enc = load_encoders(checkpoint=src, device=str(device), trust_pickle=trust_pickle)
        else:
            raise UserError(f"{src} does not exist (an evaclip run dir or checkpoint, an export folder, or "
                            "open_clip:<name>)")
    except UserError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    enc.module.requires_grad_(False)
    enc.module.eval()
    return enc


class DistillObjective(ClipObjective):
    kind = "distill"

    def __init__(self, distill_cfg, model_cfg, variant, loss_cfg, seed: int, per_sample: bool, precision: str,
                 device: torch.device, log=print):
        super().__init__(model_cfg, variant, loss_cfg, seed, per_sample, device)
        self.cfg, self.log = distill_cfg, log
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.distill_fn = DistillLoss(distill_cfg.loss, loss_cfg.impl, loss_cfg.tile_size)
        self.teacher: Optional[Encoders] = None
        self.parts: Dict[str, torch.Tensor] = {}

    def build_model(self) -> torch.nn.Module:
        """The frozen teacher first (checked against the student: same tokens, widths for a feature loss), then
        the seed again, so the student's init does not depend on how the teacher was built."""
        t, v = load_teacher_clip(self.cfg, self.model_cfg.trust_pickle, self.device), self.variant
        mine = make_tokenizer(v.context_length, self.model_cfg.text.kind, self.model_cfg.text.hf_path)
        if not torch.equal(torch.as_tensor(mine([PROBE])), torch.as_tensor(t.tokenizer([PROBE])).to(torch.long)):
            raise ConfigError(f"distill.teacher {t.name} tokenizes captions unlike the student {v.name} (its text "
                              "tokenizer or context length differs): the batch's tokens are the student's")
        if self.cfg.loss != "soft_ce":  # (a learned projection between widths is not built yet)
            width = self._teacher_width(t)
            if width != v.embed_dim:
                raise ConfigError(f"distill.loss = {self.cfg.loss!r} regresses embeddings: the teacher's are "
                                  f"{width} wide, the student's {v.embed_dim}; use distill.loss = 'soft_ce'")
        self.teacher = t
        self.log(f"distill: teacher {t.name} ({t.pretrained or 'run'}), {self.cfg.loss} x {self.cfg.weight}, "
                 f"teacher scale {self.teacher_scale():.2f}")
        torch.manual_seed(self.seed)
        return super().build_model()

    def _teacher_width(self, t: Encoders) -> int:
        with torch.no_grad():
            return int(t.encode_text(torch.as_tensor(t.tokenizer([PROBE])).to(self.device)).shape[-1])

    def teacher_scale(self) -> float:
        return 1.0 / self.cfg.temperature if self.cfg.temperature > 0 else self.teacher.logit_scale

    def resume_settings(self) -> Dict:
        return {"distill.teacher_identity": self.teacher.identity}

    @torch.no_grad()
    def targets(self, micro: Dict) -> Dict[str, torch.Tensor]:
        """The teacher's unit embeddings of the micro-batch (its own preprocessing of the student's images)."""
        t, v, dev = self.teacher, self.variant, self.device
        x = reframe(micro["image"].to(dev, non_blocking=True), v.mean, v.std, t.mean, t.std, t.image_size)
        with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            img, txt = t.encode_image(x), t.encode_text(micro["text"].to(dev, non_blocking=True))
        return {"image": F.normalize(img.float(), dim=-1), "text": F.normalize(txt.float(), dim=-1)}

    def loss(self, out, targets, rows: Optional[list] = None) -> torch.Tensor:
        c = self.cfg
        parts = {"clip": [] if rows is not None else None, "distill": [] if rows is not None else None}
        kd = self.distill_fn(out["image_features"], out["text_features"], out["logit_scale"], targets["image"],
                             targets["text"], self.teacher_scale(), rows=parts["distill"])
        total, self.parts = c.weight * kd, {"train/distill_loss": kd.detach()}
        if c.clip_weight:
            hard = super().loss(out, None, parts["clip"])
            total = total + c.clip_weight * hard
            self.parts["train/clip_loss"] = hard.detach()
        if rows is not None:
            rows.append(c.weight * parts["distill"][0] + (c.clip_weight * parts["clip"][0] if c.clip_weight else 0))
        return total

    def step_metrics(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self.parts.items()}
