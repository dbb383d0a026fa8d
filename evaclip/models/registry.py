"""The model zoo as data: each variant names its image-tower architecture (timm ``Eva`` kwargs), its text
tower, the CLIP embedding width and the published size. Names follow open_clip's model configs.

Our own small variants (``*-Ti-*``) exist for tests and the CPU demo; they are also registered as timm
model names (``register_timm_variants``) so open_clip can build their image tower from an export.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Variant:
    """One CLIP architecture. ``vision`` are ``Eva`` kwargs; ``text`` are ``TextTransformer`` kwargs."""

    name: str
    embed_dim: int
    timm_name: str  # the timm model whose architecture (and state dict) the image tower equals
    vision: Dict
    text: Dict
    published_params: Optional[float] = None  # total (image + text), open_clip's docs/model_profile.csv
    gflops: Optional[float] = None  # forward FLOPs per image-text pair (same profile; 2 FLOPs per MAC)
    register_in_timm: bool = False  # True for our own variants that timm does not ship
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"

    @property
    def image_size(self) -> int:
        return self.vision["img_size"]

    @property
    def context_length(self) -> int:
        return self.text.get("context_length", 77)


# image towers (timm Eva kwargs; global_pool 'token' as open_clip builds them)
_EVA02_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, qkv_fused=False,
                  mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                  use_rot_pos_emb=True, ref_feat_shape=(16, 16))
_EVA02_L14 = dict(_EVA02_B16, patch_size=14, embed_dim=1024, depth=24, num_heads=16)
_EVA02_E14 = dict(img_size=224, patch_size=14, embed_dim=1792, depth=64, num_heads=16, mlp_ratio=15360 / 1792,
                  use_post_norm=True)
_EVA01_G14 = dict(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408)
# tiny research variants for tests and the CPU demo (64 px, 8x8 patches -> 64 tokens)
_EVA02_TI8 = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, qkv_fused=False,
                  mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                  use_rot_pos_emb=True, ref_feat_shape=(8, 8))
_EVA02E_TI8 = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
                   use_post_norm=True)
_EVA01_TI8 = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)


def _text(width, heads, layers, ctx=77):
    return dict(context_length=ctx, vocab_size=49408, width=width, heads=heads, layers=layers)


VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("EVA02-B-16", 512, "eva02_base_patch16_clip_224", _EVA02_B16, _text(512, 8, 12), 149.69e6, 41.09),
    Variant("EVA02-L-14", 768, "eva02_large_patch14_clip_224", _EVA02_L14, _text(768, 12, 12), 427.76e6, 175.3),
    Variant("EVA02-L-14-336", 768, "eva02_large_patch14_clip_336", dict(_EVA02_L14, img_size=336),
            _text(768, 12, 12), 428.08e6, 395.16),
    Variant("EVA02-E-14", 1024, "eva02_enormous_patch14_clip_224", _EVA02_E14, _text(1024, 16, 24), 4704.59e6,
            2311.42),
    Variant("EVA02-E-14-plus", 1024, "eva02_enormous_patch14_clip_224", _EVA02_E14, _text(1280, 20, 32),
            5044.89e6, 2362.19),
    Variant("EVA01-g-14", 1024, "eva_giant_patch14_224", _EVA01_G14, _text(768, 12, 12), 1136.44e6, 547.36),
    Variant("EVA01-g-14-plus", 1024, "eva_giant_patch14_224", _EVA01_G14, _text(1024, 16, 24), 1366.62e6, 581.15),
    Variant("EVA02-Ti-8-64", 128, "evaclip_eva02_tiny_patch8_64", _EVA02_TI8, _text(128, 4, 4, ctx=32),
            register_in_timm=True),
    Variant("EVA02E-Ti-8-64", 128, "evaclip_eva02e_tiny_patch8_64", _EVA02E_TI8, _text(128, 4, 4, ctx=32),
            register_in_timm=True),
    Variant("EVA01-Ti-8-64", 128, "evaclip_eva01_tiny_patch8_64", _EVA01_TI8, _text(128, 4, 4, ctx=32),
            register_in_timm=True),
]}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def list_models():
    return list(VARIANTS)


_registered = set()
# timm reads a registering module's ``default_cfgs`` for the pretrained cfg (input size, mean/std) of a name
default_cfgs: Dict[str, Dict] = {}


def register_timm_variants() -> None:
    """Register our own variants with timm so ``timm.create_model(<name>)`` (and open_clip) can build them.

    ``pretrained=True`` works with a local file: ``pretrained_cfg_overlay=dict(file=<export>/timm_image_tower.safetensors)``.
    """
    from timm.models import register_model
    from timm.models._registry import is_model

    for v in VARIANTS.values():
        if not v.register_in_timm or v.timm_name in _registered or is_model(v.timm_name):
            continue

        def _fn(pretrained: bool = False, _args=v.vision, _name=v.timm_name, **kwargs):
            from timm.models.eva import _create_eva

            return _create_eva(_name, pretrained=pretrained, **dict(_args, **kwargs))

        _fn.__name__ = v.timm_name
        _fn.__module__ = __name__
        default_cfgs[v.timm_name] = dict(
            url="", num_classes=v.embed_dim, input_size=(3, v.image_size, v.image_size), pool_size=None,
            crop_pct=1.0, interpolation=v.interpolation, mean=v.mean, std=v.std, first_conv="patch_embed.proj",
            classifier="head", license="apache-2.0")
        register_model(_fn)
        _registered.add(v.timm_name)
