"""Caption generation from a CoCa model: greedy, beam search and top-p (nucleus) sampling, with a key/value cache
(each new token costs one position's work) or without (the whole prefix again each step: the reference the cache
is tested against).

Every caption starts at the start-of-text token and stops at end-of-text or ``max_len`` tokens (start included),
like open_clip's ``CoCa.generate``; what comes back is the token ids without the start token, one list per image
(``caption_texts``: decoded to strings by the tokenizer the model was trained with).
"""
from __future__ import annotations

from typing import List, Optional

import torch

METHODS = ("greedy", "beam", "top_p")


def _next_logits(model, context, seqs, stepper, fresh: int):
    """Next-token logits [B, V]: through the cache (feeding the ``fresh`` newest tokens) or the whole prefix."""
    if stepper is not None:
        return stepper(seqs[:, -fresh:])
    return model.caption_logits(context, seqs)


def nucleus(probs: torch.Tensor, top_p: float, head: int = 256):
    """The smallest set of most probable tokens whose mass reaches ``top_p`` (Holtzman et al. 2020), per row of
    ``probs`` [B, V]: (their probabilities, zero outside the set, [B, n]; their token ids [B, n]). The set is
    nearly always a few tokens: only the ``head`` most probable are sorted, and the whole vocabulary only where
    their mass does not exceed ``top_p`` (past it every further token lies outside the set anyway)."""
    sorted_p, order = probs.topk(min(head, probs.shape[-1]), dim=-1)
    if sorted_p.shape[-1] < probs.shape[-1] and bool((sorted_p.sum(-1) <= top_p).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # the mass before a token already exceeds top_p
    return sorted_p.masked_fill(outside, 0.0), order


def _top_p(logits, top_p: float, temperature: float, generator):
    kept, order = nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    pick = torch.multinomial(kept / kept.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def generate(model, images: torch.Tensor, sot: int, eot: int, max_len: int = 20, method: str = "greedy",
             beams: int = 3, top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
             cache: bool = True) -> List[List[int]]:
    """Captions of ``images`` [B, 3, H, W] (preprocessed for ``model``): token ids per image, start token
    excluded, end token excluded."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    max_len = min(max_len, model.text.context_length)
    _, context = model.image_context(images)  # [B, Q, W]
    if method == "beam":
        return [_beam(model, context[i:i + 1], sot, eot, max_len, beams, cache) for i in range(context.shape[0])]
    b = context.shape[0]
    seqs = torch.full((b, 1), sot, dtype=torch.long, device=images.device)
    done = torch.zeros(b, dtype=torch.bool, device=images.device)
    stepper = model.caption_stepper(context) if cache else None
    generator = torch.Generator(device=images.device).manual_seed(seed) if method == "top_p" else None
    while seqs.shape[1] < max_len and not bool(done.all()):
        logits = _next_logits(model, context, seqs, stepper, 1)
        nxt = logits.argmax(-1) if method == "greedy" else _top_p(logits, top_p, temperature, generator)
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eot
    return [_strip(s.tolist(), eot) for s in seqs]


def caption_texts(model, images: torch.Tensor, tokenizer, method: str = "greedy", max_len: int = 20,
                  **kw) -> List[str]:
    """Captions of ``images`` as text: ``generate`` from the ``tokenizer``'s start / end ids (``sot``, ``eot``),
    then its ``decode``; ``kw``: ``generate``'s options."""
    return [tokenizer.decode(t) for t in generate(model, images, tokenizer.sot, tokenizer.eot, max_len, method, **kw)]


def _beam(model, context, sot: int, eot: int, max_len: int, beams: int, cache: bool) -> List[int]:
    """Beam search for one image: the finished caption of highest mean log-probability per token (length-
    normalised, so short captions are not favoured for being short)."""
    dev = context.device
    seqs = torch.full((1, 1), sot, dtype=torch.long, device=dev)
    scores = torch.zeros(1, device=dev)
    stepper = model.caption_stepper(context) if cache else None
    finished: List = []
    while seqs.shape[1] < max_len and seqs.shape[0]:
        ctx = context.expand(seqs.shape[0], -1, -1)
        logp = torch.log_softmax(_next_logits(model, ctx, seqs, stepper, 1).float(), dim=-1)  # [k, V]
        total = (scores[:, None] + logp).flatten()
        top = total.topk(min(beams, total.numel()))
        rows, toks = top.indices // logp.shape[1], top.indices % logp.shape[1]
        seqs = torch.cat([seqs[rows], toks[:, None]], dim=1)
        ended = toks == eot
        for s, sc in zip(seqs[ended], top.values[ended]):
            finished.append((float(sc) / (s.shape[0] - 1), s.tolist()))
        keep = (~ended).nonzero().squeeze(1)
        seqs, scores = seqs[keep], top.values[keep]
        if len(finished) >= beams:
            break
        if stepper is not None:
            stepper.reorder(rows[keep])
    for s, sc in zip(seqs, scores):  # beams still open at max_len
        finished.append((float(sc) / max(s.shape[0] - 1, 1), s.tolist()))
    best: Optional[list] = max(finished, key=lambda f: f[0])[1] if finished else [sot]
    return _strip(best, eot)


def _strip(tokens: List[int], eot: int) -> List[int]:
    tokens = tokens[1:]
    return tokens[:tokens.index(eot)] if eot in tokens else tokens
