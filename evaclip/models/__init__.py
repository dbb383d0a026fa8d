"""Model zoo and factory: ``create_model(ModelConfig)`` or ``create_model("EVA02-B-16")``."""
from __future__ import annotations

from typing import Optional, Union

import torch

from evaclip.models.clip import CLIP, ImageTower
from evaclip.models.eva_vit import Eva
from evaclip.models.registry import VARIANTS, Variant, get_variant, list_models
from evaclip.models.text import HFTextEncoder, TextTransformer

__all__ = ["CLIP", "Eva", "TextTransformer", "HFTextEncoder", "Variant", "VARIANTS", "create_model",
           "create_model_from_name", "get_variant", "list_models", "build_image_tower", "build_text_tower",
           "model_meta", "build_from_meta"]


def build_image_tower(variant: Variant, patch_dropout: float = 0.0, attn_impl: str = "sdpa") -> ImageTower:
    trunk = Eva(**variant.vision, num_classes=variant.embed_dim, global_pool="token",
                patch_drop_rate=patch_dropout, attn_impl=attn_impl)
    return ImageTower(trunk, variant.image_size)


def build_text_tower(variant: Variant, kind: str = "clip", act: str = "gelu", attn_impl: str = "sdpa",
                     hf_path: str = "", hf_pooler: str = "mean", hf_pretrained: bool = True):
    if kind == "clip":
        return TextTransformer(**variant.text, output_dim=variant.embed_dim, act=act, attn_impl=attn_impl)
    if kind == "hf":
        if not hf_path:
            raise ValueError("model.text.hf_path is required when model.text.kind = 'hf'")
        return HFTextEncoder(hf_path, variant.embed_dim, pooler=hf_pooler, pretrained=hf_pretrained,
                             context_length=variant.context_length)
    raise ValueError(f"model.text.kind must be 'clip' or 'hf', got {kind!r}")


def create_model_from_name(name: str, patch_dropout: float = 0.0, attn_impl: str = "sdpa",
                           text_act: str = "gelu", device: Optional[Union[str, torch.device]] = None) -> CLIP:
    """Build a randomly initialised CLIP by variant name (``device='meta'`` counts params without memory)."""
    variant = get_variant(name)
    ctx = torch.device(device) if device is not None else torch.device("cpu")
    with ctx:
        return CLIP(build_image_tower(variant, patch_dropout, attn_impl),
                    build_text_tower(variant, "clip", text_act, attn_impl), variant.embed_dim)


def model_meta(cfg) -> dict:
    """What a checkpoint records to rebuild the model without the experiment file (``build_from_meta``)."""
    return {"model": cfg.name, "text": {"kind": cfg.text.kind, "act": cfg.text.act, "hf_path": cfg.text.hf_path,
                                        "hf_pooler": cfg.text.hf_pooler},
            "logit_bias": cfg.use_logit_bias}


def build_from_meta(meta: dict) -> CLIP:
    """An (untrained) model with the architecture a checkpoint's meta describes."""
    variant = get_variant(meta["model"])
    t = meta.get("text", {"kind": "clip", "act": meta.get("text_act", "gelu")})
    text = build_text_tower(variant, t.get("kind", "clip"), t.get("act", "gelu"), hf_path=t.get("hf_path", ""),
                            hf_pooler=t.get("hf_pooler", "mean"), hf_pretrained=False)
    return CLIP(build_image_tower(variant), text, variant.embed_dim,
                init_logit_bias=0.0 if meta.get("logit_bias") else None)


def create_model(cfg) -> CLIP:
    """Build the model a ``ModelConfig`` section describes (architecture from the variant, knobs from cfg)."""
    import math

    variant = get_variant(cfg.name)
    visual = build_image_tower(variant, cfg.vision.patch_dropout, cfg.vision.attn_impl)
    text = build_text_tower(variant, cfg.text.kind, cfg.text.act, cfg.text.attn_impl, cfg.text.hf_path,
                            cfg.text.hf_pooler)
    model = CLIP(visual, text, variant.embed_dim, init_logit_scale=math.log(1 / cfg.init_temperature),
                 max_logit_scale=math.log(cfg.max_logit_scale),
                 init_logit_bias=cfg.init_logit_bias if cfg.use_logit_bias else None)
    model.set_grad_checkpointing(cfg.vision.grad_checkpointing, cfg.text.grad_checkpointing)
    return model
