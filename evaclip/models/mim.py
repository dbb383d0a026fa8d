"""Masked image modeling (MIM) of an image tower against a frozen CLIP teacher (EVA, arXiv 2211.07636;
EVA-02, arXiv 2303.11331).

The student is any image tower of the registry (``Eva``) fed the whole image with the masked patches'
embeddings replaced by a learned mask token (BEiT style: every position is seen, RoPE positions are
unchanged), then a linear head to the teacher's feature width. The target is the teacher's patch features
(its last block after the final norm, or a chosen block), computed without gradients in eval mode; the loss
(``losses.mim_loss``) is the negative cosine similarity on the masked positions.

State dict of ``MIMStudent``: ``visual.trunk.*`` (a timm ``Eva`` state dict without a head), ``mask_token``,
``mim_head.*``. ``model.vision.init`` of a CLIP run reads the ``visual.trunk.*`` part from a MIM run or
checkpoint; ``evaclip export`` of a MIM run writes the trunk as a timm folder.

Teacher and student may differ in width, depth, patch size and resolution: the teacher gets the student's
images resized (and re-normalised when its mean / std differ), and its feature map is resampled to the
student's patch grid.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaclip.checkpoint import is_checkpoint, load_weights
from evaclip.data.transforms import reframe
from evaclip.errors import ConfigError
from evaclip.models.clip import ImageTower
from evaclip.models.convert import open_clip_to_evaclip, read_state_dict
from evaclip.models.eva_vit import Eva
from evaclip.models.registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from evaclip.models.sources import meta_model, resolve_source, source_identity


class MIMStudent(nn.Module):
    """Image tower + mask token + linear head: ``forward(images [B,3,H,W], mask [B,N]) -> {"pred": [B,N,C]}``."""

    def __init__(self, trunk: Eva, image_size: int, target_dim: int):
        super().__init__()
        self.visual = ImageTower(trunk, image_size)
        self.target_dim = target_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, trunk.embed_dim))
        self.mim_head = nn.Linear(trunk.embed_dim, target_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.mim_head.weight, std=0.02)
        nn.init.zeros_(self.mim_head.bias)

    @property
    def grid(self) -> Tuple[int, int]:
        return self.visual.trunk.patch_embed.grid_size

    def forward(self, image, mask) -> Dict[str, torch.Tensor]:
        x = self.visual.trunk.forward_features(image, mask=mask, mask_token=self.mask_token)  # [B, 1 + N, D]
        return {"pred": self.mim_head(x[:, self.visual.trunk.num_prefix_tokens:])}  # [B, N, C]

    # -- the hooks optim.py and the trainer use (as CLIP's) ----------------------------------------------
    def no_weight_decay(self) -> set:
        return {"mask_token"} | {f"visual.trunk.{n}" for n in self.visual.trunk.no_weight_decay()}

    def tower_of(self, name: str) -> str:
        return "visual"  # the whole student is the image tower's: optim.visual (lr, wd, layer decay) applies

    def layer_id(self, name: str) -> int:
        """Embeddings and the mask token 0, block i -> i + 1, final norm and MIM head depth + 1 (as EVA-02)."""
        if name.startswith("visual.trunk."):
            return self.visual.trunk.layer_id(name[len("visual.trunk."):])
        return 0 if name == "mask_token" else self.visual.trunk.num_layers + 1

    def num_layers(self, tower: str) -> int:
        return self.visual.trunk.num_layers if tower == "visual" else 0

    def set_grad_checkpointing(self, vision: bool = True, text: Optional[bool] = None):
        self.visual.trunk.set_grad_checkpointing(vision)

    def set_patch_dropout(self, rate: float):
        if rate:
            raise ValueError("a MIM student sees every position: patch dropout must be 0")


def resample_grid(tokens: torch.Tensor, src: Tuple[int, int], dst: Tuple[int, int]) -> torch.Tensor:
    """Patch features [B, Hs*Ws, C] on grid ``src`` -> [B, Hd*Wd, C] on grid ``dst`` (bilinear)."""
    if tuple(src) == tuple(dst):
        return tokens
    b, n, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, src[0], src[1])
    x = F.interpolate(x.float(), size=tuple(dst), mode="bilinear", align_corners=False)
    return x.reshape(b, c, dst[0] * dst[1]).transpose(1, 2).to(tokens.dtype)


class Teacher(nn.Module):
    """A frozen CLIP image tower giving MIM targets: ``teacher(images) -> [B, N_student, C]`` (float32).

    ``images`` are the student's inputs (its size, mean and std); the teacher's own preprocessing is applied
    here. Its parameters never require grad and it is never put back in train mode."""

    def __init__(self, net: nn.Module, features: Callable, image_size: int, grid: Tuple[int, int], width: int,
                 mean, std, name: str):
        super().__init__()
        self.net, self._features = net, features
        self.image_size, self.grid, self.width, self.name = image_size, tuple(grid), width, name
        self.identity = ""  # set by load_teacher: changes with the teacher's weights (a resume checks it)
        self._stats = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # dropout / drop-path stay off whatever the caller asks

    @torch.no_grad()
    def forward(self, images: torch.Tensor, student_mean, student_std, student_grid: Tuple[int, int],
                autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        x = reframe(images, student_mean, student_std, *self._stats, self.image_size)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            feats = self.features(x)  # [B, N_teacher, C]
        return resample_grid(feats.float(), self.grid, student_grid)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features [B, N_teacher, C] of images already in the teacher's size and normalisation."""
        return self._features(self.net, x)


