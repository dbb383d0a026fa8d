"""Training throughput and MFU of a CLIP model on one GPU (runs on CPU at tiny size for testing).

    python bench/gpu_mfu.py --model EVA02-B-16 --batch 256 --steps 30 --out bench/results/gpu_mfu.json
    python bench/gpu_mfu.py --model EVA02-Ti-8-64 --device cpu --steps 3 --batch 8     # CPU smoke test

For each setting (token drop 0 / 0.5, compile off / towers / step, as `engine.compile` sets them) it trains on synthetic tensors (the input
pipeline is benchmarked separately) with bf16 autocast, SDPA attention and our LAMB, and reports
samples/s, achieved TFLOP/s and MFU. Model FLOPs per sample are counted with torch's FlopCounterMode on
a real forward + backward at that setting (so token dropping's savings are counted, not assumed);
MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the device (H100 SXM 989, H200 989, A100 312).
Open_clip's profile lists EVA02-B-16 at 41.09 GFLOPs forward per pair; the counter is checked against it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    if override:
        return override
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return float("nan")


def count_flops(model, loss_fn, images, texts) -> float:
    """FLOPs of one training step (forward + backward) counted by torch, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = model(images, texts)
        loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / images.shape[0]


def bench_setting(name, batch, steps, device, patch_dropout, compile_, dtype, warmup=5, backend="inductor"):
    """``compile_``: "off", "towers" (each tower compiled in place, as the trainer does) or "step" (the towers, the
    loss and the optimizer's update: the plain engine's ``engine.compile = "step"``)."""
    import evaclip  # noqa: F401
    from evaclip.engine.compiling import Compiler
    from evaclip.config import LossConfig, OptimConfig
    from evaclip.config import ModelConfig, VisionConfig
    from evaclip.train.objectives import ClipObjective
    from evaclip.models import create_model, get_variant
    from evaclip.optim import Lamb, param_groups

    v = get_variant(name)
    if device.type == "cuda":  # each setting's own peak, not the high-water mark of the settings before it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model_cfg = ModelConfig(name=name, vision=VisionConfig(patch_dropout=patch_dropout))
    model = create_model(model_cfg).to(device).train()
    objective = ClipObjective(model_cfg, v, LossConfig(kind="clip", impl="local"), 0, False, device)
    loss_fn = objective.loss_fn
    opt = Lamb(param_groups(model, OptimConfig()), lr=1e-4)
    images = torch.randn(batch, 3, v.image_size, v.image_size, device=device)
    texts = torch.randint(1, 49000, (batch, v.context_length), device=device)
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.autocast(**amp):
        flops = count_flops(model, loss_fn, images, texts)
    fwd = create_model(name).to(device).eval()
    with torch.no_grad(), torch.autocast(**amp):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fwd(images[:1], texts[:1])
        fwd_flops = fc.get_total_flops()
    del fwd
    update = opt.step
    if compile_ != "off":  # the CLIP objective's own compile (towers; with "step" its loss), as the trainer runs it
        compiler = Compiler(backend)
        objective.compile(model, compiler, whole_step=compile_ == "step")
        loss_fn = objective.loss_fn
        if compile_ == "step":  # the plain engine's compiled update (engine/torch_engine.py)
            update = compiler.function("optimizer", opt.step, dynamic=None)

    def step():
        with torch.autocast(**amp):
            out = model(images, texts)
            loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        loss.backward()
        update()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"model": name, "batch": batch, "patch_dropout": patch_dropout, "compile": compile_,
            "dtype": str(dtype).replace("torch.", ""), "step_s": med, "step_s_min": min(times), "step_s_max": max(times),
            "samples_per_s": batch / med, "train_flops_per_sample": flops, "forward_gflops_per_pair_full": fwd_flops / 1e9,
            "published_forward_gflops": v.gflops, "achieved_tflops": flops * batch / med / 1e12, "max_mem_gib": mem,
            "graphs": dict(compiler.graphs) if compile_ != "off" else {}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["EVA02-B-16"])
    ap.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--drop", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--compile", nargs="+", default=["off", "towers", "step"], choices=["off", "towers", "step"],
                    help="engine.compile settings to run: off, towers (each tower), step (towers, loss, optimizer)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU check)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's peak (e.g. for CPU tests)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(device, a.peak_tflops)
    rows = []
    for name in a.model:
        for comp in a.compile:
            for drop in a.drop:
                try:
                    r = bench_setting(name, a.batch, a.steps, device, drop, comp, dtype, backend=a.backend)
                except torch.OutOfMemoryError as e:
                    r = {"model": name, "patch_dropout": drop, "compile": comp, "error": f"OOM: {e}"[:200]}
                    torch.cuda.empty_cache()
                if "achieved_tflops" in r:
                    r["mfu"] = r["achieved_tflops"] / peak
                rows.append(r)
                print(json.dumps(r), flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "peak_tflops": peak, "torch": torch.__version__, "rows": rows}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print("| model | drop | compile | samples/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['patch_dropout']} | {r['compile']} | {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['patch_dropout']} | {r['compile']} | {r['samples_per_s']:.1f} | "
                  f"{r['achieved_tflops']:.1f} | {100 * r['mfu']:.1f}% |")
    return result


if __name__ == "__main__":
    main()
