"""Whether an experiment fits a GPU and how fast it runs, before it is queued: memory by part (plan/memory.py),
the model's own activations and FLOPs (plan/trace.py), step time (plan/speed.py), and what to change."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch

from evaclip.config import derive
from evaclip.engine import bucket_elements, zero3_persistent_elements, zero_held_grad_elements
from evaclip.errors import ConfigError
from evaclip.optim import param_groups
from evaclip.plan import memory, speed
from evaclip.plan.teacher import TeacherTrace, describe, distill_loss_bytes, distill_teacher, mim_teacher
from evaclip.plan.trace import build, caption_flops, count_flops, trace_caption, trace_towers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# parts' names; the student's are what only its own forward and backward hold (gone while a frozen teacher runs)
ACTIVATIONS = {"visual": "activations (image)", "text": "activations (text)"}
CAPTION_ACTIVATIONS, LOSS, CAPTION_LOSS, DISTILL_LOSS = ("activations (caption decoder)", "loss buffers",
                                                         "caption loss buffers", "distillation loss buffers")
STUDENT = (*ACTIVATIONS.values(), CAPTION_ACTIVATIONS, LOSS, CAPTION_LOSS, DISTILL_LOSS)


@dataclasses.dataclass
class Setting:
    """The knobs a suggestion may turn; the rest of the run is fixed."""

    micro_batch: int
    accum: int
    zero: int
    checkpointing: Tuple[bool, bool]  # (image tower, text tower)


class Planner:
    """One experiment on ``nodes`` x ``gpus_per_node`` GPUs of one kind. The meta-device traces are taken once per
    checkpointing setting; activations grow linearly with the micro-batch, so other micro-batches scale them."""

    def __init__(self, cfg, variant, g: speed.GPU, nodes: int, gpus_per_node: int, results_dir: str = ""):
        self.cfg, self.variant, self.gpu, self.nodes = cfg, variant, g, nodes
        self.ranks = nodes * gpus_per_node
        kind = cfg.objective.kind
        key = {"mim": "mim.teacher", "distill": "distill.teacher" if cfg.distill.source == "online" else ""}.get(kind)
        if key and not (cfg.mim.teacher if kind == "mim" else cfg.distill.teacher):
            raise ConfigError(f"objective.kind = {kind!r}: the plan needs {key} (its architecture sizes the "
                              "teacher's memory and FLOPs)")
        self.global_batch = cfg.data.micro_batch_size * self.ranks * cfg.engine.accum_steps
        self.dtype = DTYPES[cfg.engine.precision]
        self.results_dir = results_dir
        self._traces: Dict[Tuple[bool, bool], Dict] = {}
        self.coca = {"decoder_layers": cfg.coca.decoder_layers, "n_queries": cfg.coca.n_queries} \
            if kind == "coca" else None
        self._caption = None  # a CoCa's caption half at micro-batch 1 (bytes saved), traced once
        self.teacher: Optional[TeacherTrace] = None  # a frozen teacher run beside the model (MIM, distillation)
        self.mim_dim = self.distill_dim = self.distill_width = self.distill_loss = 0  # widths, bytes
        if kind == "mim":
            v = variant.vision
            grid = (variant.image_size // v["patch_size"],) * 2
            self.teacher = mim_teacher(cfg.mim, grid, self.dtype)
            self.mim_dim = self.teacher.width
        elif kind == "distill":
            d = cfg.distill
            if d.source == "online":
                self.teacher = distill_teacher(d, variant.context_length, self.dtype)
            width = self.teacher.width if self.teacher else (d.teacher_width or variant.embed_dim)
            self.distill_dim = width if d.loss != "soft_ce" and width != variant.embed_dim else 0
            self.distill_width = width
            self.distill_loss = distill_loss_bytes(d.loss, cfg.loss.impl, self.global_batch,
                                                   self.global_batch // self.ranks, variant.embed_dim, width,
                                                   cfg.loss.tile_size)
        model = build(cfg.model, variant, self.dtype, coca=self.coca, distill_dim=self.distill_dim,
                      mim_dim=self.mim_dim)  # locked as the trainer locks it
        self._meta_model = model  # on the meta device (no memory); a CoCa's caption half is traced on it
        self.projection = tuple(model.decoder.text_projection.shape) if self.coca else (0, 0)  # [W, V]
        groups = [[p.numel() for p in g["params"]]  # the optimizer's groups, as the engine flattens them
                  for g in param_groups(model, cfg.optim)]
        self.trainable = sum(map(sum, groups))
        self.frozen = sum(p.numel() for p in model.parameters()) - self.trainable
        self.held_grads = zero_held_grad_elements(groups, self.ranks) if cfg.engine.kind == "deepspeed" else 0
        self.persistent = zero3_persistent_elements(cfg.engine, [p.numel() for p in model.parameters()], self.ranks)

    def _model_cfg(self, checkpointing: Tuple[bool, bool]):
        m = self.cfg.model
        return dataclasses.replace(m, vision=dataclasses.replace(m.vision, grad_checkpointing=checkpointing[0]),
                                   text=dataclasses.replace(m.text, grad_checkpointing=checkpointing[1]))

    def _trace(self, checkpointing: Tuple[bool, bool]):
        if checkpointing not in self._traces:
            self._traces[checkpointing] = trace_towers(self._model_cfg(checkpointing), self.variant, 1, self.dtype,
                                                       self.distill_dim, self.mim_dim)
        return self._traces[checkpointing]

    def states(self, s: Setting) -> memory.ModelStates:
        c = self.cfg
        return memory.model_states(self.trainable, self.frozen, c.engine.kind, c.engine.precision, s.zero, self.ranks,
                                   self.held_grads, self.persistent)

    def parts(self, s: Setting) -> Dict[str, int]:
        """Bytes per GPU by part at setting ``s``, at the end of backward (the step's own peak: ``peak``)."""
        c, towers = self.cfg, self._trace(s.checkpointing)
        states = self.states(s)
        out = {"weights": states.weights, "gradients": states.gradients, "optimizer states": states.optimizer}
        for name, t in towers.items():  # traced at micro-batch 1
            out[ACTIVATIONS[name]] = (t.saved_bytes + t.recompute_bytes) * s.micro_batch
        if not self.mim_dim:  # a MIM student's loss is in its trace (per position, nothing gathered)
            out[LOSS] = memory.loss_buffers(c.loss.kind, c.loss.impl, self.global_batch,
                                            self.global_batch // self.ranks, self.variant.embed_dim,
                                            c.loss.tile_size)
        if self.coca:
            out.update(self._caption_parts(s.micro_batch))
        if c.objective.kind == "distill":
            out[DISTILL_LOSS] = self.distill_loss
            # every micro-batch's unit embeddings (the teacher's or the shards'), fp32, and their concatenation
            out["teacher targets"] = 2 * 2 * 4 * self.distill_width * s.micro_batch * s.accum
        if self.teacher:
            out["teacher weights"] = self.teacher.weight_bytes
        if self.mim_dim:  # one micro-batch's targets at a time
            out["teacher targets"] = self.teacher.target_bytes * s.micro_batch
        engine = dataclasses.replace(c.engine, zero_stage=s.zero, accum_steps=s.accum)
        out["communication buckets"] = memory.buckets(c.engine.precision, self.trainable,
                                                      bucket_elements(engine, s.micro_batch, self.ranks))
        return out

    def _caption_parts(self, micro_batch: int) -> Dict[str, int]:
        """A CoCa's caption half: the decoder's activations (traced, linear in the micro-batch) and the chunked
        loss's buffers, for captions as long as the context (the most a batch can hold)."""
        c = self.cfg
        if self._caption is None:
            self._caption = trace_caption(self._meta_model, self.variant, 1, self.dtype)
        width, vocab = self.projection
        chunk = min(c.coca.ce_chunk, micro_batch * (self.variant.context_length - 1))
        half = c.engine.precision in ("bf16", "fp16")
        return {CAPTION_ACTIVATIONS: self._caption * micro_batch,
                CAPTION_LOSS: memory.caption_loss_buffers(chunk, vocab, width, half,
                                                          half and c.engine.kind == "deepspeed")}

    def teacher_forward(self, s: Setting) -> int:
        """What a frozen teacher's forward holds at once, before the student's forward (0: no teacher forward)."""
        return self.teacher.forward_bytes * s.micro_batch if self.teacher else 0

    def peak(self, s: Setting) -> int:
        return memory.total(self.parts(s), self.states(s).step_gradients, self.teacher_forward(s), STUDENT)

    def fits(self, s: Setting) -> bool:
        return self.peak(s) <= self.gpu.memory_gib * memory.GiB

    def largest_micro_batch(self, s: Setting) -> int:
        """The largest micro-batch that fits at ``s``'s other knobs (0: none does), at most G / ranks."""
        lo, hi = 0, max(1, self.global_batch // self.ranks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fits(dataclasses.replace(s, micro_batch=mid)):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def current(self) -> Setting:
        c = self.cfg
        return Setting(c.data.micro_batch_size, c.engine.accum_steps,
                       c.engine.zero_stage if c.engine.kind == "deepspeed" else 0,
                       (c.model.vision.grad_checkpointing, c.model.text.grad_checkpointing))

    def keeping_batch(self, s: Setting, largest: int) -> Setting:
        """``s`` at the largest micro-batch up to ``largest`` that divides this GPU's samples per step, with the
        accumulation that keeps the global batch exactly (``largest`` itself when no divisor is at least half)."""
        per_gpu = s.micro_batch * s.accum
        mb = next((m for m in range(largest, 0, -1) if per_gpu % m == 0), 1)
        if mb * 2 < largest:
            mb = largest
        return dataclasses.replace(s, micro_batch=mb, accum=math.ceil(per_gpu / mb))

    def speed(self, s: Setting) -> Dict:
        c = self.cfg
        flops = count_flops(self._model_cfg(s.checkpointing), self.variant,  # checkpointing: + the recompute
                            c.model.vision.patch_dropout, self.mim_dim)
        if self.coca:  # the caption half, every position a token
            flops["train"] += caption_flops(c.model, self.variant, self.coca)
        if self.teacher:  # its forward, every sample, every step
            flops["train"] += self.teacher.flops
        measured = speed.measured_mfu(self.results_dir, self.gpu.name, c.model.vision.patch_dropout,
                                      c.engine.compile != "off") if self.results_dir else None
        mfu = measured or self.gpu.mfu
        dim = 0 if self.mim_dim else self.variant.embed_dim  # MIM's loss gathers nothing
        if c.objective.kind == "distill" and c.distill.loss == "soft_ce":
            dim += self.variant.embed_dim + self.distill_width // 2  # its own gather; the teacher's: forward only
        comm = speed.comm_bytes(s.zero, c.engine.kind, c.engine.precision, self.trainable, self.global_batch,
                                dim, self.ranks)
        t = speed.step_seconds(flops["train"], s.micro_batch * s.accum, self.gpu, mfu, comm, self.nodes)
        steps = derive(c, self.ranks).steps  # run.steps, or train_samples / global batch
        return {"flops_per_sample_forward_full": flops["forward_full"], "flops_per_sample_train": flops["train"],
                "mfu": mfu, "mfu_source": "measured (bench/results)" if measured else "assumed (GPU table)",
                "comm_bytes_per_step": comm, **t, "samples_per_s": self.global_batch / t["step_s"],
                "wall_hours": t["step_s"] * steps / 3600, "gpu_hours": t["step_s"] * steps * self.ranks / 3600}

    def suggestions(self, s: Setting) -> List[str]:
        """One-line changes: what makes the run fit, or what is cheaper while it still fits."""
        out: List[str] = []
        fits = self.fits(s)
        if not fits:
            out += self._to_fit(s)
        elif any(s.checkpointing) and self.fits(dataclasses.replace(s, checkpointing=(False, False))):
            out.append("model.vision.grad_checkpointing=false model.text.grad_checkpointing=false also fits "
                       "(no recomputation: about a third less compute per step)")
        if fits and self.cfg.engine.kind == "deepspeed":
            lower = next((z for z in range(s.zero) if self.fits(dataclasses.replace(s, zero=z))), None)
            if lower is not None:
                out.append(f"engine.zero_stage={lower} also fits (less communication per step)")
        parts = self.parts(s)
        loss = parts.get(LOSS, 0) + parts.get(DISTILL_LOSS, 0)
        if self.cfg.loss.impl in ("naive", "local") and loss > 0.1 * self.gpu.memory_gib * memory.GiB:
            out.append(f"loss.impl=tiled (or ring): the {self.cfg.loss.impl} loss holds {loss / memory.GiB:.1f} GiB "
                       "at this global batch")
        return out

    def _to_fit(self, s: Setting) -> List[str]:
        out = []
        both = (True, True)
        for ckpt in ([s.checkpointing] if s.checkpointing == both else [s.checkpointing, both]):  # or recompute
            t = dataclasses.replace(s, checkpointing=ckpt)
            mb = self.largest_micro_batch(t)
            if mb:
                k = self.keeping_batch(t, mb)
                flags = " model.vision.grad_checkpointing=true model.text.grad_checkpointing=true" if \
                    ckpt != s.checkpointing else ""
                out.append(f"data.micro_batch_size={k.micro_batch} engine.accum_steps={k.accum}{flags} fits "
                           f"(global batch {k.micro_batch * k.accum * self.ranks})")
        if self.cfg.engine.kind == "deepspeed" and s.zero < 3:
            higher = next((z for z in range(s.zero + 1, 4) if self.fits(dataclasses.replace(s, zero=z))), None)
            if higher is not None:
                out.append(f"engine.zero_stage={higher} fits at this micro-batch")
        return out or ["nothing tried fits: a larger GPU, more GPUs with ZeRO-3, or a smaller model"]


def plan(cfg, variant, gpu_name: str, nodes: int, gpus_per_node: int, results_dir: Optional[str] = None) -> Dict:
    """The whole plan as plain data (what ``evaclip plan --json`` prints). ``results_dir``: where this project's GPU
    measurements are (None: the source checkout's bench/results)."""
    g = speed.gpu(gpu_name)
    p = Planner(cfg, variant, g, nodes, gpus_per_node,
                speed.bench_results_dir() if results_dir is None else results_dir)
    s = p.current()
    parts = p.parts(s)
    peak = p.peak(s)
    return {"model": variant.name, "objective": cfg.objective.kind, "gpu": g.name, "gpu_memory_gib": g.memory_gib,
            "nodes": nodes, "gpus_per_node": gpus_per_node, "global_batch": p.global_batch, "micro_batch": s.micro_batch,
            "accum_steps": s.accum, "engine": cfg.engine.kind, "zero_stage": s.zero, "precision": cfg.engine.precision,
            "grad_checkpointing": {"image": s.checkpointing[0], "text": s.checkpointing[1]},
            "patch_dropout": cfg.model.vision.patch_dropout, "compile": cfg.engine.compile,
            "loss_impl": cfg.loss.impl, "parts_bytes": parts,
            "step_only_gradient_bytes": p.states(s).step_gradients, "teacher_forward_bytes": p.teacher_forward(s),
            "teacher": describe(p.teacher) if p.teacher else None, "cuda_context_bytes": memory.CUDA_CONTEXT_BYTES,
            "fragmentation_margin": memory.FRAGMENTATION, "peak_bytes": peak,
            "fits": peak <= g.memory_gib * memory.GiB, "largest_micro_batch": p.largest_micro_batch(s),
            "speed": p.speed(s), "suggestions": p.suggestions(s)}
