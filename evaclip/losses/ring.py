"""Ring CLIP and SigLIP losses (Inf-CL): nothing gathered; the other ranks' blocks travel around the ring and
their column gradients travel back, per-rank memory O(b x D + tile^2) whatever the global batch."""
from __future__ import annotations

from typing import Optional

import torch

from evaclip.dist import Ring
from evaclip.losses.tiles import (as_param_grad, ce_backward, compute_dtype, lse_update, mean_of_rows, sigmoid_backward,
                                  soft_backward, soft_update, softplus_rows)


def _ring_forward(ring, blocks, compute) -> None:
    """Call ``compute(blocks)`` on each of the W blocks in ring order, receiving the next while computing."""
    for k in range(ring.world):
        pending = ring.start(blocks) if k < ring.world - 1 else None
        compute(blocks)
        if pending is not None:
            blocks = ring.finish(pending)


def _ring_backward(ring, blocks, compute, grads: Optional[int] = None):
    """``compute(blocks, acc)`` adds this rank's column gradients for the blocks it holds into fresh zero
    accumulators ``acc`` (of the first ``grads`` blocks; the others, a teacher's, take none); the partial sums of
    the other ranks arrive meanwhile and are added after. Returns the accumulators of this rank's own blocks,
    summed over all ranks."""
    incoming = None
    for k in range(ring.world):
        pending = ring.start(blocks) if k < ring.world - 1 else None
        acc = [torch.zeros(b.shape, dtype=compute_dtype(b), device=b.device) for b in blocks[:grads]]
        compute(blocks, acc)
        if incoming is not None:  # the partial sums for this block from the ranks it has already visited
            for x, y in zip(acc, ring.finish(incoming)):
                x += y
        incoming = ring.start(acc)
        if pending is not None:
            blocks = ring.finish(pending)
    return ring.finish(incoming)


class _RingCLIP(torch.autograd.Function):
    """This rank's CLIP loss (both directions, its b rows against all G columns) with blocks passed around."""

    @staticmethod
    def forward(ctx, img, txt, s, tile: int, ring, rows: Optional[list] = None):
        cdt = compute_dtype(img)
        s32 = s.to(cdt)
        n = img.shape[0]
        i32, t32 = img.to(cdt), txt.to(cdt)
        lse_i = torch.full((n,), float("-inf"), device=img.device, dtype=cdt)  # image -> text rows
        lse_t = torch.full((n,), float("-inf"), device=img.device, dtype=cdt)  # text -> image rows

        def compute(blocks):
            bi, bt = (x.to(cdt) for x in blocks)
            lse_update(i32, bt, s32, tile, lse_i)
            lse_update(t32, bi, s32, tile, lse_t)

        _ring_forward(ring, [img.contiguous(), txt.contiguous()], compute)  # blocks travel in feature dtype
        pos = (i32 * t32).sum(1)
        ctx.save_for_backward(img, txt, s, lse_i, lse_t)
        ctx.tile, ctx.ring = tile, ring
        per = (lse_i + lse_t - 2 * s32 * pos) / 2
        return mean_of_rows(per, n, rows)

    @staticmethod
    def backward(ctx, g):
        img, txt, s, lse_i, lse_t = ctx.saved_tensors
        cdt, tile, n = lse_i.dtype, ctx.tile, img.shape[0]
        i32, t32, s32 = img.to(cdt), txt.to(cdt), s.to(cdt)
        k = (g / (2 * n)).to(cdt)
        di, dt = torch.zeros_like(i32), torch.zeros_like(t32)  # row gradients of this rank's own rows
        ds = torch.zeros((), dtype=cdt, device=img.device)

        def compute(blocks, acc):
            nonlocal ds
            bi, bt = (x.to(cdt) for x in blocks)
            ds = ds + ce_backward(i32, bt, s32, lse_i, tile, di, acc[1])  # columns: the block's texts
            ds = ds + ce_backward(t32, bi, s32, lse_t, tile, dt, acc[0])  # columns: the block's images
            for x in acc:  # scaled here: each rank contributes g_r dL_r/d(block)
                x.mul_(k)

        cols = _ring_backward(ctx.ring, [img.contiguous(), txt.contiguous()], compute)
        di -= 2 * s32 * t32  # the positives (one per row in each direction)
        dt -= 2 * s32 * i32
        ds = ds - 2 * (i32 * t32).sum()
        gi = di.mul_(k).add_(cols[0])
        gt = dt.mul_(k).add_(cols[1])
        return gi.to(img.dtype), gt.to(txt.dtype), as_param_grad(k * ds, s), None, None, None


