"""What one micro-batch of the real model holds and costs, found by running its forward and backward on the meta
device (shapes only: no memory, no arithmetic; seconds even for EVA02-E-14-plus at micro-batch 1024).

* activations: the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``), per tower, each
  storage counted once and the parameters left out (they are the weights). Token dropping, gradient
  checkpointing and the attention kernel act on it as they do in training: the same modules run. On the meta
  device a fused attention kernel keeps what it keeps on a GPU (models/attention.py ``_FusedOnMeta``).
* FLOPs: torch's ``FlopCounterMode`` over the same forward (and backward), with attention written out as matmuls
  (``math``) so it is counted; two FLOPs per multiply-add, the convention of open_clip's model profile.
* A CoCa's caption half (pooler, decoder, the chunked loss's input) is traced as what a whole forward saves beyond
  the two towers, for captions as long as the context (every position a token: the most a batch can hold).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch

from evaclip.losses import mim_loss
from evaclip.models import create_mim_student, create_model

TOWERS = ("visual", "text")


@dataclasses.dataclass
class TowerTrace:
    """One tower at one micro-batch: what autograd keeps, and the extra a checkpointed block holds in backward."""

    saved_bytes: int  # tensors saved for backward over the whole forward
    recompute_bytes: int  # with gradient checkpointing: one block's activations, alive while it is recomputed


def build(model_cfg, variant, dtype: torch.dtype, attn_impl: str = "", coca: Optional[Dict] = None,
          distill_dim: int = 0, mim_dim: int = 0):
    """The model on the meta device in the dtype it computes in, locked as the trainer locks it (``coca``: a
    CoCa's decoder, as the factory takes it; ``distill_dim``: a distillation head; ``mim_dim``: a MIM student with
    a head to the teacher's feature width instead of a CLIP)."""

    if attn_impl:
        model_cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, attn_impl=attn_impl),
                                        text=dataclasses.replace(model_cfg.text, attn_impl=attn_impl))
    if mim_dim:
        return create_mim_student(model_cfg, mim_dim, variant, device="meta").to(dtype).train()
    model = create_model(model_cfg, variant, device="meta", load_hf_weights=False, coca=coca,
                         distill_dim=distill_dim).to(dtype)
    for tower, section in (("visual", model_cfg.vision), ("text", model_cfg.text)):
        if section.lock:
            model.lock_tower(tower, section.unlocked_layers)
    return model.train()


def _inputs(variant, batch: int, dtype: torch.dtype):
    image = torch.zeros(batch, 3, variant.image_size, variant.image_size, device="meta", dtype=dtype)
    text = torch.zeros(batch, variant.context_length, dtype=torch.long, device="meta")
    return image, text


def _forwards(model, image, text, mim_dim: int) -> Dict[str, Callable]:
    """Each tower's forward as training runs it: a CLIP's encoders, or a MIM student's forward and loss against a
    teacher's targets (shapes only: which positions are masked does not change what is saved)."""
    if mim_dim:
        n = model.grid[0] * model.grid[1]
        mask = torch.zeros(image.shape[0], n, dtype=torch.bool, device=image.device)
        target = torch.zeros(image.shape[0], n, mim_dim, device=image.device)
        return {"visual": lambda: mim_loss(model(image, mask)["pred"], target, mask, 1.0)}
    return {"visual": lambda: model.encode_image(image), "text": lambda: model.encode_text(text)}


def saved_bytes(model, tower: str, image, text) -> int:
    """Bytes autograd saves for backward in ``tower``'s forward: each storage once, parameters excluded."""
    return _saved(model, _forwards(model, image, text, 0)[tower])


def _saved(model, forward: Callable) -> int:
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata  # views of one tensor share it: counted once, as memory holds them
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _caption_forward(model, image, text):
    """A CoCa's forward up to the caption loss's input: the hidden states [B * (L - 1), W] of every position."""
    _, context = model.image_context(image)
    _, states = model.text.forward_tokens(text)
    h = model.decoder(states[:, :-1], context)
    return h.reshape(-1, h.shape[-1])


