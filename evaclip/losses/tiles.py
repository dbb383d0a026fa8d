"""Tile kernels shared by the tiled and ring losses: an online log-sum-exp over column tiles and the
backward passes that recompute each tile (O(tile^2) memory), in fp32 whatever the features' dtype."""
from __future__ import annotations


import torch
import torch.nn.functional as F



def lse_update(a, b, s, tile: int, lse) -> None:
    """lse[i] <- logaddexp(lse[i], logsumexp_j s a_i.b_j): the online log-sum-exp over one column block."""
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0:r0 + tile]
        for c0 in range(0, b.shape[0], tile):
            t = s * (ar @ b[c0:c0 + tile].t())  # [r, c]
            lse[r0:r0 + tile] = torch.logaddexp(lse[r0:r0 + tile], torch.logsumexp(t, dim=1))


def pair_backward(a, b, s, tile: int, da, db, coef, with_bias: bool = False):
    """The backward of a loss over logits s a_i.b_j (+ bias), one tile at a time: with w = coef(rows, c0, dot) its
    d/dlogit on the tile, da_i += s sum_j w_ij b_j and db_j += s sum_i w_ij a_i; returns (d/ds, d/dbias) =
    (sum w_ij a_i.b_j, sum w_ij), d/dbias None unless ``with_bias`` (only SigLIP's logits have a bias)."""
    ds = torch.zeros((), device=a.device, dtype=a.dtype)
    dbias = torch.zeros((), device=a.device, dtype=a.dtype) if with_bias else None
    for r0 in range(0, a.shape[0], tile):
        r = slice(r0, r0 + tile)
        ar = a[r]
        for c0 in range(0, b.shape[0], tile):
            bc = b[c0:c0 + tile]
            dot = ar @ bc.t()  # [r, c]
            w = coef(r, c0, dot)
            da[r] += s * (w @ bc)
            db[c0:c0 + tile] += s * (w.t() @ ar)
            ds += (w * dot).sum()
            if with_bias:
                dbias += w.sum()
    return ds, dbias


def ce_backward(a, b, s, lse, tile: int, da, db):
    """Softmax part of the CE gradients (p_ij = exp(s a_i.b_j - lse_i)), added into da, db; returns its d/ds."""
    return pair_backward(a, b, s, tile, da, db, lambda r, c0, dot: torch.exp(s * dot - lse[r, None]))[0]


def softplus_rows(a, b, s, bias, tile: int):
    """[n]: sum_j softplus(s a_i.b_j + bias) = sum_j -log sigmoid(-(logit_ij)): every pair as a negative."""
    out = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
    for r0 in range(0, a.shape[0], tile):
        ar = a[r0:r0 + tile]
        for c0 in range(0, b.shape[0], tile):
            out[r0:r0 + tile] += F.softplus(s * (ar @ b[c0:c0 + tile].t()) + bias).sum(1)
    return out


def sigmoid_backward(a, b, s, bias, tile: int, da, db):
    """Gradients of ``softplus_rows`` (q_ij = sigmoid(logit_ij)) added into da, db; returns (d/ds, d/dbias)."""
    return pair_backward(a, b, s, tile, da, db, lambda r, c0, dot: torch.sigmoid(s * dot + bias),
                         with_bias=True)


def mean_of_rows(per, n: int, rows):
    """The loss sum(per) / n; with ``rows`` (the per-sample loss log) a detached copy of ``per`` kept there."""
    if rows is not None:
        rows.append(per.detach().clone())
    return per.sum() / n


def compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 features: tiles and sums in fp32


def as_param_grad(g, like):
    return g.reshape(like.shape).to(like.dtype)


# ---------------------------------------------------------------------------------------------- tiled (one rank)


def soft_update(a, b, c, d, s, tau, tile: int, lse_s, lse_t, cross) -> None:
    """One column block of the soft cross-entropy (distillation): rows a [n, D] / columns b (the student's), rows
    c [n, Dt] / columns d (the teacher's). Online, per row: the student's log-sum-exp ``lse_s``, the teacher's
    ``lse_t``, and ``cross`` = sum_j p^T_ij a_i.b_j with p^T normalised by the running ``lse_t`` (rescaled as
    it grows, as flash attention rescales its output): the row's loss is then lse_s - s cross."""
    for r0 in range(0, a.shape[0], tile):
        r = slice(r0, r0 + tile)
        ar, cr = a[r], c[r]
        for c0 in range(0, b.shape[0], tile):
            dot = ar @ b[c0:c0 + tile].t()  # [r, c]
            tl = tau * (cr @ d[c0:c0 + tile].t())  # the teacher's logits of the tile, never more
            lse_s[r] = torch.logaddexp(lse_s[r], torch.logsumexp(s * dot, dim=1))
            new = torch.logaddexp(lse_t[r], torch.logsumexp(tl, dim=1))
            cross[r] = cross[r] * torch.exp(lse_t[r] - new) + (torch.exp(tl - new[:, None]) * dot).sum(1)
            lse_t[r] = new


def soft_backward(a, b, c, d, s, tau, lse_s, lse_t, tile: int, da, db):
    """Gradients of the soft cross-entropy rows (coefficient p^S_ij - p^T_ij: the hard CE's with the one-hot
    target replaced by the teacher's distribution), added into da, db; returns its d/ds."""
    def coef(r, c0, dot):
        return torch.exp(s * dot - lse_s[r, None]) - torch.exp(tau * (c[r] @ d[c0:c0 + tile].t()) - lse_t[r, None])

    return pair_backward(a, b, s, tile, da, db, coef)[0]
