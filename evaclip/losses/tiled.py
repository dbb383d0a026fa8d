"""Tiled CLIP and SigLIP losses: a rank's b rows against the gathered G columns without materialising b x G."""
from __future__ import annotations

from typing import Optional

import torch

from evaclip.losses.tiles import (as_param_grad, ce_backward, compute_dtype, lse_update, mean_of_rows, sigmoid_backward,
                                  soft_backward, soft_update, softplus_rows)


class _TiledCE(torch.autograd.Function):
    """sum_i [logsumexp_j(s a_i.b_j) - s a_i.b_(off+i)] for rows a [b, D] against columns b [G, D], tiled.

    Forward keeps only the per-row log-sum-exp (b floats); backward recomputes each tile's softmax.
    Gradients (p_ij = softmax_j(s a_i.b_j)):
        d/da_i = s (sum_j p_ij b_j - b_pos(i))    d/db_j = s (sum_i p_ij a_i - [j = pos(i)] a_i)
        d/ds   = sum_ij p_ij a_i.b_j - sum_i a_i.b_pos(i)
    """

    @staticmethod
    def forward(ctx, a, b, s, offset: int, tile: int, rows: Optional[list] = None):
        cdt = compute_dtype(a)
        a32, b32, s32 = a.to(cdt), b.to(cdt), s.to(cdt)
        n = a.shape[0]
        lse = torch.full((n,), float("-inf"), device=a.device, dtype=cdt)
        lse_update(a32, b32, s32, tile, lse)
        pos = (a32 * b32[offset:offset + n]).sum(1)  # [b]
        ctx.save_for_backward(a, b, s, lse)
        ctx.offset, ctx.tile = offset, tile
        per = lse - s32 * pos  # each row's loss, from the saved log-sum-exp: no extra pass
        if rows is not None:
            rows.append(per.detach().clone())
        return per.sum()

    @staticmethod
    def backward(ctx, g):
        a, b, s, lse = ctx.saved_tensors
        a32, b32, s32, off = a.to(lse.dtype), b.to(lse.dtype), s.to(lse.dtype), ctx.offset
        n = a.shape[0]
        da, db = torch.zeros_like(a32), torch.zeros_like(b32)
        ds = ce_backward(a32, b32, s32, lse, ctx.tile, da, db)
        bpos = b32[off:off + n]
        da -= s32 * bpos
        db[off:off + n] -= s32 * a32
        ds -= (a32 * bpos).sum()
        # in place: db is [G, D]; ``g * db`` would hold a second copy of it at the backward's peak
        da.mul_(g)
        db.mul_(g)
        return da.to(a.dtype), db.to(b.dtype), as_param_grad(g * ds, s), None, None, None


def clip_loss_tiled(img_loc, txt_loc, img_all, txt_all, scale, offset: int, tile: int = 4096,
                    rows: Optional[list] = None) -> torch.Tensor:
    n = img_loc.shape[0]
    both = [] if rows is not None else None
    loss = (_TiledCE.apply(img_loc, txt_all, scale, offset, tile, both)
            + _TiledCE.apply(txt_loc, img_all, scale, offset, tile, both)) / (2 * n)
    if rows is not None:
        rows.append((both[0] + both[1]) / 2)
    return loss


class _TiledSigLIP(torch.autograd.Function):
    """SigLIP of rows a [b, D] against columns b [G, D] without the b x G logits.

    -log sigmoid(l) = softplus(-l) and softplus(l) - softplus(-l) = l, so the loss is
    sum_ij softplus(l_ij) - sum_i l_i,pos(i): every pair as a negative, then one correction per positive."""

    @staticmethod
    def forward(ctx, a, b, s, bias, offset: int, tile: int, rows: Optional[list] = None):
        cdt = compute_dtype(a)
        a32, b32, s32, bias32 = a.to(cdt), b.to(cdt), s.to(cdt), bias.to(cdt)
        n = a.shape[0]
        pos = (a32 * b32[offset:offset + n]).sum(1)
        per = softplus_rows(a32, b32, s32, bias32, tile) - (s32 * pos + bias32)
        ctx.save_for_backward(a, b, s, bias)
        ctx.offset, ctx.tile, ctx.cdt = offset, tile, cdt
        return mean_of_rows(per, n, rows)

    @staticmethod
    def backward(ctx, g):
        a, b, s, bias = ctx.saved_tensors
        cdt, off, n = ctx.cdt, ctx.offset, a.shape[0]
        a32, b32, s32, bias32 = a.to(cdt), b.to(cdt), s.to(cdt), bias.to(cdt)
        da, db = torch.zeros_like(a32), torch.zeros_like(b32)
        ds, dbias = sigmoid_backward(a32, b32, s32, bias32, ctx.tile, da, db)
        bpos = b32[off:off + n]
        da -= s32 * bpos
        db[off:off + n] -= s32 * a32
        ds -= (a32 * bpos).sum()
        dbias -= n
        k = g / n
        da.mul_(k)
        db.mul_(k)
        return (da.to(a.dtype), db.to(b.dtype), as_param_grad(k * ds, s), as_param_grad(k * dbias, bias),
                None, None, None)


