"""LAMB against a float64 reference written from the paper (per tensor and on ZeRO-style flat partitions);
parameter groups (per-tower lr / wd, layer decay); schedules."""
import math

import pytest
import torch

from evaclip.config import OptimConfig, TowerOptimConfig
from evaclip.models import create_model
from evaclip.optim import Lamb, flat_layout, param_groups
from evaclip.schedule import lr_factor, patch_dropout_at

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, trust_clip=(0.01, 10.0))


def reference_lamb(params, grads_per_step, lr, betas, eps, weight_decay, trust_clip):
    """You et al. 2019, Algorithm 2 (LAMB), with bias correction, float64, one tensor at a time."""
    b1, b2 = betas
    w = [p.clone().double() for p in params]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, grads in enumerate(grads_per_step, start=1):
        for i in range(len(w)):
            g = grads[i].double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            u = r + weight_decay * w[i]
            wn, un = w[i].norm().item(), u.norm().item()
            trust = wn / un if wn > 0 and un > 0 else 1.0
            trust = min(max(trust, trust_clip[0]), trust_clip[1])
            w[i] = w[i] - lr * trust * u
    return w


def lamb_problem(seed=0, steps=20):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (11,), (4, 4, 3), (1,), (3,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[4].zero_()  # a zero tensor: trust ratio falls back to 1
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    return params, grads


def run_lamb(params, grads):
    """Our LAMB from ``params`` over the gradient steps ``grads``; the final tensors."""
    ps = [p.clone().requires_grad_() for p in params]
    opt = Lamb(ps, **HP)
    for g in grads:
        for p, gg in zip(ps, g):
            p.grad = gg.clone()
        opt.step()
    return ps


def test_lamb_equals_paper_reference():
    params, grads = lamb_problem()
    ref = reference_lamb(params, grads, **HP)
    ps = run_lamb(params, grads)
    assert max((a.double() - b).abs().max().item() for a, b in zip(ps, ref)) <= 1e-6


def test_the_fused_adam_pass_equals_the_foreach_ops(monkeypatch):
    """Issue 28: the LAMB step whose Adam part runs in torch's fused kernel = the foreach ops it replaced
    (<= 1e-6 over 20 steps), and the foreach path still meets the paper's reference."""
    import evaclip.optim as optim

    params, grads = lamb_problem(seed=3)
    ref = reference_lamb(params, grads, **HP)
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(optim, "_fusable", lambda p, g, fused=fused: fused)
        runs[fused] = run_lamb(params, grads)
    assert max((a - b).abs().max().item() for a, b in zip(runs[True], runs[False])) <= 1e-6
    assert max((a.double() - b).abs().max().item() for a, b in zip(runs[False], ref)) <= 1e-6


def _run_partitioned_lamb(world, pad, reduce: bool, monkeypatch):
    """``world`` simulated ranks, one thread each, every rank running its own real ``Lamb.step`` on its slice
    of the padded concatenation; the layouts' all-reduce sums the ranks' partial sums (``reduce``) or is
    absent (each rank's trust ratios from its partition alone: what an off-the-shelf LAMB computes)."""
    import threading

    import torch.distributed as dist

    params, grads = lamb_problem(1)
    numels = [p.numel() for p in params]
    offsets, pos = [], 0
    for n in numels:
        offsets.append(pos)
        pos += n + pad
    total = pos + (-pos) % world
    part = total // world

    def flatten(ts):
        f = torch.zeros(total, dtype=torch.float64)
        for t, o in zip(ts, offsets):
            f[o:o + t.numel()] = t.flatten().double()
        return f

    flat = flatten(params)
    parts = [flat[r * part:(r + 1) * part].clone().requires_grad_() for r in range(world)]
    opts = [Lamb([parts[r]], **HP) for r in range(world)]
    group = object() if reduce else None
    for r in range(world):
        opts[r].register_flat(parts[r], flat_layout(numels, offsets, r * part, part, group))
    barrier, slots, me = threading.Barrier(world), {}, threading.local()

    def all_reduce(t, group=None):  # a sum over the rank threads, like gloo's
        slots[me.rank] = t
        barrier.wait()
        summed = sum(x.clone() for x in slots.values())
        barrier.wait()
        t.copy_(summed)
        barrier.wait()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for g in grads:
        gflat = flatten(g)
        for r in range(world):
            parts[r].grad = gflat[r * part:(r + 1) * part].clone()
        errors = []

        def rank_step(r, errors=errors):
            me.rank = r
            try:
                opts[r].step()
            except Exception as e:  # surfaced below: a failing thread must fail the test
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=rank_step, args=(r,)) for r in range(world)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]
        assert not errors and not any(t.is_alive() for t in threads), errors
    out = torch.cat([p.detach() for p in parts])
    got = [out[o:o + n].view_as(p) for o, n, p in zip(offsets, numels, params)]
    mask = torch.ones(total, dtype=torch.bool)
    for o, n in zip(offsets, numels):
        mask[o:o + n] = False
    return got, reference_lamb(params, grads, **HP), out[mask]


