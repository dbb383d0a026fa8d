"""A frozen teacher in the plan (MIM's, and distillation's when ``distill.source = "online"``): built on the meta
device from what the experiment names (models/sources.py ``meta_model``: its record or open_clip config, no weights
read), then measured as it runs in training.

* weights: fp32, whole on every GPU: the teacher lives outside the engine (never in a ZeRO partition, never cast;
  a bf16 / fp16 run autocasts its forward).
* its forward: no grad, so nothing is saved; its peak is what the forward holds at once beyond its weights and
  input, found by torch's ``MemTracker`` over the forward on the meta device, in the run's compute dtype, with
  attention as a fused kernel holds it (it tracks meta storages as it tracks CUDA ones: tests/test_plan.py holds
  the figure to a real CPU forward's).
  It runs before the student's forward (MIM: per micro-batch; distillation: every micro-batch's targets first), so
  it is a phase of its own: model states + teacher weights + the targets + this.
* targets: what it hands the loss, fp32, held until the step's backward: MIM [b, N_student, C] per micro-batch;
  distillation two unit embeddings [b, D_t] per sample of every micro-batch of the step, and their concatenation.
* the distillation loss beside the contrastive one: its buffers at the global batch, measured the same way
  (MemTracker over the real loss functions of evaclip/losses on meta tensors of the run's shapes; the ring
  through a ring of meta buffers that allocates what ``evaclip.dist.Ring`` does).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple
from unittest import mock

import torch
import torch.nn.functional as F

from evaclip.losses.dense import soft_ce_local
from evaclip.losses.distill import feature_loss
from evaclip.losses.ring import soft_ce_ring
from evaclip.losses.tiled import soft_ce_tiled
from evaclip.models.mim import teacher_architecture
from evaclip.models.sources import meta_model, resolve_source


@dataclasses.dataclass
class TeacherTrace:
    name: str
    params: int
    weight_bytes: int  # fp32, every GPU
    forward_bytes: int  # per sample: its no-grad forward's peak beyond its weights and input
    target_bytes: int  # per sample: the targets the loss reads, fp32, held to the step's backward
    flops: float  # per sample, forward (two FLOPs per multiply-add)
    width: int  # its feature width (MIM) or embedding width (distillation)


def _peak_bytes(forward: Callable[[], object], *existing) -> int:
    """The most memory ``forward`` holds at once beyond ``existing`` (modules and tensors made before it: the
    weights, the input), by torch's MemTracker (meta or CPU tensors alike)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*existing)
    # MemTracker hooks every parameter's gradient: a frozen one would refuse; under no_grad none is made anyway
    frozen = [p for m in existing if isinstance(m, torch.nn.Module) for p in m.parameters() if not p.requires_grad]

    def total(kind: str) -> int:
        return sum(v["Total"] for v in tracker.get_tracker_snapshot(kind).values())

    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.no_grad(), tracker, mock.patch.object(F, "scaled_dot_product_attention", _fused):
            before = total("current")
            forward()
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return total("peak") - before


def _fused(q, k, v, *args, **kwargs):
    """What SDPA allocates on a GPU, where a fused kernel (flash, memory-efficient) runs it: the output, never the
    [N, N] probabilities. On the meta device SDPA takes the math path, which holds them (twice the teacher's
    forward peak for EVA02-L-14); an open_clip teacher's timm attention calls it (evaclip's own attention keeps a
    fused kernel's memory on meta already: models/attention.py)."""
    return torch.empty_like(q)