class _RingSigLIP(torch.autograd.Function):
    """This rank's SigLIP loss (its b image rows against all G texts); only the text blocks travel."""

    @staticmethod
    def forward(ctx, img, txt, s, bias, tile: int, ring, rows: Optional[list] = None):
        cdt = compute_dtype(img)
        i32, t32, s32, bias32 = img.to(cdt), txt.to(cdt), s.to(cdt), bias.to(cdt)
        n = img.shape[0]
        per = torch.zeros(n, dtype=cdt, device=img.device)

        def compute(blocks):
            per.add_(softplus_rows(i32, blocks[0].to(cdt), s32, bias32, tile))

        _ring_forward(ring, [txt.contiguous()], compute)
        pos = (i32 * t32).sum(1)
        ctx.save_for_backward(img, txt, s, bias)
        ctx.tile, ctx.ring = tile, ring
        per -= s32 * pos + bias32
        return mean_of_rows(per, n, rows)

    @staticmethod
    def backward(ctx, g):
        img, txt, s, bias = ctx.saved_tensors
        cdt = compute_dtype(img)
        tile, n = ctx.tile, img.shape[0]
        i32, t32, s32, bias32 = img.to(cdt), txt.to(cdt), s.to(cdt), bias.to(cdt)
        k = (g / n).to(cdt)
        di = torch.zeros_like(i32)
        sums = [torch.zeros((), dtype=cdt, device=img.device)] * 2

        def compute(blocks, acc):
            ds, dbias = sigmoid_backward(i32, blocks[0].to(cdt), s32, bias32, tile, di, acc[0])
            sums[0], sums[1] = sums[0] + ds, sums[1] + dbias
            acc[0].mul_(k)

        cols = _ring_backward(ctx.ring, [txt.contiguous()], compute)
        di -= s32 * t32  # the positive correction -sum_i l_ii
        gt = cols[0].sub_(k * s32 * i32)
        ds = sums[0] - (i32 * t32).sum()
        dbias = sums[1] - n
        return (di.mul_(k).to(img.dtype), gt.to(txt.dtype), as_param_grad(k * ds, s),
                as_param_grad(k * dbias, bias), None, None, None)


def clip_loss_ring(img_loc, txt_loc, scale, tile: int = 4096, ring=None, rows: Optional[list] = None) -> torch.Tensor:
    """This rank's CLIP loss with only its own rows in memory (``ring``: ``evaclip.dist.Ring()`` by default)."""
    return _RingCLIP.apply(img_loc, txt_loc, scale, tile, ring if ring is not None else Ring(), rows)


def siglip_loss_ring(img_loc, txt_loc, scale, bias, tile: int = 4096, ring=None,
                     rows: Optional[list] = None) -> torch.Tensor:
    return _RingSigLIP.apply(img_loc, txt_loc, scale, bias, tile, ring if ring is not None else Ring(), rows)


class _RingSoftCE(torch.autograd.Function):
    """This rank's distillation loss (the soft cross-entropy of the student's similarity rows to the teacher's,
    both directions, its b rows against all G columns): the teacher's features travel with the student's blocks
    and its logits are made tile by tile; only the student's column gradients travel back."""

    @staticmethod
    def forward(ctx, img, txt, t_img, t_txt, s, tau, tile: int, ring, rows: Optional[list] = None):
        cdt = compute_dtype(img)
        n, s32, tau32 = img.shape[0], s.to(cdt), tau.to(cdt)
        i32, t32, ti, tt = img.to(cdt), txt.to(cdt), t_img.to(cdt), t_txt.to(cdt)
        stats = [torch.full((n,), float("-inf"), device=img.device, dtype=cdt) for _ in range(4)]
        cross = [torch.zeros(n, device=img.device, dtype=cdt) for _ in range(2)]

        def compute(blocks):
            bi, bt, bti, btt = (x.to(cdt) for x in blocks)
            soft_update(i32, bt, ti, btt, s32, tau32, tile, stats[0], stats[1], cross[0])  # image -> text rows
            soft_update(t32, bi, tt, bti, s32, tau32, tile, stats[2], stats[3], cross[1])  # text -> image rows

        _ring_forward(ring, [x.contiguous() for x in (img, txt, t_img, t_txt)], compute)
        ctx.save_for_backward(img, txt, t_img, t_txt, s, tau, *stats)
        ctx.tile, ctx.ring = tile, ring
        per = (stats[0] - s32 * cross[0] + stats[2] - s32 * cross[1]) / 2
        return mean_of_rows(per, n, rows)

    @staticmethod
    def backward(ctx, g):
        img, txt, t_img, t_txt, s, tau, ls_i, lt_i, ls_t, lt_t = ctx.saved_tensors
        cdt, tile, n = ls_i.dtype, ctx.tile, img.shape[0]
        i32, t32, ti, tt, s32, tau32 = (x.to(cdt) for x in (img, txt, t_img, t_txt, s, tau))
        k = (g / (2 * n)).to(cdt)
        di, dt = torch.zeros_like(i32), torch.zeros_like(t32)
        ds = torch.zeros((), dtype=cdt, device=img.device)

        def compute(blocks, acc):
            nonlocal ds
            bi, bt, bti, btt = (x.to(cdt) for x in blocks)
            ds = ds + soft_backward(i32, bt, ti, btt, s32, tau32, ls_i, lt_i, tile, di, acc[1])
            ds = ds + soft_backward(t32, bi, tt, bti, s32, tau32, ls_t, lt_t, tile, dt, acc[0])
            for x in acc:
                x.mul_(k)

        cols = _ring_backward(ctx.ring, [x.contiguous() for x in (img, txt, t_img, t_txt)], compute, grads=2)
        gi = di.mul_(k).add_(cols[0])
        gt = dt.mul_(k).add_(cols[1])
        return (gi.to(img.dtype), gt.to(txt.dtype), None, None, as_param_grad(k * ds, s), None, None, None, None)


def soft_ce_ring(img_loc, txt_loc, t_img_loc, t_txt_loc, scale, t_scale, tile: int = 4096, ring=None,
                 rows: Optional[list] = None) -> torch.Tensor:
    """This rank's distillation loss with only its own rows (student's and teacher's) in memory."""
    return _RingSoftCE.apply(img_loc, txt_loc, t_img_loc, t_txt_loc, scale, t_scale, tile,
                             ring if ring is not None else Ring(), rows)
