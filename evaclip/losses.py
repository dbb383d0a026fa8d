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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.dist import Ring, all_gather_with_grad, rank


def clip_loss_naive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, rows: Optional[list] = None) -> torch.Tensor:
    """Reference CLIP loss on already-gathered features [G, D] (every rank computes the same value).

    ``rows``: a list that receives each sample's loss [G] (detached), here and in every loss below (the
    samples are a rank's own rows there); their mean is the loss."""
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    if rows is not None:
        with torch.no_grad():
            diag = logits.diagonal()
            rows.append((torch.logsumexp(logits, 1) + torch.logsumexp(logits, 0) - 2 * diag) / 2)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def clip_loss_local(img_loc, txt_loc, img_all, txt_all, scale, offset: int, rows: Optional[list] = None) -> torch.Tensor:
    """This rank's rows [b, G] of both logit matrices; labels are the rank's offset diagonal."""
    labels = torch.arange(img_loc.shape[0], device=img_loc.device) + offset
    if rows is None:
        return (F.cross_entropy(scale * img_loc @ txt_all.t(), labels)
                + F.cross_entropy(scale * txt_loc @ img_all.t(), labels)) / 2
    per = (F.cross_entropy(scale * img_loc @ txt_all.t(), labels, reduction="none")
           + F.cross_entropy(scale * txt_loc @ img_all.t(), labels, reduction="none")) / 2
    rows.append(per.detach())
    return per.mean()


# ---------------------------------------------------------------------------------------------- tile kernels
# Rows a [n, D] against columns b [m, D], in tiles of ``tile`` x ``tile``; tensors already in the compute dtype.
# Positive pairs are handled by the callers (they are local rows), so the kernels see every pair alike.

def _lse_update(a, b, s, tile: int, lse) -> None:
    """lse[i] <- logaddexp(lse[i], logsumexp_j s a_i.b_j): the online log-sum-exp over one column block."""
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0:r0 + tile]
        for c0 in range(0, b.shape[0], tile):
            t = s * (ar @ b[c0:c0 + tile].t())  # [r, c]
            lse[r0:r0 + tile] = torch.logaddexp(lse[r0:r0 + tile], torch.logsumexp(t, dim=1))


def _ce_backward(a, b, s, lse, tile: int, da, db):
    """Softmax part of the CE gradients (p_ij = exp(s a_i.b_j - lse_i)), added into da, db; returns its d/ds."""
    ds = torch.zeros((), device=a.device, dtype=a.dtype)
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0:r0 + tile]
        for c0 in range(0, b.shape[0], tile):
            bc = b[c0:c0 + tile]
            dot = ar @ bc.t()
            p = torch.exp(s * dot - lse[r0:r0 + tile, None])  # softmax tile [r, c]
            da[r0:r0 + tile] += s * (p @ bc)
            db[c0:c0 + tile] += s * (p.t() @ ar)
            ds += (p * dot).sum()
    return ds


def _softplus_rows(a, b, s, bias, tile: int):
    """[n]: sum_j softplus(s a_i.b_j + bias) = sum_j -log sigmoid(-(logit_ij)): every pair as a negative."""
    out = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0:r0 + tile]
        for c0 in range(0, b.shape[0], tile):
            out[r0:r0 + tile] += F.softplus(s * (ar @ b[c0:c0 + tile].t()) + bias).sum(1)
    return out


def _sigmoid_backward(a, b, s, bias, tile: int, da, db):
    """Gradients of ``_softplus_rows`` (q_ij = sigmoid(logit_ij)) added into da, db; returns (d/ds, d/dbias)."""
    ds = torch.zeros((), device=a.device, dtype=a.dtype)
    dbias = torch.zeros((), device=a.device, dtype=a.dtype)
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0:r0 + tile]
        for c0 in range(0, b.shape[0], tile):
            bc = b[c0:c0 + tile]
            dot = ar @ bc.t()
            q = torch.sigmoid(s * dot + bias)
            da[r0:r0 + tile] += s * (q @ bc)
            db[c0:c0 + tile] += s * (q.t() @ ar)
            ds += (q * dot).sum()
            dbias += q.sum()
    return ds, dbias


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 features: tiles and sums in fp32


def _as_param_grad(g, like):
    return g.reshape(like.shape).to(like.dtype)


