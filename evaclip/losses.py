"""Contrastive losses over the global batch.

CLIP (InfoNCE, Radford et al. 2021): with G pairs, logits = s * I @ T^T, loss = (CE(logits) + CE(logits^T)) / 2,
averaged over the G rows. Three implementations with the same value and gradients:

  naive  gathers all features and builds the G x G logits on every rank (the reference).
  local  each rank builds only its b x G rows (image->text and text->image), labels offset by rank*b;
         with all-gather-with-grad and the engine's gradient averaging this is exactly the gradient of
         the global mean loss (open_clip's ``local_loss`` + ``gather_with_grad``).
  tiled  like local, but never materialises b x G: rows and columns are processed in tiles with an
         online log-sum-exp, and a custom backward recomputes each tile (O(tile^2) memory); this is what
         makes 100k+ global batches fit (bench: ``make bench``).

SigLIP (Zhai et al. 2023): sum over pairs of -log sigmoid(z_ij (s x.y + bias)), z = +1 on the diagonal,
per rank over its b rows x G columns, normalised by b.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.dist import all_gather_with_grad, rank


def clip_loss_naive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference CLIP loss on already-gathered features [G, D] (every rank computes the same value)."""
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def clip_loss_local(img_loc, txt_loc, img_all, txt_all, scale, offset: int) -> torch.Tensor:
    """This rank's rows [b, G] of both logit matrices; labels are the rank's offset diagonal."""
    labels = torch.arange(img_loc.shape[0], device=img_loc.device) + offset
    return (F.cross_entropy(scale * img_loc @ txt_all.t(), labels)
            + F.cross_entropy(scale * txt_loc @ img_all.t(), labels)) / 2


class _TiledCE(torch.autograd.Function):
    """sum_i [logsumexp_j(s a_i.b_j) - s a_i.b_(off+i)] for rows a [b, D] against columns b [G, D], tiled.

    Forward keeps only the per-row log-sum-exp (b floats); backward recomputes each tile's softmax.
    Gradients (p_ij = softmax_j(s a_i.b_j)):
        d/da_i = s (sum_j p_ij b_j - b_pos(i))    d/db_j = s (sum_i p_ij a_i - [j = pos(i)] a_i)
        d/ds   = sum_ij p_ij a_i.b_j - sum_i a_i.b_pos(i)
    Tiles are computed in at least float32 whatever the feature dtype.
    """

    @staticmethod
    def forward(ctx, a, b, s, offset: int, tile: int):
        cdt = torch.promote_types(a.dtype, torch.float32)  # bf16/fp16 features: tiles in fp32
        ctx.s_dtype, ctx.s_shape = s.dtype, s.shape
        a32, b32, s = a.to(cdt), b.to(cdt), s.to(cdt)
        n = a.shape[0]
        lse = torch.full((n,), float("-inf"), device=a.device, dtype=cdt)
        for r0 in range(0, n, tile):
            ar = a32[r0:r0 + tile]
            for c0 in range(0, b.shape[0], tile):
                t = s * (ar @ b32[c0:c0 + tile].t())  # [r, c]
                lse[r0:r0 + tile] = torch.logaddexp(lse[r0:r0 + tile], torch.logsumexp(t, dim=1))
        pos = (a32 * b32[offset:offset + n]).sum(1)  # [b]
        ctx.save_for_backward(a, b, s, lse)
        ctx.offset, ctx.tile = offset, tile
        return (lse - s * pos).sum()

    @staticmethod
    def backward(ctx, g):
        a, b, s, lse = ctx.saved_tensors
        a32, b32, off, tile = a.to(lse.dtype), b.to(lse.dtype), ctx.offset, ctx.tile
        n = a.shape[0]
        da, db = torch.zeros_like(a32), torch.zeros_like(b32)
        ds = torch.zeros((), device=a.device, dtype=lse.dtype)
        for r0 in range(0, n, tile):
            ar = a32[r0:r0 + tile]
            for c0 in range(0, b.shape[0], tile):
                bc = b32[c0:c0 + tile]
                dot = ar @ bc.t()
                p = torch.exp(s * dot - lse[r0:r0 + tile, None])  # softmax tile [r, c]
                da[r0:r0 + tile] += s * (p @ bc)
                db[c0:c0 + tile] += s * (p.t() @ ar)
                ds += (p * dot).sum()
        bpos = b32[off:off + n]
        da -= s * bpos
        db[off:off + n] -= s * a32
        ds -= (a32 * bpos).sum()
        # in place: db is [G, D]; ``g * db`` would hold a second copy of it at the backward's peak
        da.mul_(g)
        db.mul_(g)
        return da.to(a.dtype), db.to(b.dtype), (g * ds).reshape(ctx.s_shape).to(ctx.s_dtype), None, None


def clip_loss_tiled(img_loc, txt_loc, img_all, txt_all, scale, offset: int, tile: int = 4096) -> torch.Tensor:
    n = img_loc.shape[0]
    return (_TiledCE.apply(img_loc, txt_all, scale, offset, tile)
            + _TiledCE.apply(txt_loc, img_all, scale, offset, tile)) / (2 * n)


def siglip_loss(img_loc, txt_all, scale, bias, offset: int) -> torch.Tensor:
    """Sigmoid loss of this rank's rows [b, G]; normalised by the local batch size as in the SigLIP paper."""
    logits = scale * img_loc @ txt_all.t() + bias
    z = -torch.ones_like(logits)
    idx = torch.arange(img_loc.shape[0], device=logits.device)
    z[idx, idx + offset] = 1.0
    return -F.logsigmoid(z * logits).sum() / img_loc.shape[0]


class ContrastiveLoss(nn.Module):
    """Global-batch contrastive loss for one rank: gathers features (with grad) and applies ``impl``."""

    def __init__(self, kind: str = "clip", impl: str = "local", tile_size: int = 4096):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss kind must be clip or siglip, got {kind!r}")
        if impl not in ("naive", "local", "tiled"):
            raise ValueError(f"loss impl must be naive, local or tiled, got {impl!r}")
        self.kind, self.impl, self.tile_size = kind, impl, tile_size

    def forward(self, image_features, text_features, logit_scale, logit_bias: Optional[torch.Tensor] = None):
        img_all = all_gather_with_grad(image_features)
        txt_all = all_gather_with_grad(text_features)
        offset = rank() * image_features.shape[0]
        if self.kind == "siglip":
            if logit_bias is None:
                raise ValueError("the SigLIP loss needs the model's logit_bias (model.use_logit_bias = true)")
            return siglip_loss(image_features, txt_all, logit_scale, logit_bias, offset)
        if self.impl == "naive":
            # every rank computes the full loss; the all-gather backward sums the W identical copies'
            # gradients and the engine averages over W ranks, which leaves exactly dL/dtheta
            return clip_loss_naive(img_all, txt_all, logit_scale)
        if self.impl == "local":
            return clip_loss_local(image_features, text_features, img_all, txt_all, logit_scale, offset)
        return clip_loss_tiled(image_features, text_features, img_all, txt_all, logit_scale, offset, self.tile_size)