def _tokens_of(layer: int, num_prefix: int):
    def features(trunk, x):
        return trunk.forward_features(x, layer=layer)[:, num_prefix:]
    return features


def _evaclip_teacher(sd: Optional[Dict[str, torch.Tensor]], record: Dict, layer: int, where: str,
                     model: Optional[nn.Module] = None) -> Teacher:
    """The teacher of an evaclip record with the weights ``sd`` (None: ``model`` as built, the planner's)."""
    # a real cycle: the factory (evaclip.models) builds MIM students from this module
    from evaclip.models import model_from_record, record_variant

    if "mim" in record:
        raise ConfigError(f"mim.teacher {where} is a MIM run: the teacher must be a CLIP (the run a MIM student "
                          "initialised is the next teacher)")

    variant = record_variant(record)
    model = model if model is not None else model_from_record(record)
    trunk = model.visual.trunk
    if sd is not None:
        sd = open_clip_to_evaclip(sd)  # an export holds open_clip's layout; a checkpoint evaclip's (no-op)
        if any(k.startswith("visual.trunk.") for k in sd):
            model.load_state_dict(sd)
        else:  # an image-tower-only export (timm_image_tower/model.safetensors)
            trunk.load_state_dict(sd)
    _check_layer(layer, len(trunk.blocks), where)
    return Teacher(trunk, _tokens_of(layer, trunk.num_prefix_tokens), variant.image_size, trunk.patch_embed.grid_size,
                   trunk.embed_dim, variant.mean, variant.std, f"{variant.name} ({where})")


def _check_layer(layer: int, depth: int, where: str) -> None:
    if layer >= depth or layer < -1:
        raise ConfigError(f"mim.teacher_layer = {layer}, but the teacher {where} has {depth} blocks (0..{depth - 1}, "
                          "or -1 for the last)")


