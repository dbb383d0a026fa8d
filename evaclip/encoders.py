"""A trained model as what evaluation and curation need: its two encoders, its tokenizer, its preprocessing.

From an evaclip run / checkpoint, or from open_clip (a model name plus weights, or an export folder, e.g.
one written by ``evaclip export``). ``evaclip eval`` and ``evaclip data score`` load models only here."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence

import torch

from evaclip.checkpoint import checkpoint_identity, load_weights
from evaclip.data.transforms import make_tokenizer
from evaclip.errors import UserError
from evaclip.models import model_from_record, record_variant
from evaclip.models.convert import WHOLE_MODEL_FILES, weights_file
from evaclip.models.registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from evaclip.models.sources import fingerprint, resolve_source


@dataclass
class Encoders:
    encode_image: Callable  # images [n, 3, H, W] -> unnormalised embeddings [n, D]
    encode_text: Callable  # tokens [n, L] -> unnormalised embeddings [n, D]
    tokenizer: Callable
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: str
    name: str  # architecture name
    pretrained: str  # where the weights came from
    identity: str  # changes whenever the weights do (caches and resumable outputs are keyed by it)
    extra: Dict = field(default_factory=dict)  # step / checkpoint of an evaclip run
    logit_scale: float = 0.0  # exp(learned logit scale): a distillation teacher's temperature
    module: Any = None  # the model itself (a frozen teacher is checked to stay bit-identical)


def check_open_clip_folder(folder: str) -> None:
    """A ``--pretrained`` folder holds a whole CLIP: open_clip builds a model from its config alone and leaves
    whatever weights are missing at random init (a MIM or image-tower export scored as a random CLIP)."""
    import json

    if os.path.isdir(os.path.join(folder, "checkpoints")) or os.path.exists(os.path.join(folder, "manifest.json")):
        raise UserError(f"--pretrained {folder} is an evaclip run or checkpoint: pass it as --checkpoint")
    cfg_path = os.path.join(folder, "open_clip_config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"--pretrained {folder}: no open_clip_config.json (not an open_clip export folder)")
    with open(cfg_path) as f:
        record = json.load(f).get("evaclip", {}).get("model", {})
    if "mim" in record:
        raise UserError(f"--pretrained {folder} is the image tower of a masked-image-modeling run (no text tower): "
                        "evaluate or score the CLIP trained from it")

    if weights_file(folder, WHOLE_MODEL_FILES) is None:
        raise UserError(f"--pretrained {folder} holds no whole-model weights (open_clip_model.safetensors): an "
                        "export of one tower (--tower image / text) cannot score image-text pairs")


def load_encoders(checkpoint: str = "", model: str = "", pretrained: str = "", device: str = "cpu",
                  trust_pickle: bool = False) -> Encoders:
    """``checkpoint``: an evaclip run dir or checkpoint dir; or ``model`` = "open_clip:<name>" with
    ``pretrained`` a weights file, an open_clip export folder or an open_clip tag."""
    dev = torch.device(device)
    if checkpoint:
        sd, meta = load_weights(checkpoint, trust_pickle)
        v = record_variant(meta.get("model"))
        if "mim" in meta["model"]:
            raise UserError(f"{checkpoint} is a masked-image-modeling run (an image tower without a text tower): "
                            "evaluate or score with the CLIP trained from it (model.vision.init)")
        m = model_from_record(meta["model"])
        m.load_state_dict(sd)
        m.eval().to(dev)
        text = meta["model"]["config"]["text"]
        return Encoders(lambda x: m.encode_image(x, normalize=False), lambda t: m.encode_text(t, normalize=False),
                        make_tokenizer(v.context_length, text["kind"], text["hf_path"]), v.image_size, v.mean, v.std,
                        v.interpolation, v.name, os.path.abspath(checkpoint), checkpoint_identity(meta["checkpoint"]),
                        {"checkpoint": meta["checkpoint"], "step": meta["step"]},
                        float(m.logit_scale_exp().detach()), m)
    if model and model.startswith("open_clip:"):
        import open_clip  # heavy to import: only open_clip sources need it

        name = model[len("open_clip:"):]
        looks_like_path = pretrained and (os.sep in pretrained or
                                          pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))
        if looks_like_path and not os.path.exists(pretrained):
            raise UserError(f"--pretrained {pretrained}: no such file or folder")
        if name not in open_clip.list_models() and not (pretrained and os.path.isdir(pretrained)):
            raise UserError(f"--model open_clip:{name}: open_clip has no such model (open_clip.list_models())")
        if pretrained and os.path.isdir(pretrained):
            check_open_clip_folder(pretrained)
            m, _, _ = open_clip.create_model_and_transforms(f"local-dir:{pretrained}")
            tok = open_clip.get_tokenizer(f"local-dir:{pretrained}")
        else:
            m, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
            tok = open_clip.get_tokenizer(name)
        m.eval().to(dev)
        cfg = m.visual.preprocess_cfg if hasattr(m.visual, "preprocess_cfg") else {}
        size = m.visual.image_size[0] if isinstance(m.visual.image_size, (tuple, list)) else m.visual.image_size
        return Encoders(m.encode_image, m.encode_text, tok, size, cfg.get("mean", OPENAI_CLIP_MEAN),
                        cfg.get("std", OPENAI_CLIP_STD), cfg.get("interpolation", "bicubic"), name, pretrained or "",
                        fingerprint(name, pretrained or ""), {}, float(m.logit_scale.detach().exp()), m)
    raise UserError("needs --checkpoint <run dir|checkpoint> or --model open_clip:<name> [--pretrained ...]")


def load_source(src: str, weights: str = "", device: str = "cpu", trust_pickle: bool = False) -> Encoders:
    """A model named by one string, as a frozen teacher is: an evaclip run dir or checkpoint, an open_clip export
    folder, or ``open_clip:<name>`` with ``weights``; every file is read weights-only (UserError otherwise)."""
    source = resolve_source(src, weights)
    if source.kind == "open_clip":
        enc = load_encoders(model=src, pretrained=weights, device=device, trust_pickle=trust_pickle)
    elif source.kind == "export":
        enc = load_encoders(model="open_clip:export", pretrained=src, device=device, trust_pickle=trust_pickle)
    else:
        enc = load_encoders(checkpoint=src, device=device, trust_pickle=trust_pickle)
    enc.module.requires_grad_(False)
    enc.module.eval()
    return enc
