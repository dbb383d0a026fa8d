"""The one model factory: ``create_model(ModelConfig)`` builds every model evaclip trains, evaluates, exports
or rebuilds from a checkpoint.

    model = create_model(cfg.model)                      # training (architecture from cfg.model.name)
    record = model_record(cfg.model)                     # what checkpoints and exports carry
    model = model_from_record(record)                    # eval / export / resume: the same model, no files needed
    model = create_model("EVA02-B-16", device="meta")    # by name with default knobs (parameter counts)

The record holds the whole ``[model]`` config section (knobs: ``max_logit_scale``, ``attn_impl``, text
activation, logit bias, ...) and the full architecture (``Variant.to_dict()``), so a user-defined
architecture is rebuilt from its checkpoint alone.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from evaclip.config import ModelConfig, to_dict
from evaclip.files import ConfigError, from_dict
from evaclip.models.clip import CLIP, ImageTower
from evaclip.models.coca import CoCa
from evaclip.models.eva_vit import Eva
from evaclip.models.mim import MIMStudent
from evaclip.models.registry import Variant, get_variant, list_models
from evaclip.models.text import HFTextEncoder, TextTransformer

__all__ = ["CLIP", "CoCa", "Eva", "MIMStudent", "create_mim_student", "TextTransformer", "HFTextEncoder", "Variant", "create_model", "get_variant",
           "list_models", "model_record", "model_from_record", "record_variant"]


def _text_tower(variant: Variant, cfg, load_hf_weights: bool):
    if cfg.kind == "clip":
        return TextTransformer(**variant.text, output_dim=variant.embed_dim, act=cfg.act, attn_impl=cfg.attn_impl)
    if not cfg.hf_path:
        raise ValueError("model.text.hf_path is required when model.text.kind = 'hf'")
    return HFTextEncoder(cfg.hf_path, variant.embed_dim, pooler=cfg.hf_pooler, pretrained=load_hf_weights,
                         context_length=variant.context_length)


def create_model(cfg, arch: Optional[Variant] = None, device: Optional[Union[str, torch.device]] = None,
                 load_hf_weights: bool = True, distill_dim: int = 0, coca: Optional[Dict] = None) -> CLIP:
    """Build the (randomly initialised) CLIP a ``ModelConfig`` describes.

    ``cfg``: a ``ModelConfig`` or a model name (default knobs). ``arch``: the architecture, when it comes
    from a record rather than ``cfg.name``. ``device='meta'`` counts parameters without memory.
    ``load_hf_weights``: a Hugging Face text tower loads its pretrained weights (off when rebuilding).
    ``distill_dim``: a distillation head to a teacher's embedding width (feature regression across widths).
    ``coca``: a CoCa's decoder (``{"decoder_layers": n, "n_queries": q}``): the CLIP plus a caption decoder.
    """

    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    variant = arch or get_variant(cfg.name, cfg.model_dir)
    with torch.device(device if device is not None else "cpu"):
        trunk = Eva(**variant.vision, num_classes=variant.embed_dim, global_pool="token",
                    patch_drop_rate=cfg.vision.patch_dropout, attn_impl=cfg.vision.attn_impl)
        kw = dict(init_logit_scale=math.log(1 / cfg.init_temperature), max_logit_scale=math.log(cfg.max_logit_scale),
                  init_logit_bias=cfg.init_logit_bias if cfg.use_logit_bias else None, distill_dim=distill_dim)
        visual, text = ImageTower(trunk, variant.image_size), _text_tower(variant, cfg.text, load_hf_weights)
        if coca:
            if not isinstance(text, TextTransformer):
                raise ValueError("a CoCa needs the CLIP text tower (model.text.kind = 'clip'): its causal token "
                                 "states are the decoder's input")
            model = CoCa(visual, text, variant.embed_dim, int(coca["decoder_layers"]), int(coca["n_queries"]), **kw)
        else:
            model = CLIP(visual, text, variant.embed_dim, **kw)
    model.set_grad_checkpointing(cfg.vision.grad_checkpointing, cfg.text.grad_checkpointing)
    return model


def create_mim_student(cfg, target_dim: int, arch: Optional[Variant] = None,
                       device: Optional[Union[str, torch.device]] = None) -> MIMStudent:
    """The MIM student of the image tower ``cfg`` (a ``ModelConfig``) describes, with a head to ``target_dim``."""
    variant = arch or get_variant(cfg.name, cfg.model_dir)
    with torch.device(device if device is not None else "cpu"):
        trunk = Eva(**variant.vision, num_classes=0, global_pool="token", attn_impl=cfg.vision.attn_impl)
        model = MIMStudent(trunk, variant.image_size, target_dim)
    model.set_grad_checkpointing(cfg.vision.grad_checkpointing)
    return model


def model_record(cfg, arch: Optional[Variant] = None, extras: Optional[Dict] = None) -> Dict:
    """What a checkpoint / export records to rebuild the model: the ``[model]`` section and the architecture,
    and an objective's ``extras``: a MIM student's head width (``{"mim": {"target_dim": n}}``), a distillation
    head's (``{"distill": {"target_dim": n}}``), a CoCa's decoder (``{"coca": {...}}``)."""

    variant = arch or get_variant(cfg.name, cfg.model_dir)
    record = {"config": to_dict(cfg), "arch": variant.to_dict()}
    record.update(extras or {})
    return record


def _record_parts(record: Dict):
    if not isinstance(record, dict) or "config" not in record or "arch" not in record:
        raise ConfigError("this checkpoint / export has no model record (written by an older evaclip?); "
                          "re-export it from its run")
    return from_dict(ModelConfig, record["config"], "model."), Variant.from_dict(record["arch"], "model record")


def record_variant(record: Dict) -> Variant:
    """The architecture of a model record."""
    return _record_parts(record)[1]


def model_from_record(record: Dict, device: Optional[Union[str, torch.device]] = None):
    """The same (untrained) model ``model_record`` described, through the same factory (a CLIP, or a
    ``MIMStudent`` for a MIM run's record)."""
    cfg, variant = _record_parts(record)
    if "mim" in record:
        return create_mim_student(cfg, int(record["mim"]["target_dim"]), variant, device=device)
    return create_model(cfg, variant, device=device, load_hf_weights=False,
                        distill_dim=int(record.get("distill", {}).get("target_dim", 0)), coca=record.get("coca"))
