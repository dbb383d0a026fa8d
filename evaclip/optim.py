"""LAMB (exact under ZeRO partitioning), AdamW, and the parameter groups EVA-CLIP trains with.

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2), per tensor w:
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    u = m_hat / (sqrt(v_hat) + eps) + wd * w          (m_hat, v_hat bias-corrected when enabled)
    r = clamp(||w|| / ||u||, min, max)   (r = 1 when ||w|| or ||u|| is 0)
    w = w - lr * r * u

Under DeepSpeed the optimizer does not see tensors: ZeRO-1/2 (and the fp16/bf16 wrappers) hand it one flat
partition per parameter group, a slice of the concatenated (padded) tensors of the group. An off-the-shelf
LAMB then takes norms of partitions, not tensors (measured: 2e-2 weight divergence after 40 steps). Here
the engine describes each partition's layout (``FlatLayout``: which tensor each stretch of the partition
belongs to); the step reduces squared norms per stretch (``segment_reduce``), adds them per tensor and
all-reduces across data-parallel ranks, so every rank applies the trust ratio of the whole tensor.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer


@dataclass
class FlatLayout:
    """How one flat partition splits into tensors: consecutive stretches with their tensor ids.

    ``ids[k]`` is the tensor index (in the group's trainable-parameter order) of stretch k, or
    ``num_tensors`` for padding; ``lengths[k]`` its length. ``sum(lengths)`` equals the partition size.
    """

    ids: torch.Tensor  # [S] int64
    lengths: torch.Tensor  # [S] int64
    num_tensors: int
    process_group: Optional[object] = None  # data-parallel group to all-reduce norms over (None: no reduce)


def flat_layout(numels: List[int], offsets: List[int], part_start: int, part_size: int,
                process_group=None) -> FlatLayout:
    """Layout of the partition [part_start, part_start + part_size) of a flat buffer holding tensors of
    ``numels`` at ``offsets`` (gaps between them, and the tail, are padding)."""
    pad, end = len(numels), part_start + part_size
    intervals, pos = [], 0  # (tensor id, start, stop) covering the whole buffer
    for tid, (n, off) in enumerate(zip(numels, offsets)):
        if off > pos:
            intervals.append((pad, pos, off))
        intervals.append((tid, off, off + n))
        pos = off + n
    intervals.append((pad, pos, max(pos, end)))
    merged: List[List[int]] = []
    for tid, a, b in intervals:
        a, b = max(a, part_start), min(b, end)
        if b <= a:
            continue
        if merged and merged[-1][0] == tid == pad:
            merged[-1][1] += b - a
        else:
            merged.append([tid, b - a])
    assert sum(n for _, n in merged) == part_size, "layout does not cover the partition"
    return FlatLayout(torch.tensor([t for t, _ in merged], dtype=torch.long),
                      torch.tensor([n for _, n in merged], dtype=torch.long), len(numels), process_group)


def _fusable(params, grads) -> bool:
    """torch's fused Adam kernel takes floating tensors of one dtype on a CPU or CUDA device."""
    p0 = params[0]
    return (p0.device.type in ("cpu", "cuda") and p0.is_floating_point()
            and all(p.dtype == p0.dtype and g.dtype == p0.dtype and p.device == p0.device and not g.is_sparse
                    for p, g in zip(params, grads)))


class Lamb(Optimizer):
    """LAMB with vectorised (foreach) per-tensor math and an exact mode for flat ZeRO partitions."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust_clip=(0.01, 10.0), bias_correction: bool = True):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        trust_clip=tuple(trust_clip), bias_correction=bias_correction)
        super().__init__(params, defaults)
        # keyed by the flat partition tensor itself: DeepSpeed steps one group at a time by swapping
        # param_groups, and load_state_dict rebuilds the group dicts, but the partition tensors persist
        self.layouts: Dict[int, Tuple[torch.Tensor, FlatLayout]] = {}
        self._kept: Dict[int, torch.Tensor] = {}  # CPU update buffers by parameter (see _update_buffers)

    def register_flat(self, flat: torch.Tensor, layout: FlatLayout) -> None:
        """Declare that ``flat`` (a partition DeepSpeed will hand to ``step``) is described by ``layout``."""
        if flat.dim() != 1 or flat.numel() != int(layout.lengths.sum()):
            raise ValueError(f"layout covers {int(layout.lengths.sum())} elements, the flat partition has {flat.numel()}")
        self.layouts[id(flat)] = (flat, layout)

    @staticmethod
    def _ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        r = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp_min(1e-30), torch.ones_like(w_norm))
        return r.clamp(lo, hi)

    def _adam_direction(self, group, params, grads):
        """Update m, v in place and return u = m_hat / (sqrt(v_hat) + eps) + wd * w for each param. With bias
        correction, torch's fused Adam kernel writes m, v and the Adam part of u in one pass over memory (its
        update with lr = -1 applied to zeros); else, or where it cannot run, the foreach ops below."""
        b1, b2 = group["betas"]
        ms, vs, steps = [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        # under torch.compile (engine.compile = "step") the foreach ops are traced and fused by the compiler: the
        # fused kernel is the eager path's fusion
        if group["bias_correction"] and not torch.compiler.is_compiling() and _fusable(params, grads):
            upd = self._update_buffers(params)
            counts = {s: torch.tensor(float(s), device=params[0].device) for s in set(steps)}
            torch._fused_adam_(upd, grads, ms, vs, [], [counts[s] for s in steps], lr=-1.0, beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False)
        else:
            upd = self._foreach_direction(group, grads, ms, vs, steps)
        if group["weight_decay"] != 0:
            torch._foreach_add_(upd, params, alpha=group["weight_decay"])
        return upd

    def _update_buffers(self, params) -> List[torch.Tensor]:
        """Zeroed buffers for the update. On a CPU they are kept from step to step: a fresh buffer this large is
        page-faulted in on every step (measured: 40% of an EVA02-B-16 LAMB step). A GPU's caching allocator
        reuses the freed block by itself, so there none is kept (it would add 4 bytes per parameter to the peak)."""
        if params[0].device.type != "cpu":
            return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        bufs = []
        for p in params:
            buf = self._kept.get(id(p))
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = self._kept[id(p)] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(buf)
        torch._foreach_zero_(bufs)
        return bufs

    @staticmethod
    def _foreach_direction(group, grads, ms, vs, steps):
        b1, b2 = group["betas"]
        torch._foreach_lerp_(ms, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
        if group["bias_correction"]:
            c1 = [1 - b1 ** s for s in steps]
            c2 = [math.sqrt(1 - b2 ** s) for s in steps]
        else:
            c1, c2 = [1.0] * len(steps), [1.0] * len(steps)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, c2)
        torch._foreach_add_(denom, group["eps"])
        upd = torch._foreach_div(ms, c1)
        torch._foreach_div_(upd, denom)
        return upd

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("LAMB does not support sparse gradients")
            upd = self._adam_direction(group, params, grads)
            lo, hi = group["trust_clip"]
            flat = self.layouts.get(id(params[0])) if len(params) == 1 else None
            if flat is None:  # plain tensors: trust ratio per tensor
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(upd))
                ratio = self._ratio(w_norm, u_norm, lo, hi) * (-group["lr"])
                torch._foreach_addcmul_(params, upd, list(ratio.unbind(0)))  # w += (-lr r) u, one pass
            else:  # one flat partition: per-tensor norms from per-stretch partial sums, all-reduced
                (p,), (u,) = params, upd
                ratio = self._flat_ratio(p, u, flat[1], lo, hi)
                p.add_(u * ratio, alpha=-group["lr"])
        return loss

    @staticmethod
    def _flat_ratio(p: torch.Tensor, u: torch.Tensor, layout: FlatLayout, lo: float, hi: float) -> torch.Tensor:
        ids, lengths = layout.ids.to(p.device), layout.lengths.to(p.device)
        t = layout.num_tensors
        cdt = torch.promote_types(p.dtype, torch.float32)  # norms of bf16 partitions in fp32
        pc, uc = p.to(cdt), u.to(cdt)
        sq = torch.stack([torch.segment_reduce(pc * pc, "sum", lengths=lengths),
                          torch.segment_reduce(uc * uc, "sum", lengths=lengths)])  # [2, S]
        per_tensor = torch.zeros(2, t + 1, device=p.device, dtype=cdt)
        per_tensor.index_add_(1, ids, sq)
        if layout.process_group is not None and dist.is_initialized():
            dist.all_reduce(per_tensor, group=layout.process_group)
        norms = per_tensor.sqrt()
        ratio = Lamb._ratio(norms[0], norms[1], lo, hi)  # [T + 1]; padding stretches get any value (u = 0)
        return torch.repeat_interleave(ratio[ids], lengths).to(p.dtype)


# ---------------------------------------------------------------------------------------------------- groups
_NO_DECAY_PAT = re.compile(r"(^|\.)(bias|q_bias|v_bias)$")


def _decays(name: str, p: torch.Tensor, no_wd_names: set) -> bool:
    """Biases, norm weights (1-D), position/class embeddings and logit_scale get no weight decay."""
    return not (p.ndim <= 1 or name in no_wd_names or _NO_DECAY_PAT.search(name))


def param_groups(model, cfg) -> List[dict]:
    """Parameter groups by (tower, layer id, decay): per-tower lr / weight decay, layer-wise lr decay.

    ``cfg`` is the ``optim`` section. Each group carries ``base_lr`` (the scheduler multiplies it),
    ``lr_scale`` = layer_decay ** (num_layers + 1 - layer_id) and a readable ``name``.
    """
    no_wd = model.no_weight_decay()
    towers = {"visual": cfg.visual, "text": cfg.text}
    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = model.tower_of(name)
        tcfg = towers.get(tower)
        lr = tcfg.lr if tcfg is not None and tcfg.lr >= 0 else cfg.lr
        wd = tcfg.weight_decay if tcfg is not None and tcfg.weight_decay >= 0 else cfg.weight_decay
        ld = tcfg.layer_decay if tcfg is not None else 1.0
        layer = model.layer_id(name)
        scale = ld ** (model.num_layers(tower) + 1 - layer) if tower in towers else 1.0
        decay = _decays(name, p, no_wd)
        key = (tower, layer, decay)
        if key not in groups:
            groups[key] = dict(params=[], param_names=[], base_lr=lr, lr=lr * scale, lr_scale=scale,
                               weight_decay=wd if decay else 0.0, name=f"{tower}/layer{layer}/{'decay' if decay else 'no_decay'}")
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model, cfg) -> Optimizer:
    """The optimizer named by ``optim.name`` over ``param_groups(model, cfg)``."""
    groups = param_groups(model, cfg)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                    trust_clip=tuple(cfg.trust_clip), bias_correction=cfg.bias_correction)
    if cfg.name == "adamw":
        # the fused kernel (CPU and CUDA) updates every tensor of a group in one pass
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=True)
    raise ValueError(f"optim.name must be lamb or adamw, got {cfg.name!r}")