@pytest.mark.parametrize("world,pad", [(1, 0), (2, 3), (3, 1), (4, 2)])
def test_lamb_flat_partitions_equal_reference(world, pad, monkeypatch):
    """Each rank's real LAMB step on its slice of ZeRO's padded flat buffer, per-tensor norms reassembled
    from per-stretch partial sums through the all-reduce, equals the float64 per-tensor reference."""
    got, ref, padding = _run_partitioned_lamb(world, pad, True, monkeypatch)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-6
    assert padding.abs().sum().item() == 0.0  # padding stays zero


def test_lamb_without_the_norm_all_reduce_diverges(monkeypatch):
    """Negative control: trust ratios from each partition alone differ from the reference."""
    got, ref, _ = _run_partitioned_lamb(3, 1, False, monkeypatch)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) > 1e-4


def test_flat_layout_segments():
    lay = flat_layout([4, 3], [0, 6], 2, 6)  # buffer: t0[0:4] pad[4:6] t1[6:9] pad.. ; partition [2, 8)
    assert lay.ids.tolist() == [0, 2, 1] and lay.lengths.tolist() == [2, 2, 2]


def test_layer_decay_and_per_tower_lr():
    model = create_model("EVA02-Ti-8-64")
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05,
                      visual=TowerOptimConfig(lr=4e-4, weight_decay=0.05, layer_decay=0.85),
                      text=TowerOptimConfig(lr=4e-5, weight_decay=0.02, layer_decay=0.75))
    groups = param_groups(model, cfg)
    by_name = {n: g for g in groups for n in g["param_names"]}
    nv, nt = model.num_layers("visual"), model.num_layers("text")  # 4, 4
    cases = {
        "visual.trunk.patch_embed.proj.weight": 4e-4 * 0.85 ** (nv + 1),
        "visual.trunk.pos_embed": 4e-4 * 0.85 ** (nv + 1),
        "visual.trunk.blocks.0.attn.q_proj.weight": 4e-4 * 0.85 ** nv,
        "visual.trunk.blocks.3.mlp.fc2.weight": 4e-4 * 0.85 ** 1,
        "visual.trunk.head.weight": 4e-4,
        "text.token_embedding.weight": 4e-5 * 0.75 ** (nt + 1),
        "text.transformer.resblocks.2.attn.in_proj_weight": 4e-5 * 0.75 ** (nt + 1 - 3),
        "text.text_projection": 4e-5,
        "logit_scale": 1e-3,
    }
    for name, lr in cases.items():
        assert math.isclose(by_name[name]["lr"], lr, rel_tol=1e-12), name
    assert by_name["visual.trunk.blocks.0.attn.q_proj.weight"]["weight_decay"] == 0.05
    assert by_name["text.transformer.resblocks.2.attn.in_proj_weight"]["weight_decay"] == 0.02
    for no_wd in ("visual.trunk.pos_embed", "visual.trunk.cls_token", "visual.trunk.blocks.0.norm1.weight",
                  "visual.trunk.blocks.0.attn.q_proj.bias", "text.positional_embedding", "logit_scale",
                  "text.ln_final.weight"):
        assert by_name[no_wd]["weight_decay"] == 0.0, no_wd
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_locked_tower_params_are_left_out():
    model = create_model("EVA02-Ti-8-64")
    model.lock_tower("visual", unlocked_layers=1)
    names = {n for g in param_groups(model, OptimConfig()) for n in g["param_names"]}
    assert "visual.trunk.head.weight" in names and "visual.trunk.norm.weight" in names
    assert "visual.trunk.blocks.3.attn.proj.weight" not in names and "text.text_projection" in names


def test_schedules():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(95, 100, 0, "const_cooldown", min_ratio=0.0, cooldown_steps=10) == pytest.approx(0.5)
    assert patch_dropout_at(5, 0.5, 8) == 0.5 and patch_dropout_at(8, 0.5, 8) == 0.0


def test_the_deepspeed_work_arounds_were_written_for_the_installed_deepspeed():
    """evaclip.engine.ds_compat patches DeepSpeed internals of one version: another installed version must be
    re-checked against each work-around before the pin moves (this fails loudly instead of misloading)."""
    import deepspeed

    from evaclip.engine import ds_compat

    assert deepspeed.__version__ == ds_compat.WRITTEN_FOR, (
        f"DeepSpeed {deepspeed.__version__} is installed but evaclip/engine/ds_compat.py was written for "
        f"{ds_compat.WRITTEN_FOR}: re-check load_hp_state against the new version, then update WRITTEN_FOR")
