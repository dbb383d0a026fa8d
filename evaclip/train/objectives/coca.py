"""The CoCa objective: CLIP's contrastive loss plus the caption decoder's cross-entropy (``[coca]``).

loss = clip_weight x contrastive (any ``[loss]`` kind and impl) + caption_weight x caption cross-entropy (mean over
the global batch's caption tokens, padding ignored, label smoothing). It is the CLIP objective with another model
and loss hook: the same feature caching over micro-batches (the model returns each sample's summed caption
loss and token count, concatenated like the embeddings), token dropping (the decoder attends to the kept tokens)
and engines.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from evaclip import dist as edist
from evaclip.models import create_model
from evaclip.train.objectives.clip import ClipObjective


class CocaObjective(ClipObjective):
    kind = "coca"

    def __init__(self, coca_cfg, model_cfg, variant, loss_cfg, seed: int, per_sample: bool, device: torch.device):
        super().__init__(model_cfg, variant, loss_cfg, seed, per_sample, device)
        self.cfg = coca_cfg
        self.parts: Dict[str, torch.Tensor] = {}
        self.tokens: Optional[torch.Tensor] = None  # the step's caption tokens over all ranks

    @property
    def model_extras(self) -> Dict:
        return {"coca": {"decoder_layers": self.cfg.decoder_layers, "n_queries": self.cfg.n_queries}}

    def build_model(self) -> torch.nn.Module:
        model = create_model(self.model_cfg, self.variant, coca=self.model_extras["coca"])
        model.set_caption_loss(self.cfg.label_smoothing, self.cfg.ce_chunk)
        return model

    def loss(self, out: Dict[str, torch.Tensor], targets: Optional[Dict[str, torch.Tensor]],
             rows: Optional[list] = None) -> torch.Tensor:
        """The caption term is this rank's summed token losses over the global batch's token count, times the
        ranks: the engines average gradients over ranks, so the step's gradient is that of the global mean."""
        contrastive = super().loss(out, targets, rows=rows)
        if self.tokens is None:  # every call of a step sees the whole step's batch: one all-reduce per step
            tokens = out["caption_tokens"].sum().to(torch.float64)
            self.tokens = edist.all_reduce_sum(tokens.clone()) if edist.world_size() > 1 else tokens
        scale = edist.world_size() / self.tokens.clamp(min=1.0)
        caption = out["caption_nll"].sum() * scale.to(out["caption_nll"].dtype)
        self.parts = {"contrastive": contrastive.detach(), "caption": caption.detach()}
        return self.cfg.clip_weight * contrastive + self.cfg.caption_weight * caption

    def forward_backward(self, engine, micro, step: int):
        self.tokens = None
        return super().forward_backward(engine, micro, step)

    def step_metrics(self) -> Dict[str, float]:
        return {f"train/{k}_loss": float(v) for k, v in self.parts.items()}
