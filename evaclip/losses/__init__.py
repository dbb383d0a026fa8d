"""Contrastive losses over the global batch.

CLIP (InfoNCE, Radford et al. 2021): with G pairs, logits = s * I @ T^T, loss = (CE(logits) + CE(logits^T)) / 2,
averaged over the G rows. Four implementations with the same value and gradients:

  naive  gathers all features and builds the G x G logits on every rank (the reference).
  local  each rank builds only its b x G rows (image->text and text->image), labels offset by rank*b;
         with all-gather-with-grad and the engine's gradient averaging this is exactly the gradient of
         the global mean loss (open_clip's ``local_loss`` + ``gather_with_grad``).
  tiled  like local, but never materialises b x G: rows and columns are processed in tiles with an
         online log-sum-exp, and a custom backward recomputes each tile (O(tile^2) memory); this is what
         makes 100k+ global batches fit (bench: ``make bench``).
  ring   nothing is gathered: each rank keeps its b rows, the other ranks' blocks travel around the ring
         (point-to-point, overlapped with the tiles) and the column gradients travel back the same way;
         per-rank memory O(b x D + tile^2) whatever G: million-sample batches (Inf-CL, Cheng et al. 2024).

SigLIP (Zhai et al. 2023): sum over pairs of -log sigmoid(z_ij (s x.y + bias)), z = +1 on the diagonal,
per rank over its b rows x G columns, normalised by b. naive and local build the b x G logits; tiled and
ring never do (``impl`` as for CLIP).

MIM (EVA / EVA-02, ``objective.kind = "mim"``): ``mim_loss``, the negative cosine similarity to a teacher's
patch features on the masked positions.

Modules: ``dense`` (naive, local, SigLIP's), ``tiles`` (the shared tile kernels), ``tiled``, ``ring``; here the
``ContrastiveLoss`` module that picks one by ``loss.impl`` and ``mim_loss``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.dist import all_gather_with_grad, rank
from evaclip.losses.dense import clip_loss_local, clip_loss_naive, siglip_loss
from evaclip.losses.ring import clip_loss_ring, siglip_loss_ring
from evaclip.losses.tiled import clip_loss_tiled, siglip_loss_tiled

__all__ = ["ContrastiveLoss", "IMPLS", "clip_loss_local", "clip_loss_naive", "clip_loss_ring", "clip_loss_tiled",
           "mim_loss", "siglip_loss", "siglip_loss_ring", "siglip_loss_tiled"]


IMPLS = ("naive", "local", "tiled", "ring")


class ContrastiveLoss(nn.Module):
    """Global-batch contrastive loss for one rank: gathers features (with grad) and applies ``impl``."""

    def __init__(self, kind: str = "clip", impl: str = "local", tile_size: int = 4096):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss kind must be clip or siglip, got {kind!r}")
        if impl not in IMPLS:
            raise ValueError(f"loss impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.kind, self.impl, self.tile_size = kind, impl, tile_size

    def forward(self, image_features, text_features, logit_scale, logit_bias: Optional[torch.Tensor] = None,
                rows: Optional[list] = None):
        """This rank's loss; ``rows`` (a list) receives its samples' losses [b], whose mean is the loss."""
        if self.kind == "siglip" and logit_bias is None:
            raise ValueError("the SigLIP loss needs the model's logit_bias (model.use_logit_bias = true)")
        if self.impl == "ring":  # nothing gathered: the blocks travel inside the loss
            if self.kind == "siglip":
                return siglip_loss_ring(image_features, text_features, logit_scale, logit_bias, self.tile_size,
                                        rows=rows)
            return clip_loss_ring(image_features, text_features, logit_scale, self.tile_size, rows=rows)
        img_all = all_gather_with_grad(image_features)
        txt_all = all_gather_with_grad(text_features)
        b = image_features.shape[0]
        offset = rank() * b
        if self.kind == "siglip":
            if self.impl == "tiled":
                return siglip_loss_tiled(image_features, txt_all, logit_scale, logit_bias, offset, self.tile_size,
                                         rows)
            return siglip_loss(image_features, txt_all, logit_scale, logit_bias, offset, rows)
        if self.impl == "naive":
            # every rank computes the full loss; the all-gather backward sums the W identical copies'
            # gradients and the engine averages over W ranks, which leaves exactly dL/dtheta
            every = [] if rows is not None else None
            loss = clip_loss_naive(img_all, txt_all, logit_scale, every)
            if rows is not None:
                rows.append(every[0][offset:offset + b])
            return loss
        if self.impl == "local":
            return clip_loss_local(image_features, text_features, img_all, txt_all, logit_scale, offset, rows)
        return clip_loss_tiled(image_features, text_features, img_all, txt_all, logit_scale, offset, self.tile_size,
                               rows)


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
             denom: Optional[float] = None, rows: Optional[list] = None) -> torch.Tensor:
    """EVA / EVA-02 masked image modeling: the negative cosine similarity between predicted and teacher
    features [B, N, C], summed over the masked positions (``mask`` [B, N] bool; None: every position) and
    divided by ``denom`` (default: the number of positions summed). The trainer passes the number of masked
    positions in the rank's whole step, so accumulated micro-batches add up to the step's mean; every image
    has the same mask count, so the mean over ranks (DeepSpeed's gradient average) is the global batch's.
    Positions outside ``mask`` get no gradient. ``rows``: the per-sample mean losses are appended to it."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # [B, N], computed in fp32
    keep = torch.ones_like(cos, dtype=torch.bool) if mask is None else mask
    cos = cos * keep  # multiplied, not indexed: the loss keeps its [B, N] layout for per-sample rows
    if rows is not None:
        rows.append(-(cos.detach().sum(1) / keep.sum(1)))
    total = keep.sum() if denom is None else denom
    return -cos.sum() / total
