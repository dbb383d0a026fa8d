"""The two-tower CLIP model: EVA image tower, text tower, learned temperature.

State-dict layout is open_clip's ``CustomTextCLIP`` (``visual.trunk.*``, ``text.*``, ``logit_scale``) except
that ``logit_scale`` has shape [1] instead of [] (DeepSpeed 0.19.8 crashes broadcasting 0-dim parameters);
``convert.py`` reshapes it on export/import.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.models.eva_vit import Eva


class ImageTower(nn.Module):
    """Holds the EVA trunk under ``trunk`` (open_clip's TimmModel layout with the head as projection)."""

    def __init__(self, trunk: Eva, image_size: int):
        super().__init__()
        self.trunk = trunk
        self.image_size = (image_size, image_size)

    def forward(self, x, drop_noise: Optional[torch.Tensor] = None):
        return self.trunk(x, drop_noise)


class CLIP(nn.Module):
    def __init__(self, visual: ImageTower, text: nn.Module, embed_dim: int,
                 init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = math.log(100),
                 init_logit_bias: Optional[float] = None, distill_dim: int = 0):
        super().__init__()
        self.visual, self.text, self.embed_dim = visual, text, embed_dim
        # distillation by feature regression to a teacher of another width: a learned map of the unit embeddings
        # into the teacher's space (training only: exports leave it out)
        self.distill_head = nn.Linear(embed_dim, distill_dim, bias=False) if distill_dim else None
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        # SigLIP's learned bias; absent for the softmax CLIP loss
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_logit_bias))) if init_logit_bias is not None else None
        self.max_logit_scale = max_logit_scale

    # -- encoders ---------------------------------------------------------------------------------------
    def encode_image(self, image, normalize: bool = True, drop_noise: Optional[torch.Tensor] = None):
        f = self.visual(image, drop_noise)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text, normalize: bool = True):
        f = self.text(text)
        return F.normalize(f, dim=-1) if normalize else f

    def logit_scale_exp(self) -> torch.Tensor:
        """exp(logit_scale), what open_clip's forward returns as ``logit_scale``, capped at exp(max_logit_scale)
        (EVA-CLIP / open_clip clamp at ln 100). Clamping in the forward keeps it correct under ZeRO, where an
        in-place clamp of the model copy would be undone by the master weights."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp()

    def forward(self, image, text, drop_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``drop_noise`` [B, N]: per-sample token-dropping scores (``PatchDropout``); None: the model's RNG."""
        out = {
            "image_features": self.encode_image(image, drop_noise=drop_noise),
            "text_features": self.encode_text(text),
            "logit_scale": self.logit_scale_exp().squeeze(0),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.squeeze(0)
        if self.distill_head is not None:
            out["image_distill"] = self.distill_head(out["image_features"])
            out["text_distill"] = self.distill_head(out["text_features"])
        return out

    # -- optimizer / engine metadata ------------------------------------------------------------------------
    def no_weight_decay(self) -> set:
        """Full names excluded from weight decay besides biases and norms (handled by ndim in optim.py)."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.trunk.{n}" for n in self.visual.trunk.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

    def tower_of(self, name: str) -> str:
        if name.startswith("visual."):
            return "visual"
        if name.startswith("text."):
            return "text"
        return "other"

    def layer_id(self, name: str) -> int:
        """Layer id within the parameter's tower (0 = embeddings, depth + 1 = head); 'other' params -> 0."""
        tower = self.tower_of(name)
        if tower == "visual":
            return self.visual.trunk.layer_id(name[len("visual.trunk."):])
        if tower == "text":
            return self.text.layer_id(name[len("text."):])
        return 0

    def num_layers(self, tower: str) -> int:
        return {"visual": self.visual.trunk.num_layers, "text": self.text.num_layers}.get(tower, 0)

    def set_grad_checkpointing(self, vision: bool = True, text: Optional[bool] = None):
        self.visual.trunk.set_grad_checkpointing(vision)
        self.text.set_grad_checkpointing(vision if text is None else text)

    def set_patch_dropout(self, rate: float):
        self.visual.trunk.set_patch_dropout(rate)

    def lock_tower(self, tower: str, unlocked_layers: int = 0):
        """Freeze a tower, leaving its last ``unlocked_layers`` layer groups (by layer id) trainable."""
        n_groups = self.num_layers(tower) + 2  # embeddings, blocks, head
        first_unlocked = n_groups - unlocked_layers
        for name, p in self.named_parameters():
            if self.tower_of(name) == tower and self.layer_id(name) < first_unlocked:
                p.requires_grad_(False)
