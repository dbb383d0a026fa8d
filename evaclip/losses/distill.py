"""Distillation from a frozen teacher CLIP (``objective.kind = "distill"``), added to the contrastive loss.

soft_ce  the cross-entropy of the student's similarity distribution over the global batch to the teacher's, per
         row, image -> text and text -> image, averaged (open_clip's ``DistillClipLoss``; Hinton et al. 2015):
             L_i = -sum_j p^T_ij log p^S_ij,  p^S = softmax_j(s a_i.b_j),  p^T = softmax_j(tau c_i.d_j)
         with s the student's learned scale and tau the teacher's (or 1 / distill.temperature). Its impls are
         the contrastive loss's: naive and local build this rank's b x G rows of both; tiled and ring never do
         (the teacher's logits are made tile by tile; in the ring its features travel with the student's).
cosine   per sample, 1 - cos(student embedding, teacher embedding), image and text averaged.
mse      per sample, |student - teacher|^2 of the unit embeddings, image and text averaged.
The feature losses compare a sample with itself only: nothing is gathered.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.dist import all_gather_with_grad
from evaclip.losses.dense import soft_ce_local
from evaclip.losses.ring import soft_ce_ring
from evaclip.losses.tiled import soft_ce_tiled

KINDS = ("soft_ce", "cosine", "mse")


def feature_loss(kind: str, img, txt, t_img, t_txt, rows: Optional[list] = None) -> torch.Tensor:
    """This rank's mean feature-regression loss of unit embeddings [b, D] to the teacher's (``rows``: per sample)."""
    def per(a, t):
        cdt = torch.promote_types(a.dtype, torch.float32)  # bf16 features: computed in fp32; float64 kept
        a, t = F.normalize(a.to(cdt), dim=-1), F.normalize(t.to(cdt), dim=-1)
        return 1 - (a * t).sum(-1) if kind == "cosine" else (a - t).pow(2).sum(-1)

    both = (per(img, t_img) + per(txt, t_txt)) / 2
    if rows is not None:
        rows.append(both.detach())
    return both.mean()


class DistillLoss(nn.Module):
    """The distillation term of one rank (``kind`` one of ``KINDS``; ``impl`` as ``loss.impl``)."""

    def __init__(self, kind: str = "soft_ce", impl: str = "local", tile_size: int = 4096):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"distill.loss must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.impl, self.tile_size = kind, impl, tile_size

    def forward(self, img, txt, scale, t_img, t_txt, t_scale, rows: Optional[list] = None) -> torch.Tensor:
        """Student features [b, D] (unit, with grad), the teacher's [b, Dt] (unit, no grad), both scales."""
        if self.kind != "soft_ce":
            return feature_loss(self.kind, img, txt, t_img, t_txt, rows)
        t_scale = torch.as_tensor(t_scale, dtype=img.dtype, device=img.device)
        t_img, t_txt = t_img.to(img.dtype), t_txt.to(img.dtype)
        if self.impl == "ring":
            return soft_ce_ring(img, txt, t_img, t_txt, scale, t_scale, self.tile_size, rows=rows)
        gathered = [all_gather_with_grad(x) for x in (img, txt, t_img, t_txt)]
        if self.impl == "tiled":
            return soft_ce_tiled(img, txt, gathered[0], gathered[1], t_img, t_txt, gathered[2], gathered[3], scale,
                                 t_scale, self.tile_size, rows)
        # naive as local: the full G x G on every rank would give the same value and gradients at W times the cost
        return soft_ce_local(img, txt, gathered[0], gathered[1], t_img, t_txt, gathered[2], gathered[3], scale,
                             t_scale, rows)
