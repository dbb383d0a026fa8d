"""State-dict converters, all in one place and tested both ways:

  EVA original  <-> timm / evaclip image tower   (``eva_to_timm`` / ``timm_to_eva``)
  open_clip     <-> evaclip CLIP                 (``open_clip_to_evaclip`` / ``evaclip_to_open_clip``)
  OpenAI CLIP / open_clip text weights -> evaclip text tower (``text_from_clip``)

and loaders that put weights into a model with a clear report (``load_into``): missing and unexpected
keys are listed, and a shape mismatch names the tensor.

EVA original layout (BAAI's EVA / EVA-02 MIM and EVA-CLIP repos): sub-LN ``attn.inner_attn_ln`` and
``mlp.ffn_ln``, SwiGLU ``mlp.w1`` (gate) / ``w2`` (value) / ``w3`` (out), packed ``mlp.w12``, ``q_bias`` /
``v_bias`` next to separate ``q_proj`` / ``k_proj`` / ``v_proj``, RoPE tables saved as buffers, and MIM-only
``mask_token`` / ``lm_head``. timm's ``eva.py:checkpoint_filter_fn`` documents the same mapping.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from evaclip.checkpoint import is_checkpoint, load_weights
from evaclip.errors import ConfigError
from evaclip.safe_load import load_torch

_EVA_TO_TIMM = [  # (original, timm) substrings, applied in order
    ("mlp.ffn_ln.", "mlp.norm."),
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.w12.", "mlp.fc1."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.w3.", "mlp.fc2."),
]
_MIM_ONLY = ("mask_token", "lm_head.weight", "lm_head.bias")


def unwrap_checkpoint(sd: Dict) -> Dict[str, torch.Tensor]:
    """Peel the usual containers ({'model': ...}, {'module': ...}, {'state_dict': ...}, EMA)."""
    for k in ("model_ema", "model", "module", "state_dict"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return sd


def strip_prefix(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def eva_to_timm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Original EVA / EVA-02 image-tower keys -> timm ``Eva`` keys (MIM head, mask token, RoPE buffers dropped)."""
    sd = unwrap_checkpoint(sd)
    if any(k.startswith("visual.") for k in sd):  # a whole EVA-CLIP checkpoint: take the image tower
        sd = strip_prefix(sd, "visual.")
    separate_qkv = any(k.endswith("attn.q_proj.weight") for k in sd)
    out = {}
    for k, v in sd.items():
        if k in _MIM_ONLY or "rope." in k or k.startswith("rope"):
            continue
        for a, b in _EVA_TO_TIMM:
            k = k.replace(a, b)
        if separate_qkv:
            k = k.replace("attn.q_bias", "attn.q_proj.bias").replace("attn.v_bias", "attn.v_proj.bias")
        out[k] = v
    return out