def _open_clip_teacher(model, layer: int, where: str) -> Teacher:
    """An open_clip CLIP whose image tower is a timm ``Eva`` (open_clip's EVA configs, evaclip exports)."""
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "forward_intermediates") or not hasattr(trunk, "patch_embed"):
        raise ConfigError(f"mim.teacher {where}: its image tower is a {type(visual).__name__}; MIM targets are "
                          "taken from timm ViT towers (open_clip's EVA / timm configs, evaclip exports)")
    depth = len(trunk.blocks)
    _check_layer(layer, depth, where)
    index = depth - 1 if layer < 0 else layer

    def features(t, x):
        return t.forward_intermediates(x, indices=[index], norm=True, output_fmt="NLC", intermediates_only=True)[0]

    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]

    pp = getattr(visual, "preprocess_cfg", {}) or {}
    mean, std = pp.get("mean", OPENAI_CLIP_MEAN), pp.get("std", OPENAI_CLIP_STD)
    return Teacher(trunk, features, size, tuple(trunk.patch_embed.grid_size), trunk.num_features, mean, std,
                   f"open_clip {where}")


def load_teacher(cfg, trust_pickle: bool = False, log: Callable = print) -> Teacher:
    """The teacher ``mim.teacher`` names (``cfg`` is the ``[mim]`` section); every file is read weights-only.
    Its ``identity`` names the weights (a checkpoint's manifest, a file's content digest)."""
    teacher, identity = _load_teacher(cfg, trust_pickle, log)
    teacher.identity = identity
    return teacher


def teacher_architecture(cfg, math_attention: bool = False) -> Teacher:
    """The teacher ``mim.teacher`` names, built on the meta device from its model record or open_clip config, its
    weights not read (what ``evaclip plan`` measures; ``math_attention``: what a FLOP counter sees)."""
    source = resolve_source(cfg.teacher, cfg.teacher_weights, "mim.teacher")
    net, record = meta_model(source, "mim.teacher", math_attention)
    if record is not None:
        return _evaclip_teacher(None, record, cfg.teacher_layer, cfg.teacher, model=net)
    return _open_clip_teacher(net, cfg.teacher_layer, cfg.teacher)


def _fit(model, sd, what: str, path: str) -> None:
    """``load_state_dict``, a mismatch (a teacher of another architecture) one line naming the setting."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{what}: {path} does not fit the teacher's architecture ({first} ...)") from None


def _open_clip_model(name: str):
    """An open_clip model without weights (a MIM run imports open_clip, 3-8 s here, only for an open_clip teacher)."""
    import open_clip  # heavy optional import: only open_clip teachers need it

    return open_clip.create_model(name, pretrained=None)


def _load_teacher(cfg, trust_pickle: bool, log: Callable):
    """(teacher, identity) of the source ``mim.teacher`` names, resolved as every model source is."""
    import json

    source = resolve_source(cfg.teacher, cfg.teacher_weights, "mim.teacher")
    src, layer = cfg.teacher, cfg.teacher_layer
    if source.kind == "checkpoint" and not (is_checkpoint(src) or os.path.isdir(os.path.join(src, "checkpoints"))):
        raise ConfigError(f"mim.teacher: {src} is neither an evaclip run / checkpoint nor an export folder "
                          "(open_clip_config.json)")
    identity = source_identity(source, setting="mim.teacher")
    if source.kind == "open_clip":
        model = _open_clip_model(source.name)
        sd = read_state_dict(cfg.teacher_weights, "mim.teacher_weights", trust_pickle)
        _fit(model, sd, "mim.teacher_weights", cfg.teacher_weights)
        return _open_clip_teacher(model, layer, src), identity
    if source.kind == "export":
        with open(os.path.join(src, "open_clip_config.json")) as f:
            record = json.load(f).get("evaclip", {}).get("model")
        if record is not None:
            return _evaclip_teacher(read_state_dict(src, "mim.teacher", trust_pickle), record, layer, src), identity
        model = _open_clip_model(f"local-dir:{src}")
        _fit(model, read_state_dict(src, "mim.teacher", trust_pickle), "mim.teacher", src)
        return _open_clip_teacher(model, layer, src), identity
    sd, meta = load_weights(src, trust_pickle, log, opt_in="model.trust_pickle=true")
    return _evaclip_teacher(sd, meta["model"], layer, meta["checkpoint"]), identity