def _flops(forward: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        forward()
    return float(fc.get_total_flops())


def mim_teacher(mim_cfg, student_grid: Tuple[int, int], dtype: torch.dtype) -> TeacherTrace:
    """The MIM teacher ``mim_cfg`` (the ``[mim]`` section) names, for a student of ``student_grid`` patches."""
    t = teacher_architecture(mim_cfg)
    params = sum(p.numel() for p in t.net.parameters())
    x = torch.zeros(1, 3, t.image_size, t.image_size, device="meta")
    flops = _flops(lambda: teacher_architecture(mim_cfg, math_attention=True).features(x))
    t.net.to(dtype)
    x = x.to(dtype)
    peak = _peak_bytes(lambda: t.features(x), t.net, x)
    return TeacherTrace(mim_cfg.teacher, params, 4 * params, peak, 4 * student_grid[0] * student_grid[1] * t.width, flops,
                        t.width)


def distill_teacher(distill_cfg, context_length: int, dtype: torch.dtype) -> TeacherTrace:
    """The distillation teacher ``distill_cfg`` (the ``[distill]`` section) names, both towers."""
    source = resolve_source(distill_cfg.teacher, distill_cfg.teacher_weights, "distill.teacher")
    net, record = meta_model(source, "distill.teacher", export_as_open_clip=True)  # as encoders.load_source does
    size = net.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    params = sum(p.numel() for p in net.parameters())
    text = torch.zeros(1, context_length, dtype=torch.long, device="meta")
    image = torch.zeros(1, 3, size, size, device="meta")

    def forward(model, image):
        return model.encode_image(image), model.encode_text(text)

    width = int(forward(net, image)[1].shape[-1])
    flops = _flops(lambda: forward(meta_model(source, "distill.teacher", True, True)[0] if record is not None
                                   else net, image))
    net.to(dtype)
    image = image.to(dtype)
    peak = _peak_bytes(lambda: forward(net, image), net, image, text)
    name = f"{record['arch']['name']} ({distill_cfg.teacher})" if record is not None else distill_cfg.teacher
    return TeacherTrace(name, params, 4 * params, peak, 2 * 4 * width, flops, width)


class MetaRing:
    """One rank of a ``world``-rank ring on the meta device: each ``start`` allocates the receive buffers a real
    receive would and holds what it sends until ``finish`` (as ``evaclip.dist.Ring`` does)."""

    def __init__(self, world: int):
        self.rank, self.world = 0, world

    def start(self, tensors):
        return [torch.empty_like(t) for t in tensors], list(tensors)

    def finish(self, pending):
        return pending[0]


def distill_loss_bytes(kind: str, impl: str, global_batch: int, rows: int, dim: int, t_dim: int, tile: int) -> int:
    """The distillation term's buffers per rank at its peak, forward and backward, fp32, as ``DistillLoss`` runs
    it (``rows`` = b of this rank, every micro-batch's): the student's gathered features (gathered again by the
    distillation loss) and the teacher's, b x G logits, tiles or ring blocks, per the impl."""
    g, b, world = global_batch, rows, max(1, global_batch // max(1, rows))
    dim = dim if kind == "soft_ce" else t_dim  # a feature loss reads the student through its head to D_t
    img, txt = (torch.empty(b, dim, device="meta", requires_grad=True) for _ in range(2))
    t_img, t_txt = (torch.empty(b, t_dim, device="meta") for _ in range(2))
    scale = torch.ones((), device="meta", requires_grad=True)
    t_scale = torch.ones((), device="meta")

    def run():
        with torch.enable_grad():
            if kind != "soft_ce":
                loss = feature_loss(kind, img, txt, t_img, t_txt)
            elif impl == "ring":
                loss = soft_ce_ring(img, txt, t_img, t_txt, scale, t_scale, tile, MetaRing(world))
            else:
                gathered = [torch.empty(g, d, device="meta", requires_grad=grad)
                            for d, grad in ((dim, True), (dim, True), (t_dim, False), (t_dim, False))]
                args = (img, txt, *gathered[:2], t_img, t_txt, *gathered[2:], scale, t_scale)
                loss = soft_ce_tiled(*args, tile) if impl == "tiled" else soft_ce_local(*args)
            loss.backward()

    return _peak_bytes(run, img, txt, t_img, t_txt, scale)


def describe(t: TeacherTrace) -> Dict:
    """The teacher as the plan's JSON lists it."""
    return {"name": t.name, "params": t.params, "width": t.width, "forward_flops_per_sample": t.flops}
