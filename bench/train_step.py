"""Train step: evaclip vs open_clip_train (the trainer shipped in open_clip_torch) on the same tiny EVA-02 CLIP
(EVA02-Ti-4-32, the shape of open_clip's small EVA test configs, written as an evaclip model file and given to
open_clip as the JSON config written from it), batch, precision (fp32), optimizer (AdamW), data workers and
synthetic shards, with and without 50% token dropping. Both log one line per step; the first steps are warm-up.
The eager AdamW run of each framework is also profiled (bench.step_profile): data, forward, loss, backward,
optimizer, logging and the rest of each step, measured inside the frameworks' own loops.

    python -m bench.train_step '{"impl": "open_clip", ...}'   # one run, prints JSON
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from bench.common import REPO

WARMUP = 5


def _open_clip_runner(a, tmp):
    """open_clip_train.main with our tiny model config registered and the webdataset EOF fix applied."""
    from evaclip.config import ModelConfig
    from evaclip.export.open_clip import open_clip_config
    from evaclip.models import get_variant, model_record

    cfg_dir = os.path.join(tmp, "configs")
    os.makedirs(cfg_dir, exist_ok=True)
    name = a["model"]  # the same model as an open_clip JSON config, written from its evaclip model file
    with open(os.path.join(cfg_dir, f"{name}.json"), "w") as f:
        text = model_record(ModelConfig(name=name))["config"]["text"]
        json.dump(open_clip_config(get_variant(name), text)["model_cfg"], f)
    code = f"""
import sys, open_clip
sys.path.insert(0, {REPO!r})
from bench.data_pipeline import patch_open_clip_train
patch_open_clip_train()
open_clip.add_model_config({cfg_dir!r})
{_profiler("open_clip", a)}
from open_clip_train.main import main
main(sys.argv[1:])
"""
    steps, mb = a["steps"], a["batch"]
    args = [sys.executable, "-c", code, "--train-data", a["shards"], "--dataset-type", "webdataset",
            "--dataset-resampled", "--train-num-samples", str(steps * mb), "--batch-size", str(mb), "--epochs", "1",
            "--workers", "1", "--model", a["model"], "--precision", "fp32", "--lr", "1e-3", "--wd", "0.05",
            "--warmup", "2", "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", tmp, "--name", "oc",
            "--report-to", "", "--device", "cpu", "--seed", "0"]
    if a["patch_dropout"]:
        args += ["--force-patch-dropout", str(a["patch_dropout"])]
    r = subprocess.run(args, cwd=tmp, capture_output=True, text=True, timeout=900)
    log = open(os.path.join(tmp, "oc", "out.log")).read() if os.path.exists(os.path.join(tmp, "oc", "out.log")) else ""
    times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    if r.returncode != 0 or not times:
        raise RuntimeError((r.stderr or r.stdout)[-2000:])
    return times


def _profiler(framework: str, a) -> str:
    """The line that installs bench.step_profile's timers in a run (none unless ``a["profile"]`` names a file)."""
    if not a.get("profile"):
        return ""
    return f"from bench.step_profile import install; install({framework!r}, {a['profile']!r}, {WARMUP})"


def _evaclip_runner(a, tmp):
    steps, mb = a["steps"], a["batch"]
    start = [sys.executable, "-m", "evaclip.cli"] if not a.get("profile") else \
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); {_profiler('evaclip', a)}; "
                               "from evaclip.cli import main; sys.exit(main(sys.argv[1:]))"]
    args = [*start, "train", os.path.join(REPO, "launch/experiments/demo_cpu.toml"),
            f"run.output_dir={tmp}", "run.name=ev", f"run.steps={steps}", f'data.shards="{a["shards"]}"',
            'data.recipe=""', "data.workers=1", f"data.micro_batch_size={mb}", f"optim.name={a.get('optim', 'adamw')}",
            "optim.lr=1e-3", "schedule.warmup_steps=2", "engine.grad_clip=0", "log.every_steps=1",
            "log.progress=false", "log.tensorboard=false", "log.plot=false", 'eval.suite=""',
            "checkpoint.every_steps=100000", f"model.name={a['model']}", f"model.vision.patch_dropout={a['patch_dropout']}",
            *a.get("extra", [])]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    path = os.path.join(tmp, "ev", "metrics.jsonl")
    if r.returncode != 0 or not os.path.exists(path):
        raise RuntimeError((r.stderr or r.stdout)[-2000:])
    recs = [json.loads(x) for x in open(path) if "train/samples_per_s" in x]
    return [mb / rec["train/samples_per_s"] for rec in recs]