# ---------------------------------------------------------------------------------------------- tiled (one rank)
class _TiledCE(torch.autograd.Function):
    """sum_i [logsumexp_j(s a_i.b_j) - s a_i.b_(off+i)] for rows a [b, D] against columns b [G, D], tiled.

    Forward keeps only the per-row log-sum-exp (b floats); backward recomputes each tile's softmax.
    Gradients (p_ij = softmax_j(s a_i.b_j)):
        d/da_i = s (sum_j p_ij b_j - b_pos(i))    d/db_j = s (sum_i p_ij a_i - [j = pos(i)] a_i)
        d/ds   = sum_ij p_ij a_i.b_j - sum_i a_i.b_pos(i)
    """

    @staticmethod
    def forward(ctx, a, b, s, offset: int, tile: int, rows: Optional[list] = None):
        cdt = _compute_dtype(a)
        a32, b32, s32 = a.to(cdt), b.to(cdt), s.to(cdt)
        n = a.shape[0]
        lse = torch.full((n,), float("-inf"), device=a.device, dtype=cdt)
        _lse_update(a32, b32, s32, tile, lse)
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
        ds = _ce_backward(a32, b32, s32, lse, ctx.tile, da, db)
        bpos = b32[off:off + n]
        da -= s32 * bpos
        db[off:off + n] -= s32 * a32
        ds -= (a32 * bpos).sum()
        # in place: db is [G, D]; ``g * db`` would hold a second copy of it at the backward's peak
        da.mul_(g)
        db.mul_(g)
        return da.to(a.dtype), db.to(b.dtype), _as_param_grad(g * ds, s), None, None, None


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
        cdt = _compute_dtype(a)
        a32, b32, s32, bias32 = a.to(cdt), b.to(cdt), s.to(cdt), bias.to(cdt)
        n = a.shape[0]
        pos = (a32 * b32[offset:offset + n]).sum(1)
        per = _softplus_rows(a32, b32, s32, bias32, tile) - (s32 * pos + bias32)
        ctx.save_for_backward(a, b, s, bias)
        ctx.offset, ctx.tile, ctx.cdt = offset, tile, cdt
        if rows is not None:
            rows.append(per.detach().clone())
        return per.sum() / n

    @staticmethod
    def backward(ctx, g):
        a, b, s, bias = ctx.saved_tensors
        cdt, off, n = ctx.cdt, ctx.offset, a.shape[0]
        a32, b32, s32, bias32 = a.to(cdt), b.to(cdt), s.to(cdt), bias.to(cdt)
        da, db = torch.zeros_like(a32), torch.zeros_like(b32)
        ds, dbias = _sigmoid_backward(a32, b32, s32, bias32, ctx.tile, da, db)
        bpos = b32[off:off + n]
        da -= s32 * bpos
        db[off:off + n] -= s32 * a32
        ds -= (a32 * bpos).sum()
        dbias -= n
        k = g / n
        da.mul_(k)
        db.mul_(k)
        return (da.to(a.dtype), db.to(b.dtype), _as_param_grad(k * ds, s), _as_param_grad(k * dbias, bias),
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

def _ring_forward(ring, blocks, compute) -> None:
    """Call ``compute(blocks)`` on each of the W blocks in ring order, receiving the next while computing."""
    for k in range(ring.world):
        pending = ring.start(blocks) if k < ring.world - 1 else None
        compute(blocks)
        if pending is not None:
            blocks = ring.finish(pending)


def _ring_backward(ring, blocks, compute):
    """``compute(blocks, acc)`` adds this rank's column gradients for the blocks it holds into fresh zero
    accumulators ``acc``; the partial sums of the other ranks arrive meanwhile and are added after. Returns the
    accumulators of this rank's own blocks, summed over all ranks."""
    incoming = None
    for k in range(ring.world):
        pending = ring.start(blocks) if k < ring.world - 1 else None
        acc = [torch.zeros(b.shape, dtype=_compute_dtype(b), device=b.device) for b in blocks]
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
        cdt = _compute_dtype(img)
        s32 = s.to(cdt)
        n = img.shape[0]
        i32, t32 = img.to(cdt), txt.to(cdt)
        lse_i = torch.full((n,), float("-inf"), device=img.device, dtype=cdt)  # image -> text rows
        lse_t = torch.full((n,), float("-inf"), device=img.device, dtype=cdt)  # text -> image rows

        def compute(blocks):
            bi, bt = (x.to(cdt) for x in blocks)
            _lse_update(i32, bt, s32, tile, lse_i)
            _lse_update(t32, bi, s32, tile, lse_t)

        _ring_forward(ring, [img.contiguous(), txt.contiguous()], compute)  # blocks travel in feature dtype
        pos = (i32 * t32).sum(1)
        ctx.save_for_backward(img, txt, s, lse_i, lse_t)
        ctx.tile, ctx.ring = tile, ring
        per = (lse_i + lse_t - 2 * s32 * pos) / 2
        if rows is not None:
            rows.append(per.detach().clone())
        return per.sum() / n

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
            ds = ds + _ce_backward(i32, bt, s32, lse_i, tile, di, acc[1])  # columns: the block's texts
            ds = ds + _ce_backward(t32, bi, s32, lse_t, tile, dt, acc[0])  # columns: the block's images
            for x in acc:  # scaled here: each rank contributes g_r dL_r/d(block)
                x.mul_(k)

        cols = _ring_backward(ctx.ring, [img.contiguous(), txt.contiguous()], compute)
        di -= 2 * s32 * t32  # the positives (one per row in each direction)
        dt -= 2 * s32 * i32
        ds = ds - 2 * (i32 * t32).sum()
        gi = di.mul_(k).add_(cols[0])
        gt = dt.mul_(k).add_(cols[1])
        return gi.to(img.dtype), gt.to(txt.dtype), _as_param_grad(k * ds, s), None, None, None


class _RingSigLIP(torch.autograd.Function):
    """This rank's SigLIP loss (its b image rows against all G texts); only the text blocks travel."""

    @staticmethod
    def forward(ctx, img, txt, s, bias, tile: int, ring, rows: Optional[list] = None):
        cdt = _compute_dtype(img)
        i32, t32, s32, bias32 = img.to(cdt), txt.to(cdt), s.to(cdt), bias.to(cdt)
        n = img.shape[0]
        per = torch.zeros(n, dtype=cdt, device=img.device)

        def compute(blocks):
            per.add_(_softplus_rows(i32, blocks[0].to(cdt), s32, bias32, tile))

        _ring_forward(ring, [txt.contiguous()], compute)
        pos = (i32 * t32).sum(1)
        ctx.save_for_backward(img, txt, s, bias)
        ctx.tile, ctx.ring = tile, ring
        per -= s32 * pos + bias32
        if rows is not None:
            rows.append(per.detach().clone())
        return per.sum() / n

    @staticmethod
    def backward(ctx, g):
        img, txt, s, bias = ctx.saved_tensors
        cdt = _compute_dtype(img)
        tile, n = ctx.tile, img.shape[0]
        i32, t32, s32, bias32 = img.to(cdt), txt.to(cdt), s.to(cdt), bias.to(cdt)
        k = (g / n).to(cdt)
        di = torch.zeros_like(i32)
        sums = [torch.zeros((), dtype=cdt, device=img.device)] * 2

        def compute(blocks, acc):
            ds, dbias = _sigmoid_backward(i32, blocks[0].to(cdt), s32, bias32, tile, di, acc[0])
            sums[0], sums[1] = sums[0] + ds, sums[1] + dbias
            acc[0].mul_(k)

        cols = _ring_backward(ctx.ring, [txt.contiguous()], compute)
        di -= s32 * t32  # the positive correction -sum_i l_ii
        gt = cols[0].sub_(k * s32 * i32)
        ds = sums[0] - (i32 * t32).sum()
        dbias = sums[1] - n
        return (di.mul_(k).to(img.dtype), gt.to(txt.dtype), _as_param_grad(k * ds, s),
                _as_param_grad(k * dbias, bias), None, None, None)


def clip_loss_ring(img_loc, txt_loc, scale, tile: int = 4096, ring=None, rows: Optional[list] = None) -> torch.Tensor:
    """This rank's CLIP loss with only its own rows in memory (``ring``: ``evaclip.dist.Ring()`` by default)."""
    return _RingCLIP.apply(img_loc, txt_loc, scale, tile, ring if ring is not None else Ring(), rows)


def siglip_loss_ring(img_loc, txt_loc, scale, bias, tile: int = 4096, ring=None,
                     rows: Optional[list] = None) -> torch.Tensor:
    return _RingSigLIP.apply(img_loc, txt_loc, scale, bias, tile, ring if ring is not None else Ring(), rows)


def siglip_loss(img_loc, txt_all, scale, bias, offset: int, rows: Optional[list] = None) -> torch.Tensor:
    """Sigmoid loss of this rank's rows [b, G]; normalised by the local batch size as in the SigLIP paper."""
    logits = scale * img_loc @ txt_all.t() + bias
    z = -torch.ones_like(logits)
    idx = torch.arange(img_loc.shape[0], device=logits.device)
    z[idx, idx + offset] = 1.0
    per = -F.logsigmoid(z * logits).sum(1)
    if rows is not None:
        rows.append(per.detach())
    return per.sum() / img_loc.shape[0]


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
