"""The CLIP objective: the contrastive loss (CLIP or SigLIP; local, tiled or ring) over the global batch.

With accumulation the gradient equals that of the big batch (feature caching, as GradCache / open_clip's
accum-freq): all micro-batch features are computed without grad, then each micro-batch is recomputed with grad (the
same token-dropping masks: they are drawn per sample from (seed, step, key), so they also do not depend on how the
global batch is cut into ranks and micro-batches; the RNG state is replayed too) and back-propagated through the
loss over the full cached batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from evaclip import dist as edist
from evaclip.data.masking import sample_rng
from evaclip.losses import ContrastiveLoss
from evaclip.models import create_model
from evaclip.train.objectives.base import Forward


def _get_rng(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def all_finite(loss: torch.Tensor) -> bool:
    """Finite on every rank (all-reduced, so every rank takes the same decision)."""
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    edist.all_reduce_sum(flag)
    return flag.item() == 0


class ClipObjective:
    kind = "clip"
    uses_text = True
    model_extras: Dict = {}

    def __init__(self, model_cfg, variant, loss_cfg, seed: int, per_sample: bool, device: torch.device):
        self.model_cfg, self.variant, self.seed, self.per_sample, self.device = model_cfg, variant, seed, per_sample, device
        self.loss_fn = ContrastiveLoss(loss_cfg.kind, loss_cfg.impl, loss_cfg.tile_size)

    def build_model(self) -> torch.nn.Module:
        return create_model(self.model_cfg, self.variant)

    def resume_settings(self) -> Dict:
        return {}

    def frozen_modules(self) -> list:
        return []

    def compile(self, model, compiler, whole_step: bool) -> None:
        """The towers, one graph each (token dropping keeps a fixed count, so shapes are static); with
        ``whole_step`` the naive and local losses too (the tiled and ring losses are autograd Functions with their
        own tile loops: they stay eager)."""
        compiler.module("visual", model.visual)
        compiler.module("text", model.text)
        if whole_step and self.loss_fn.impl in ("naive", "local"):
            self.loss_fn = compiler.function("loss", self.loss_fn)

    def drop_noise(self, model, micro: Dict, step: int) -> Optional[torch.Tensor]:
        """Per-sample token-dropping scores [b, N] from (seed, step, key): which patches a sample keeps does
        not depend on the batch, micro-batch or rank it is in (None without dropping, or without keys)."""
        trunk = model.visual.trunk
        if trunk.patch_drop.rate == 0.0 or "key" not in micro:
            return None
        n = trunk.patch_embed.num_patches
        rows = [sample_rng(self.seed, step, k, "token_drop").random(n, dtype="float32") for k in micro["key"]]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def targets(self, micro: Dict) -> Optional[Dict[str, torch.Tensor]]:
        """What the loss compares a micro-batch's features with besides each other (a teacher's features; computed
        once per step, without grad): None for plain CLIP."""
        return None

    def loss(self, out: Dict[str, torch.Tensor], targets: Optional[Dict[str, torch.Tensor]],
             rows: Optional[list] = None) -> torch.Tensor:
        """This rank's loss of its rows' features ``out`` (image_features, text_features, logit_scale and
        logit_bias) given their ``targets``."""
        return self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"),
                            rows=rows)

    def step_metrics(self) -> Dict[str, float]:
        """The objective's own metrics of the step just run (besides the loss and the temperature)."""
        return {}

    def forward_backward(self, engine, micro: List[Dict], step: int) -> Forward:
        dev = self.device
        imgs = [m["image"].to(dev, non_blocking=True) for m in micro]
        txts = [m["text"].to(dev, non_blocking=True) for m in micro]
        noise = [self.drop_noise(engine.model, m, step) for m in micro]
        targets = [self.targets(m) for m in micro]
        rows = [] if self.per_sample else None  # this rank's per-sample losses, from the loss itself
        if len(micro) == 1:
            out = engine(imgs[0], txts[0], noise[0])
            loss = self.loss(out, targets[0], rows=rows)
            if not all_finite(loss):
                return Forward(loss.detach(), finite=False)
            engine.backward(loss, boundary=True)
        else:
            # feature caching: no-grad features of every micro-batch, remembering each one's RNG state
            states, cached = [], []
            with torch.no_grad():
                for img, txt, nz in zip(imgs, txts, noise):
                    states.append(_get_rng(dev))
                    cached.append(engine(img, txt, nz))
            after = _get_rng(dev)
            # every per-sample output (the embeddings, a distillation head's maps) is concatenated; scalars are not
            feats = {k: [c[k] for c in cached] for k in cached[0] if k not in ("logit_scale", "logit_bias")}
            whole = None if targets[0] is None else {k: torch.cat([t[k] for t in targets]) for k in targets[0]}
            loss = self.loss({**cached[-1], **{k: torch.cat(v) for k, v in feats.items()}}, whole, rows=rows)
            if not all_finite(loss):
                return Forward(loss.detach(), finite=False)
            for j, (img, txt) in enumerate(zip(imgs, txts)):
                _set_rng(states[j], dev)
                out = engine(img, txt, noise[j])
                last = j == len(micro) - 1
                # the temperature's (and bias') gradient must be counted once, not once per micro-batch
                both = {k: torch.cat(v[:j] + [out[k]] + v[j + 1:]) for k, v in feats.items()}
                both.update({k: (v if last else v.detach()) for k, v in out.items() if k not in feats})
                engine.backward(self.loss(both, whole), boundary=last)
            _set_rng(after, dev)
            out = cached[-1]
        metrics = {"train/logit_scale": float(out["logit_scale"].detach()), **self.step_metrics()}
        return Forward(loss.detach(), metrics=metrics, sample_losses=rows[0] if rows else None)
