"""CoCa's costs: the training step against the CLIP step on the same towers, and caption generation with the
key/value cache against without it and against open_clip's ``CoCa.generate`` (its own ViT, the same sizes).

Step: EVA02-Ti-8-64 towers, fp32, AdamW, fixed tensors (no data loading), forward + backward + optimizer step;
CoCa adds the decoder (``coca_demo_cpu``'s: 1 block, 16 queries) and the chunked caption loss over the 49408-token
vocabulary. Generation: greedy captions of ``batch`` images, 20 tokens each (start included; untrained models,
so every caption runs to the full length), open_clip's ``generate`` with ``top_k = 1`` (greedy; it recomputes the
whole prefix every token).
"""
from __future__ import annotations

from typing import Dict

import torch

from bench.common import timeit
from evaclip.data.transforms import Tokenizer


def step_times(reps: int, batch: int) -> Dict:
    from evaclip.losses import ContrastiveLoss
    from evaclip.models import create_model

    g = torch.Generator().manual_seed(0)
    img, text = torch.randn(batch, 3, 64, 64, generator=g), torch.randint(1, 49000, (batch, 32), generator=g)
    tok = Tokenizer()
    text[:, 0], text[:, 12], text[:, 13:] = tok.sot, tok.eot, 0  # 12-token captions, then padding
    clip_loss = ContrastiveLoss("clip", "local")
    out = {}
    for name, coca in (("clip", None), ("coca", {"decoder_layers": 1, "n_queries": 16})):
        torch.manual_seed(0)
        model = create_model("EVA02-Ti-8-64", coca=coca).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            o = model(img, text)
            loss = clip_loss(o["image_features"], o["text_features"], o["logit_scale"])
            if "caption_nll" in o:
                loss = loss + 2.0 * o["caption_nll"].sum() / o["caption_tokens"].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out[name] = timeit(step, reps)
    out["coca_over_clip"] = out["coca"]["median"] / out["clip"]["median"]
    return out


def _open_clip_coca():
    """open_clip's CoCa at the demo's sizes. With the pinned transformers 5.x, open_clip 3.3 turns generation off
    at import (``BeamSearchScorer`` is gone from transformers); its greedy / top-k path uses only the logits
    processors, which import fine, so that path is turned back on here (beam search stays off)."""
    import open_clip
    from open_clip import coca_model
    from transformers import TopKLogitsWarper

    if not coca_model._has_transformers:
        coca_model._has_transformers = True
        coca_model.GENERATION_TYPES["top_k"] = TopKLogitsWarper
    model = open_clip.CoCa(
        embed_dim=128,
        multimodal_cfg={"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 1},
        text_cfg={"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4,
                  "embed_cls": True, "output_tokens": True},
        vision_cfg={"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32,
                    "attentional_pool": True, "attn_pooler_queries": 16, "attn_pooler_heads": 4,
                    "output_tokens": True}).eval()
    # open_clip leaves the decoder's vocabulary projection as torch.empty memory (zeros, or NaN garbage): set it as
    # evaclip's is, so both models decode real logits
    torch.nn.init.normal_(model.text_decoder.text_projection, std=128 ** -0.5)
    return model


def generation(reps: int, batch: int, max_len: int = 20) -> Dict:
    from evaclip.models import create_model
    from evaclip.models.generate import generate

    tok = Tokenizer()
    sot, eot = tok.sot, tok.eot
    torch.manual_seed(0)
    ours = create_model("EVA02-Ti-8-64", coca={"decoder_layers": 1, "n_queries": 16}).eval()
    theirs = _open_clip_coca()
    img = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = {}
    with torch.no_grad():
        res["evaclip_cache"] = timeit(lambda: generate(ours, img, sot, eot, max_len, "greedy", cache=True), reps)
        res["evaclip_no_cache"] = timeit(lambda: generate(ours, img, sot, eot, max_len, "greedy", cache=False), reps)
        res["open_clip"] = timeit(lambda: theirs.generate(img, seq_len=max_len, generation_type="top_k", top_k=1,
                                                             min_seq_len=2, fixed_output_length=True), reps)
    for k in ("evaclip_cache", "evaclip_no_cache", "open_clip"):
        res[k]["captions_per_s"] = batch / res[k]["median"]
    res["cache_over_open_clip"] = res["evaclip_cache"]["captions_per_s"] / res["open_clip"]["captions_per_s"]
    res["cache_over_no_cache"] = res["evaclip_cache"]["captions_per_s"] / res["evaclip_no_cache"]["captions_per_s"]
    return res


def run(reps: int = 5, batch: int = 64) -> Dict:
    return {"batch": batch, "reps": reps, "step": step_times(reps, batch), "generate": generation(reps, batch)}


def markdown(c: Dict) -> list:
    s, g = c["step"], c["generate"]
    ms = lambda r: f"{r['median'] * 1e3:.0f} ms ({r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f})"  # noqa: E731
    cps = lambda r: f"{r['captions_per_s']:.0f}"  # noqa: E731
    return ["## CoCa: step time and caption generation", "",
            f"EVA02-Ti-8-64 towers, batch {c['batch']}, fp32, CPU, fixed tensors; median of {c['reps']} repetitions "
            "after one warm-up. Step: forward + backward + AdamW; CoCa adds a 1-block decoder with 16 pooled queries "
            "and the chunked caption loss over the 49408-token vocabulary (12-token captions).", "",
            "| CLIP step | CoCa step | CoCa / CLIP |", "|---|---|---|",
            f"| {ms(s['clip'])} | {ms(s['coca'])} | {s['coca_over_clip']:.2f}x |", "",
            f"Greedy captions of {c['batch']} images, 20 tokens each (untrained models: full length); open_clip's "
            "`CoCa.generate` (top_k = 1, its own ViT of the same sizes) recomputes the whole prefix every token.", "",
            "| | evaclip, KV cache | evaclip, no cache | open_clip CoCa.generate |", "|---|---|---|---|",
            f"| batch time | {ms(g['evaclip_cache'])} | {ms(g['evaclip_no_cache'])} | {ms(g['open_clip'])} |",
            f"| captions / s | **{cps(g['evaclip_cache'])}** | {cps(g['evaclip_no_cache'])} | {cps(g['open_clip'])} |",
            "", f"KV cache vs open_clip: **{g['cache_over_open_clip']:.2f}x** captions/s; vs no cache: "
            f"{g['cache_over_no_cache']:.2f}x.", ""]