def trace_caption(model, variant, batch: int, dtype: torch.dtype) -> int:
    """A CoCa's caption half at micro-batch ``batch``: what its whole forward saves beyond the two towers (the
    pooler, the decoder, the text states it reads) plus what the chunked loss keeps (its input and the labels);
    ``model``: the CoCa as ``build`` makes it (the planner's own)."""
    image, text = _inputs(variant, batch, dtype)
    towers = sum(saved_bytes(model, tower, image, text) for tower in TOWERS)
    whole = _saved(model, lambda: _caption_forward(model, image, text))
    width, tokens = model.decoder.ln_final.normalized_shape[0], batch * (variant.context_length - 1)
    return max(0, whole - towers) + tokens * (width * torch.empty((), dtype=dtype).element_size() + 8 + 1)


def caption_flops(model_cfg, variant, coca: Dict) -> float:
    """Training FLOPs per sample of a CoCa's caption half (every position a token): the pooler and the decoder,
    forward and backward, counted; and the vocabulary projection, 2 W V a token forward and, in the chunked
    backward, its recomputation and two gradients (8 W V in all)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(model_cfg, variant, torch.float32, attn_impl="math", coca=coca)
    image, text = _inputs(variant, 1, torch.float32)
    with torch.no_grad():  # the towers' own FLOPs are count_flops'
        tokens = model.visual.trunk.forward_features(image)
        states = model.text.forward_tokens(text)[1]
    tokens, states = tokens.detach().requires_grad_(), states.detach().requires_grad_()
    with FlopCounterMode(display=False) as fc:
        h = model.decoder(states[:, :-1], model.decoder_pool(tokens))
        h.sum().backward()
    width, vocab = model.decoder.text_projection.shape
    return float(fc.get_total_flops()) + 8.0 * width * vocab * (variant.context_length - 1)


def trace_towers(model_cfg, variant, batch: int, dtype: torch.dtype, distill_dim: int = 0,
                 mim_dim: int = 0) -> Dict[str, TowerTrace]:
    """Each tower's activations at micro-batch ``batch`` (meta device); a MIM student's (``mim_dim``): its image
    tower, head and loss."""
    model = build(model_cfg, variant, dtype, distill_dim=distill_dim, mim_dim=mim_dim)
    image, text = _inputs(variant, batch, dtype)
    out = {}
    for tower, forward in _forwards(model, image, text, mim_dim).items():
        ckpt = (model_cfg.vision if tower == "visual" else model_cfg.text).grad_checkpointing
        saved = _saved(model, forward)
        recompute = 0
        if ckpt:  # backward recomputes one block at a time: its activations come back while it runs
            model.set_grad_checkpointing(False, False)
            full = _saved(model, forward)
            model.set_grad_checkpointing(model_cfg.vision.grad_checkpointing, model_cfg.text.grad_checkpointing)
            recompute = max(0, full - saved) // _depth(variant, tower)
        out[tower] = TowerTrace(saved_bytes=saved, recompute_bytes=recompute)
    return out


def _depth(variant, tower: str) -> int:
    """Blocks in ``tower`` (timm Eva's ``depth``, the text transformer's ``layers``)."""
    return max(1, int(variant.vision.get("depth", 1)) if tower == "visual" else int(variant.text.get("layers", 1)))


def count_flops(model_cfg, variant, patch_dropout: float, mim_dim: int = 0) -> Dict[str, float]:
    """FLOPs per sample: ``forward_full`` (image + text forward, no token dropping: what open_clip's profile
    lists; a MIM student's forward) and ``train`` (forward + backward at ``patch_dropout``, the trainable towers'
    backward only)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, patch_dropout=0.0)),
                  variant, torch.float32, attn_impl="math", mim_dim=mim_dim)
    image, text = _inputs(variant, 1, torch.float32)
    if mim_dim:
        forward = _forwards(model, image, text, mim_dim)["visual"]
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            forward()
        forward_full = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            forward().backward()
        return {"forward_full": float(forward_full), "train": float(fc.get_total_flops())}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(image, text)
    forward_full = fc.get_total_flops()
    model = build(dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision,
                                                                             patch_dropout=patch_dropout)),
                  variant, torch.float32, attn_impl="math")
    with FlopCounterMode(display=False) as fc:
        out = model(image, text)
        loss = out["image_features"].sum() + out["text_features"].sum()
        if loss.requires_grad:
            loss.backward()
    return {"forward_full": float(forward_full), "train": float(fc.get_total_flops())}
