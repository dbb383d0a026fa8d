"""The captioning loss: cross-entropy of next-token predictions over the vocabulary, with label smoothing and
padding ignored, computed in chunks of tokens so the [tokens, vocab] logits never exist whole.

A CLIP vocabulary has 49408 entries: one micro-batch of 64 captions x 31 predicted tokens is 98M logits (390 MB in
fp32), and autograd would keep them and their softmax for the backward. ``chunked_token_ce`` keeps only the hidden
states and the projection: the forward takes each chunk's logits, reduces them to per-token losses and frees them;
the backward recomputes each chunk's logits and turns them into gradients at once (what GenLIP / MaMMUT call a
chunked cross-entropy).

Per token t with logits z, target y and smoothing e over V classes (PyTorch's ``label_smoothing``):
    loss_t = (1 - e) * (lse(z) - z_y) + e * (lse(z) - mean_v z_v),      d loss_t / d z = softmax(z) - (1 - e) 1_y - e / V
"""
from __future__ import annotations

import torch


def _chunk_loss(h, w, y, keep, smoothing: float):
    """Per-token losses [n] (0 where ``keep`` is False) of hidden states h [n, W] through w [W, V]."""
    z = h @ w  # [n, V]; under autocast or with half inputs a half matmul, reduced in fp32 below
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = (1.0 - smoothing) * (lse - target)
    if smoothing:
        loss = loss + smoothing * (lse - z.mean(dim=-1))
    return torch.where(keep, loss, torch.zeros_like(loss))


class _ChunkedTokenCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, smoothing: float, chunk: int):
        keep = labels != ignore_index
        out = torch.cat([_chunk_loss(hidden[i:i + chunk], weight, labels[i:i + chunk], keep[i:i + chunk], smoothing)
                         for i in range(0, hidden.shape[0], chunk)]) if hidden.shape[0] else hidden.new_zeros(0)
        ctx.save_for_backward(hidden, weight, labels, keep)
        ctx.smoothing, ctx.chunk = smoothing, chunk
        return out  # fp32 for half inputs: per-sample sums of many token losses need the precision

    @staticmethod
    def backward(ctx, grad):  # grad: [n] per-token loss gradients
        hidden, weight, labels, keep = ctx.saved_tensors
        e, chunk = ctx.smoothing, ctx.chunk
        gh = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                         device=weight.device) if ctx.needs_input_grad[1] else None
        v = weight.shape[1]
        for i in range(0, hidden.shape[0], chunk):
            h, y, k = hidden[i:i + chunk], labels[i:i + chunk], keep[i:i + chunk]
            z = h @ weight
            g = torch.softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)  # [n, V]
            g.scatter_add_(1, y.clamp(min=0).unsqueeze(1), torch.full_like(g[:, :1], -(1.0 - e)))
            if e:
                g.sub_(e / v)
            g.mul_((grad[i:i + chunk] * k).to(g.dtype).unsqueeze(1))
            if gh is not None:
                gh[i:i + chunk] = (g.to(weight.dtype) @ weight.t()).to(gh.dtype)
            if gw is not None:
                gw.add_(h.t().to(g.dtype) @ g)
        return gh, (gw.to(weight.dtype) if gw is not None else None), None, None, None, None


def chunked_token_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = 0,
                     label_smoothing: float = 0.0, chunk: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy [n] of ``hidden`` [n, W] @ ``weight`` [W, V] against ``labels`` [n] (0 where the
    label is ``ignore_index``), ``chunk`` tokens' logits at a time in the forward and in the backward."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedTokenCE.apply(hidden, weight, labels, int(ignore_index), float(label_smoothing), int(chunk))