def siglip_loss_tiled(img_loc, txt_all, scale, bias, offset: int, tile: int = 4096,
                      rows: Optional[list] = None) -> torch.Tensor:
    return _TiledSigLIP.apply(img_loc, txt_all, scale, bias, offset, tile, rows)


# ---------------------------------------------------------------------------------------------- ring
# Each rank keeps its own b rows. The other ranks' feature blocks travel around the ring (rank r receives
# the block of rank r - k at hop k) while the rank computes tiles against the block it holds; the backward
# sends the blocks around again, and with each block a gradient accumulator to which every rank adds its
# column gradients, so that after W hops the accumulator arrives home holding sum_r' dL_r'/d(block): what
# all-gather-with-grad would have given, without any rank ever holding G rows (Inf-CL, Cheng et al. 2024).


class _TiledSoftCE(torch.autograd.Function):
    """sum_i -sum_j p^T_ij log p^S_ij for student rows a [b, D] against columns b [G, D], teacher rows c and
    columns d (no gradient): p^S = softmax_j(s a_i.b_j), p^T = softmax_j(tau c_i.d_j). Neither b x G matrix is
    built: forward keeps three numbers per row (``soft_update``), backward recomputes each tile's p^S - p^T."""

    @staticmethod
    def forward(ctx, a, b, c, d, s, tau, tile: int, rows: Optional[list] = None):
        cdt = compute_dtype(a)
        a32, b32, c32, d32, s32, tau32 = (x.to(cdt) for x in (a, b, c, d, s, tau))
        n = a.shape[0]
        lse_s, lse_t = (torch.full((n,), float("-inf"), device=a.device, dtype=cdt) for _ in range(2))
        cross = torch.zeros(n, device=a.device, dtype=cdt)
        soft_update(a32, b32, c32, d32, s32, tau32, tile, lse_s, lse_t, cross)
        ctx.save_for_backward(a, b, c, d, s, tau, lse_s, lse_t)
        ctx.tile = tile
        per = lse_s - s32 * cross
        if rows is not None:
            rows.append(per.detach().clone())
        return per.sum()

    @staticmethod
    def backward(ctx, g):
        a, b, c, d, s, tau, lse_s, lse_t = ctx.saved_tensors
        a32, b32, c32, d32, s32, tau32 = (x.to(lse_s.dtype) for x in (a, b, c, d, s, tau))
        da, db = torch.zeros_like(a32), torch.zeros_like(b32)
        ds = soft_backward(a32, b32, c32, d32, s32, tau32, lse_s, lse_t, ctx.tile, da, db)
        da.mul_(g)
        db.mul_(g)
        return da.to(a.dtype), db.to(b.dtype), None, None, as_param_grad(g * ds, s), None, None, None


def soft_ce_tiled(img_loc, txt_loc, img_all, txt_all, t_img_loc, t_txt_loc, t_img_all, t_txt_all, scale, t_scale,
                  tile: int = 4096, rows: Optional[list] = None) -> torch.Tensor:
    """The distillation loss of this rank's rows, both directions, tiled."""
    n = img_loc.shape[0]
    both = [] if rows is not None else None
    loss = (_TiledSoftCE.apply(img_loc, txt_all, t_img_loc, t_txt_all, scale, t_scale, tile, both)
            + _TiledSoftCE.apply(txt_loc, img_all, t_txt_loc, t_img_all, scale, t_scale, tile, both)) / (2 * n)
    if rows is not None:
        rows.append((both[0] + both[1]) / 2)
    return loss