# evaclip's variants beside open_clip_train: eager AdamW (the peer's settings), the compiled step (engine.compile =
# "step": towers, loss and optimizer by Inductor; the compile falls in the warm-up steps), and LAMB (eager)
VARIANTS = {"evaclip": {}, "evaclip_compiled": {"extra": ["engine.compile=step"]},
            "evaclip_lamb": {"optim": "lamb"}}
# the eager AdamW runs of both frameworks carry bench.step_profile's timers: where their steps' time goes
PROFILED = ("evaclip", "open_clip")


def child(a):
    with tempfile.TemporaryDirectory() as tmp:
        if a.get("profile"):
            a = {**a, "profile": os.path.join(tmp, "profile.json")}
        times = (_open_clip_runner if a["impl"] == "open_clip" else _evaclip_runner)(a, tmp)
        profile = None
        if a.get("profile"):
            with open(a["profile"]) as f:
                profile = json.load(f)
    t = times[WARMUP:]
    med = statistics.median(t)
    out = {"step_s": {"median": med, "min": min(t), "max": max(t), "n": len(t)}, "samples_per_s": a["batch"] / med}
    return {**out, "profile": profile} if profile else out


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 matmul rate (FLOP/s): the best of ``reps`` n x n products, at the bench's threads."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def train_flops(model: str, drop: float) -> float:
    """FLOPs of one training sample (forward + backward, counted by the planner's counter)."""
    from evaclip.config import ModelConfig
    from evaclip.models import get_variant
    from evaclip.plan.trace import count_flops

    return count_flops(ModelConfig(name=model), get_variant(model), drop)["train"]


def run(shards: str, steps: int = 200, batch: int = 64, compiled: bool = True, model: str = "EVA02-Ti-4-32",
        drops=(0.0, 0.5)):
    """Each variant and open_clip_train for ``steps`` steps of ``model`` (default: the shape of open_clip's small EVA
    test configs) at each token-drop rate of ``drops``; ``compiled``: also the compiled variant (Inductor compiling;
    --quick leaves it out)."""
    from bench.common import run_child

    peak, rows = matmul_peak(), []
    for drop in drops:
        res = {impl: run_child("train_step", {"impl": impl, "shards": shards, "steps": steps, "batch": batch,
                                              "patch_dropout": drop, "model": model, **VARIANTS.get(impl, {}),
                                              "profile": impl in PROFILED})
               for impl in (*VARIANTS, "open_clip") if compiled or impl != "evaclip_compiled"}
        row = {"patch_dropout": drop, "model": model, "steps": steps, **res}
        med = {k: v["step_s"]["median"] for k, v in res.items() if "error" not in v}
        if {"evaclip", "open_clip"} <= set(med):
            row["speed_ratio"] = med["open_clip"] / med["evaclip"]
        if {"evaclip_compiled", "open_clip"} <= set(med):
            row["compiled_ratio"] = med["open_clip"] / med["evaclip_compiled"]
        if {"evaclip", "evaclip_lamb"} <= set(med):
            row["lamb_over_adamw"] = med["evaclip_lamb"] / med["evaclip"]
        flops = train_flops(model, drop)
        for impl in ("evaclip", "evaclip_compiled"):  # achieved FLOP/s over this machine's fp32 matmul peak
            if impl in med:
                row[f"{impl}_peak_share"] = flops * batch / med[impl] / peak
        rows.append(row)
    return rows


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
