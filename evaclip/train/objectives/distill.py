"""The distillation objective: CLIP's contrastive loss on the true pairs plus a frozen teacher CLIP's knowledge
(``[distill]``): the soft cross-entropy of the student's similarity distributions over the global batch to the
teacher's (open_clip's distillation task), or each sample's embeddings regressed to the teacher's.

The teacher's embeddings come from its forward every step (``distill.source = "online"``) or from reinforced
shards (``"shards"``: what ``evaclip data reinforce`` stored for the crop the sample shows, float16; no teacher is
loaded). It is the CLIP objective with a teacher: the same feature caching over micro-batches (the teacher's
features of the step are computed once, without grad, and concatenated like the student's), the same towers,
token dropping (the teacher sees every patch) and engines. The teacher lives outside the engine: never in the
optimizer, never in a ZeRO partition, never in train mode.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from evaclip.data.transforms import make_tokenizer, reframe
from evaclip.encoders import Encoders, load_source
from evaclip.errors import ConfigError, TrainingStopped, UserError
from evaclip.losses.distill import DistillLoss
from evaclip.models import create_model
from evaclip.models.sources import source_identity
from evaclip.train.objectives.clip import ClipObjective

PROBE = "a photo of a dog, 3 cats and a 🐈 on a red sofa."  # tokenised by both: the tokenizers must agree


@contextlib.contextmanager
def teacher_key():
    """A teacher that cannot be read or identified is an error in ``distill.teacher``: one line naming the key."""
    try:
        yield
    except (UserError, OSError) as e:
        raise ConfigError(f"distill.teacher: {e}") from None


class DistillObjective(ClipObjective):
    kind = "distill"

    def __init__(self, distill_cfg, model_cfg, variant, loss_cfg, seed: int, per_sample: bool, precision: str,
                 device: torch.device, log=print):
        super().__init__(model_cfg, variant, loss_cfg, seed, per_sample, device)
        self.cfg, self.log = distill_cfg, log
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.distill_fn = DistillLoss(distill_cfg.loss, loss_cfg.impl, loss_cfg.tile_size)
        self.teacher: Optional[Encoders] = None
        self.identity = ""  # the teacher's (source = shards: the one distill.teacher names, "" when unset)
        self.stored: Optional[tuple] = None  # source = shards: (identity, scale) the first batch's samples record
        self.parts: Dict[str, torch.Tensor] = {}
        self.head_dim = 0  # a feature loss against a teacher of another width: the student's head into its space

    def build_model(self) -> torch.nn.Module:
        """The frozen teacher first (online; checked against the student: same tokens, widths for a feature loss),
        then the seed again, so the student's init does not depend on how the teacher was built."""
        if self.cfg.source == "online":
            self.teacher = self._load_teacher()
            self.identity = self.teacher.identity
        else:
            if self.cfg.teacher:  # its identity only: the shards must carry this teacher's embeddings
                with teacher_key():
                    self.identity = source_identity(self.cfg.teacher, self.cfg.teacher_weights)
            if self.cfg.loss != "soft_ce" and self.cfg.teacher_width not in (0, self.variant.embed_dim):
                self.head_dim = self.cfg.teacher_width
        self.log(f"distill: teacher {self.teacher.name if self.teacher else self.cfg.teacher or '(as the shards record)'}"
                 f" ({self.cfg.source}), {self.cfg.loss} x {self.cfg.weight}")
        torch.manual_seed(self.seed)
        return create_model(self.model_cfg, self.variant, distill_dim=self.head_dim)

    @property
    def model_extras(self) -> Dict:
        return {"distill": {"target_dim": self.head_dim}} if self.head_dim else {}

    def _load_teacher(self) -> Encoders:
        with teacher_key():  # frozen, read weights-only
            t = load_source(self.cfg.teacher, self.cfg.teacher_weights, str(self.device), self.model_cfg.trust_pickle)
        v = self.variant
        mine = make_tokenizer(v.context_length, self.model_cfg.text.kind, self.model_cfg.text.hf_path)
        if not torch.equal(torch.as_tensor(mine([PROBE])), torch.as_tensor(t.tokenizer([PROBE])).to(torch.long)):
            raise ConfigError(f"distill.teacher {t.name} tokenizes captions unlike the student {v.name} (its text "
                              "tokenizer or context length differs): the batch's tokens are the student's")
        if self.cfg.loss != "soft_ce":  # regression: a head into the teacher's space when the widths differ
            with torch.no_grad():
                width = int(t.encode_text(torch.as_tensor(t.tokenizer([PROBE])).to(self.device)).shape[-1])
            self.head_dim = 0 if width == v.embed_dim else width
        return t

    def _check_width(self, width: int) -> None:
        want = self.head_dim or self.variant.embed_dim
        if width != want:
            raise TrainingStopped(f"distill.loss = {self.cfg.loss!r}: the shards hold teacher embeddings {width} "
                                  f"wide, this run regresses {want}-wide ones: set distill.teacher_width={width}")

    def frozen_modules(self) -> list:
        """What runs beside the trained model and is never trained: the online teacher."""
        return [self.teacher.module] if self.teacher is not None else []

    def teacher_scale(self) -> float:
        if self.cfg.temperature > 0:
            return 1.0 / self.cfg.temperature
        return self.teacher.logit_scale if self.teacher is not None else self.stored[1]

    def resume_settings(self) -> Dict:
        return {"distill.teacher_identity": self.identity} if self.identity else {}

    def targets(self, micro: Dict) -> Dict[str, torch.Tensor]:
        """The teacher's unit embeddings of the micro-batch: its forward (online, on its own preprocessing of the
        student's images), or what the reinforced samples carry (shards)."""
        if self.cfg.source == "shards":
            return self._stored(micro)
        t, v, dev = self.teacher, self.variant, self.device
        with torch.no_grad():
            x = reframe(micro["image"].to(dev, non_blocking=True), v.mean, v.std, t.mean, t.std, t.image_size)
            with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                img, txt = t.encode_image(x), t.encode_text(micro["text"].to(dev, non_blocking=True))
        # unit embeddings in at least float32 (a bf16 teacher's are promoted; a float64 one's kept)
        return {k: F.normalize(e.to(torch.promote_types(e.dtype, torch.float32)), dim=-1)
                for k, e in (("image", img), ("text", txt))}

    def _stored(self, micro: Dict) -> Dict[str, torch.Tensor]:
        if "kd_image" not in micro:
            raise TrainingStopped("distill.source = 'shards', but samples of this batch carry no teacher embeddings "
                                  f"(e.g. {micro['key'][0]}): train on the shards `evaclip data reinforce` wrote "
                                  "(data.recipe=<its out>/recipe.toml), or set distill.source = 'online'")
        teachers = set(micro["kd_teacher"])
        first = self.stored[0] if self.stored else (self.identity or next(iter(teachers)))
        if teachers != {first}:
            raise TrainingStopped(f"the reinforced shards carry embeddings of teacher(s) {sorted(teachers)}; this "
                                  f"run's is {first}" + (" (distill.teacher)" if self.identity else " (its first batch)"))
        if self.stored is None:
            self.stored = (first, float(micro["kd_scale"][0]))
            if self.cfg.loss != "soft_ce":
                self._check_width(micro["kd_image"].shape[-1])
        dev = self.device
        return {"image": F.normalize(micro["kd_image"].to(dev, non_blocking=True).float(), dim=-1),
                "text": F.normalize(micro["kd_text"].to(dev, non_blocking=True).float(), dim=-1)}

    def loss(self, out, targets, rows: Optional[list] = None) -> torch.Tensor:
        c = self.cfg
        parts = {"clip": [] if rows is not None else None, "distill": [] if rows is not None else None}
        img, txt = (out.get(f"{k}_distill", out[f"{k}_features"]) for k in ("image", "text"))  # through the head
        kd = self.distill_fn(img, txt, out["logit_scale"], targets["image"], targets["text"], self.teacher_scale(),
                             rows=parts["distill"])
        total, self.parts = c.weight * kd, {"train/distill_loss": kd.detach()}
        if c.clip_weight:
            hard = super().loss(out, None, parts["clip"])
            total = total + c.clip_weight * hard
            self.parts["train/clip_loss"] = hard.detach()
        if rows is not None:
            rows.append(c.weight * parts["distill"][0] + (c.clip_weight * parts["clip"][0] if c.clip_weight else 0))
        return total

    def step_metrics(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self.parts.items()}