def timm_to_eva(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm ``Eva`` keys -> original EVA keys (inverse of ``eva_to_timm`` on the kept keys)."""
    separate_qkv = any(k.endswith("attn.q_proj.weight") for k in sd)
    out = {}
    for k, v in sd.items():
        if separate_qkv:
            k = k.replace("attn.q_proj.bias", "attn.q_bias").replace("attn.v_proj.bias", "attn.v_bias")
        for a, b in reversed(_EVA_TO_TIMM):
            k = k.replace(b, a)
        out[k] = v
    return out


def adapt_image_tower(sd: Dict[str, torch.Tensor], tower) -> Dict[str, torch.Tensor]:
    """Resize a pretrained image tower to ``tower``: patch embed kernel (e.g. 14 -> 16, EVA-02-CLIP-B/16 from
    the /14 MIM model) and absolute position embeddings to the target grid (timm's resamplers)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    sd = dict(sd)
    w = sd.get("patch_embed.proj.weight")
    target = tower.patch_embed.proj.weight
    if w is not None and w.shape[-2:] != target.shape[-2:]:
        sd["patch_embed.proj.weight"] = resample_patch_embed(w.float(), list(target.shape[-2:]), verbose=False).to(w.dtype)
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != tower.pos_embed.shape:
        old = int(round((pe.shape[1] - 1) ** 0.5))
        sd["pos_embed"] = resample_abs_pos_embed(pe.float(), list(tower.patch_embed.grid_size), [old, old],
                                                 num_prefix_tokens=1, verbose=False).to(pe.dtype)
    return sd


def image_tower_from_checkpoint(sd: Dict, tower) -> Dict[str, torch.Tensor]:
    """Any supported image-tower checkpoint (EVA original, timm, open_clip, evaclip) -> trunk keys for ``tower``."""
    sd = unwrap_checkpoint(sd)
    if any(k.startswith("visual.trunk.") for k in sd):
        sd = strip_prefix(sd, "visual.trunk.")
    elif any(k.startswith("visual.") for k in sd):
        sd = strip_prefix(sd, "visual.")
    sd = eva_to_timm(sd)  # no-op on keys already in timm layout
    if "fc_norm.weight" in sd and "norm.weight" not in sd and not hasattr(tower.fc_norm, "weight"):
        # an avg-pool fine-tuned tower normalises after pooling; our token-pool tower before: reuse it
        sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    if "head.weight" in sd and sd["head.weight"].shape != tower.head.weight.shape:
        sd.pop("head.weight"), sd.pop("head.bias", None)  # a classifier head is not our projection
    return adapt_image_tower(sd, tower)


def text_from_clip(sd: Dict) -> Dict[str, torch.Tensor]:
    """OpenAI CLIP / open_clip checkpoint -> text-tower keys (open_clip ``text.`` prefix or flat OpenAI keys)."""
    sd = unwrap_checkpoint(sd)
    if any(k.startswith("text.") for k in sd):
        return {k: v for k, v in strip_prefix(sd, "text.").items() if k != "attn_mask"}
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {k: v for k, v in sd.items() if k.startswith(keep) and not k.startswith("visual.")}


def open_clip_to_evaclip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip CustomTextCLIP (EVA configs) -> evaclip CLIP: logit_scale/bias [] -> [1], buffers dropped."""
    out = {k: v for k, v in unwrap_checkpoint(sd).items() if not k.endswith("attn_mask")}
    for k in ("logit_scale", "logit_bias"):
        if k in out and out[k].ndim == 0:
            out[k] = out[k].reshape(1)
    return out


def evaclip_to_open_clip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """evaclip CLIP -> open_clip CustomTextCLIP state dict (logit_scale/bias [1] -> [])."""
    out = dict(sd)
    for k in ("logit_scale", "logit_bias"):
        if k in out:
            out[k] = out[k].reshape(())
    return out


class LoadReport:
    """What a load did; ``str()`` is a readable summary."""

    def __init__(self, what: str, missing, unexpected, loaded: int):
        self.what, self.missing, self.unexpected, self.loaded = what, list(missing), list(unexpected), loaded

    def __str__(self):
        s = f"{self.what}: loaded {self.loaded} tensors"
        if self.missing:
            s += f"; missing {len(self.missing)}: {', '.join(self.missing[:8])}{' ...' if len(self.missing) > 8 else ''}"
        if self.unexpected:
            s += (f"; unexpected {len(self.unexpected)}: {', '.join(self.unexpected[:8])}"
                  f"{' ...' if len(self.unexpected) > 8 else ''}")
        return s


def load_into(module: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str, strict: bool = False,
              ignore_missing: Tuple[str, ...] = ()) -> LoadReport:
    """Load ``sd`` into ``module``: shape mismatches raise naming the tensor; missing/unexpected are reported
    (and raise when ``strict``)."""
    own = module.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{what}: shape mismatch for '{k}': checkpoint {tuple(v.shape)} vs model "
                             f"{tuple(own[k].shape)}")
    missing = [k for k in own if k not in sd and not k.startswith(ignore_missing)]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise ValueError(str(LoadReport(what, missing, unexpected, 0)))
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(what, missing, unexpected, len(sd) - len(unexpected))


# an export folder's weights, in the order they are looked for: the whole model (open_clip's names, then Hugging
# Face's), then the image tower alone (an export with --tower image)
WHOLE_MODEL_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHTS_FILES = (*WHOLE_MODEL_FILES, "model.safetensors", "pytorch_model.bin", "timm_image_tower/model.safetensors")


def weights_file(folder: str, names: Tuple[str, ...] = WEIGHTS_FILES) -> Optional[str]:
    """The first of ``names`` present in ``folder`` (its path), or None."""
    import os

    return next((os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))), None)


def read_state_dict(path: str, what: str = "weights", trust_pickle: bool = False,
                    opt_in: str = "model.trust_pickle=true") -> Dict[str, torch.Tensor]:
    """A state dict from .safetensors, .pt/.pth/.bin (weights-only: a file holding pickled objects is refused
    unless ``trust_pickle``), OpenAI's TorchScript archives, an open_clip / evaclip export folder, or an evaclip
    run or checkpoint directory (its newest valid checkpoint, consolidated whatever engine wrote it)."""
    import os

    if os.path.isdir(path):
        if is_checkpoint(path) or os.path.isdir(os.path.join(path, "checkpoints")):  # an evaclip run (e.g. MIM)
            return load_weights(path, trust_pickle, opt_in=opt_in)[0]
        found = weights_file(path)
        if found is not None:
            return read_state_dict(found, what, trust_pickle, opt_in)
        raise FileNotFoundError(f"{what}: {path} holds no open_clip_model.safetensors / model.safetensors / *.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return unwrap_checkpoint(load_torch(path, what, trust_pickle, opt_in))


def whole_model_from_checkpoint(sd: Dict, model) -> Dict[str, torch.Tensor]:
    """A whole CLIP checkpoint (evaclip / open_clip) -> evaclip keys for ``model``, the image tower resized as
    ``image_tower_from_checkpoint`` does (e.g. an L/14 at 224 px initialising an L/14 at 336 px)."""
    sd = open_clip_to_evaclip(sd)
    trunk = {k: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    if trunk:
        rest = {k: v for k, v in sd.items() if not k.startswith("visual.trunk.")}
        sd = dict(rest, **{f"visual.trunk.{k}": v for k, v in
                           adapt_image_tower(strip_prefix(trunk, "visual.trunk."), model.visual.trunk).items()})
    return sd


def apply_inits(model, cfg, weights: Dict[str, Dict]) -> Optional[str]:
    """Load the init state dicts (``weights``: {"model" | "vision" | "text": state dict}) into ``model`` with
    the conversions and resizing of each kind; an init that loads no tensor is an error. Returns a report.
    Separate from the file reading so every shipped experiment's init logic is tested on meta tensors."""

    reports = []
    if "model" in weights:
        reports.append(load_into(model, whole_model_from_checkpoint(weights["model"], model), f"model.init {cfg.init}",
                                 ignore_missing=("text.attn_mask",)))
    if "vision" in weights:
        sd = image_tower_from_checkpoint(weights["vision"], model.visual.trunk)
        reports.append(load_into(model.visual.trunk, sd, f"model.vision.init {cfg.vision.init}"))
    if "text" in weights:
        reports.append(load_into(model.text, text_from_clip(weights["text"]), f"model.text.init {cfg.text.init}"))
    for r in reports:
        if r.loaded == 0:  # a wrong file would otherwise train from scratch without a word
            raise ConfigError(f"{r.what}: loaded no tensor (missing {len(r.missing)}, unexpected {len(r.unexpected)}: "
                              f"{', '.join(r.unexpected[:4])}); is it the right checkpoint for this model?")
    return "\n".join(map(str, reports)) if reports else None


def init_from_files(model, cfg) -> Optional[str]:
    """Apply ``model.init`` / ``model.vision.init`` / ``model.text.init`` (a ModelConfig); returns a report."""
    weights, trust = {}, cfg.trust_pickle
    for kind, path, what in (("model", cfg.init, "model.init"), ("vision", cfg.vision.init, "model.vision.init"),
                             ("text", cfg.text.init, "model.text.init")):
        if path:
            weights[kind] = read_state_dict(path, what, trust)
    return apply_inits(model, cfg, weights)
