"""CoCa (Yu et al. 2022): the CLIP towers plus a multimodal text decoder that captions the image.

The image tower's tokens give the contrastive embedding through the tower's own head (so the towers export to
open_clip / timm as a CLIP's do) and, through an attentional pooler (``n_queries`` learned queries), the context
the decoder cross-attends to. The text tower is causal: its token states at position t see tokens <= t only, so
they are the decoder's input (CoCa's unimodal half); the decoder alternates causal self-attention and
cross-attention blocks (open_clip's ``MultimodalTransformer`` layout: ``resblocks``, ``cross_attn``, ``ln_final``,
``text_projection``) and predicts token t + 1. With token dropping the pooler attends to the kept tokens.

``forward`` returns, besides a CLIP's outputs, per-sample ``caption_nll`` (summed over the caption's tokens) and
``caption_tokens`` (how many were predicted): per-sample, so the objective's feature caching concatenates them
like the embeddings. ``generate`` writes captions (greedy, beam or top-p) with a key/value cache.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.losses.caption import chunked_token_ce
from evaclip.models.clip import CLIP, ImageTower
from evaclip.models.text import ResidualAttentionBlock, TextTransformer, init_blocks


class CrossAttention(nn.Module):
    """Queries from x [B, L, W], keys and values from a context [B, N, C]."""

    def __init__(self, width: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(context_dim, width)
        self.v_proj = nn.Linear(context_dim, width)
        self.out_proj = nn.Linear(width, width)

    def kv(self, context):  # -> 2 x [B, H, N, hd]: computed once per image when generating
        b, n, _ = context.shape
        return tuple(p(context).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))

    def forward(self, x, context=None, kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        b, n, w = x.shape
        k, v = kv if kv is not None else self.kv(context)
        q = self.q_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries attend to the image tokens: [B, N, C] -> [B, Q, W]."""

    def __init__(self, width: int, context_dim: int, heads: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, width) * width ** -0.5)
        self.ln_q, self.ln_k = nn.LayerNorm(width), nn.LayerNorm(context_dim)
        self.attn = CrossAttention(width, context_dim, heads)

    def forward(self, tokens):
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, self.ln_k(tokens))


class CrossAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1, self.ln_1_kv, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CrossAttention(width, width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(), nn.Linear(int(width * mlp_ratio), width))

    def context_kv(self, image_embs):
        return self.attn.kv(self.ln_1_kv(image_embs))

    def forward(self, x, image_embs=None, kv=None):
        x = x + self.attn(self.ln_1(x), kv=kv if kv is not None else self.context_kv(image_embs))
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    """Text states [B, L, W] and image context [B, Q, W] -> next-token hidden states [B, L, W]."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, vocab_size: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, "gelu", "sdpa")
                                        for _ in range(layers)])
        self.cross_attn = nn.ModuleList([CrossAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, vocab_size))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """open_clip's CLIP text init (every tensor set: the self-attention's packed projection starts empty)."""
        w, n = self.ln_final.normalized_shape[0], len(self.resblocks)
        init_blocks(self.resblocks, w)
        proj_std, attn_std, fc_std = w ** -0.5 * (2 * n) ** -0.5, w ** -0.5, (2 * w) ** -0.5
        for blk in self.cross_attn:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                nn.init.normal_(lin.weight, std=attn_std)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp[0].weight, std=fc_std)
            nn.init.normal_(blk.mlp[2].weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def forward(self, x, image_embs):
        for blk, cross in zip(self.resblocks, self.cross_attn):
            x = cross(blk(x, causal=True), image_embs)
        return self.ln_final(x)


def _self_attn_step(blk: ResidualAttentionBlock, x, cache: List):
    """One causal block on new positions x [B, n, W] given the cached keys / values of the earlier ones (``cache``:
    [k, v] or empty, extended in place): what the block's forward gives at those positions."""
    a = blk.attn
    b, n, w = x.shape
    qkv = F.linear(blk.ln_1(x), a.in_proj_weight, a.in_proj_bias).view(b, n, 3, a.heads, w // a.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if cache:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    cache[:] = [k, v]
    # the new positions see every cached one and, among themselves, the earlier ones
    t = k.shape[2]
    mask = torch.ones(n, t, dtype=torch.bool, device=x.device).tril(t - n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + a.out_proj(out.transpose(1, 2).reshape(b, n, w))
    return x + blk.mlp(blk.ln_2(x))


class CoCa(CLIP):
    def __init__(self, visual: ImageTower, text: TextTransformer, embed_dim: int, decoder_layers: int = 2,
                 n_queries: int = 32, pad_id: int = 0, **clip_kw):
        super().__init__(visual, text, embed_dim, **clip_kw)
        w, heads = text.transformer.width, text.transformer.resblocks[0].attn.heads
        mlp_ratio = text.transformer.resblocks[0].mlp.c_fc.out_features / w
        self.decoder_pool = AttentionalPooler(w, visual.trunk.embed_dim, heads, n_queries)
        self.decoder = MultimodalDecoder(w, decoder_layers, heads, mlp_ratio, text.vocab_size)
        self.pad_id = pad_id
        self.label_smoothing, self.ce_chunk = 0.0, 1024  # the caption loss's settings (``set_caption_loss``)

    def set_caption_loss(self, label_smoothing: float, chunk: int) -> None:
        self.label_smoothing, self.ce_chunk = label_smoothing, chunk

    def image_context(self, image, drop_noise=None):
        """(contrastive image features [B, E], the decoder's image context [B, Q, W])."""
        tokens = self.visual.trunk.forward_features(image, drop_noise=drop_noise)  # [B, 1 + K, D]
        return self.visual.trunk.forward_head(tokens), self.decoder_pool(tokens)

    def forward(self, image, text, drop_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        img, context = self.image_context(image, drop_noise)
        txt, states = self.text.forward_tokens(text)  # [B, E], [B, L, W]
        h = self.decoder(states[:, :-1], context)  # predicts tokens 1..L-1
        labels = text[:, 1:]
        # the vocabulary projection only where there is a token to predict (captions are mostly padding)
        keep = labels != self.pad_id  # [B, L-1]
        nll = chunked_token_ce(h[keep], self.decoder.text_projection, labels[keep], self.pad_id,
                               self.label_smoothing, self.ce_chunk)  # [tokens]
        owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
        per_sample = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, owner, nll)
        out = {"image_features": F.normalize(img, dim=-1), "text_features": F.normalize(txt, dim=-1),
               "logit_scale": self.logit_scale_exp().squeeze(0),
               "caption_nll": per_sample, "caption_tokens": keep.sum(dim=1)}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.squeeze(0)
        return out

    def caption_logits(self, image_context, prefix):
        """Next-token logits [B, V] after each prefix [B, t] (no cache: the whole prefix through both halves)."""
        _, states = self.text.forward_tokens(prefix)
        return self.decoder(states, image_context)[:, -1] @ self.decoder.text_projection

    def caption_stepper(self, image_context):
        """A function (new tokens [B, n] -> next-token logits [B, V]) that keeps every layer's keys and values, so
        each generated token costs one position's work; ``reorder(index)`` follows a beam's reordering."""
        text, dec = self.text, self.decoder
        caches = [[] for _ in range(len(text.transformer.resblocks) + len(dec.resblocks))]
        kvs = [cross.context_kv(image_context) for cross in dec.cross_attn]
        pos = [0]

        def step(tokens):
            n = tokens.shape[1]
            x = text.token_embedding(tokens) + text.positional_embedding[pos[0]:pos[0] + n]
            for blk, cache in zip(text.transformer.resblocks, caches):
                x = _self_attn_step(blk, x, cache)
            x = text.ln_final(x)
            for blk, cross, cache, kv in zip(dec.resblocks, dec.cross_attn, caches[len(text.transformer.resblocks):], kvs):
                x = cross(_self_attn_step(blk, x, cache), kv=kv)
            pos[0] += n
            return dec.ln_final(x[:, -1]) @ dec.text_projection

        def reorder(index):
            for c in caches:
                c[:] = [t.index_select(0, index) for t in c]
            kvs[:] = [tuple(t.index_select(0, index) for t in kv) for kv in kvs]

        step.reorder = reorder
        return step
