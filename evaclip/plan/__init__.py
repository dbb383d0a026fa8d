"""``evaclip plan``: will an experiment fit a GPU, how fast will it run, and what to change, before it is queued.

    from evaclip.plan import plan, render
    print(render(plan(cfg, variant, "a100-80gb", nodes=4, gpus_per_node=8)))

Memory by part (plan/memory.py: each formula with its source), activations and FLOPs from the real model run on
the meta device (plan/trace.py), a MIM or distillation run's frozen teacher and distillation loss measured the same
way (plan/teacher.py), step time from an MFU per GPU kind (plan/speed.py).
"""
from __future__ import annotations

from typing import Dict, List

from evaclip.plan.memory import GiB
from evaclip.plan.planner import Planner, Setting, plan
from evaclip.plan.speed import GPUS

__all__ = ["GPUS", "Planner", "Setting", "plan", "render"]


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def render(p: Dict) -> str:
    """The plan as a table a person reads."""
    s = p["speed"]
    lines: List[str] = [
        f"{p['model']} on {p['nodes']} x {p['gpus_per_node']} {p['gpu']} ({p['gpu_memory_gib']:g} GiB each): "
        f"global batch {p['global_batch']} = micro-batch {p['micro_batch']} x {p['nodes'] * p['gpus_per_node']} "
        f"GPUs x {p['accum_steps']} accumulation",
        f"{p['engine']}{' ZeRO-' + str(p['zero_stage']) if p['engine'] == 'deepspeed' else ''}, {p['precision']}, "
        f"token drop {p['patch_dropout']:g}, checkpointing: image {_on(p['grad_checkpointing']['image'])}, "
        f"text {_on(p['grad_checkpointing']['text'])}, "
        f"loss {p['loss_impl'] if p['objective'] != 'mim' else 'MIM (per position, nothing gathered)'}",
        *([f"frozen teacher {t['name']}: {t['params'] / 1e6:,.1f} M parameters (fp32, whole on every GPU), "
           f"{t['forward_flops_per_sample'] / 1e9:,.1f} GFLOPs forward per sample"] if (t := p["teacher"]) else []),
        "",
        "memory per GPU",
    ]
    for name, n in p["parts_bytes"].items():
        lines.append(f"  {name:<30}{_gib(n)}")
    lines.append(f"  {'fragmentation margin':<30}{_gib(sum(p['parts_bytes'].values()) * p['fragmentation_margin'])}"
                 f"  ({100 * p['fragmentation_margin']:.0f}%, stated)")
    lines.append(f"  {'CUDA context':<30}{_gib(p['cuda_context_bytes'])}  (stated)")
    if p["step_only_gradient_bytes"]:
        lines.append(f"  {'(step: fp32 gradients)':<30}{_gib(p['step_only_gradient_bytes'])}  (built in the optimizer "
                     "step, after the activations are freed)")
    if p["compile"] != "off":  # tests/test_plan.py holds a compiled forward's saved bytes under the eager trace
        lines.append(f"  (engine.compile = {p['compile']}: activations as eager's, an upper bound: torch.compile's "
                     "partitioner saves less, recomputing cheap ops in backward)")
    if p["teacher_forward_bytes"]:
        lines.append(f"  {'(teacher forward)':<30}{_gib(p['teacher_forward_bytes'])}  (its no-grad forward, before the "
                     "student's: a phase of its own)")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    share = p["global_batch"] // (p["nodes"] * p["gpus_per_node"])
    lines += [f"  {'peak':<30}{_gib(p['peak_bytes'])}  of {p['gpu_memory_gib']:g} GiB: {verdict}",
              f"  the largest micro-batch that fits (at most the GPU's share of the batch, {share}): "
              f"{p['largest_micro_batch'] or 'none'}", "",
              "speed",
              f"  FLOPs per sample: {s['flops_per_sample_train'] / 1e9:,.1f} G train (forward + backward), "
              f"{s['flops_per_sample_forward_full'] / 1e9:,.1f} G forward without token drop",
              f"  MFU {100 * s['mfu']:.1f}% ({s['mfu_source']}); communication {s['comm_bytes_per_step'] / GiB:.2f} "
              f"GiB per GPU per step",
              f"  step {s['step_s']:.3f} s (compute {s['compute_s']:.3f} s + communication {s['comm_s']:.3f} s, not "
              f"overlapped); {s['samples_per_s']:,.0f} samples/s",
              f"  {s['wall_hours']:,.1f} h wall, {s['gpu_hours']:,.0f} GPU-hours for run.steps"]
    if p["suggestions"]:
        lines += ["", "suggestions"] + [f"  {x}" for x in p["suggestions"]]
    return "\n".join(lines)
