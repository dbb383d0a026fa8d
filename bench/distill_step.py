"""Distillation's cost per training step: the same student (EVA02-Mi-8-64), data and settings trained with the
CLIP loss alone, with online distillation (the teacher's forward every step: EVA02-Ti-8-64, the tiny export) and
with offline distillation (shards `evaclip data reinforce` wrote with that teacher: stored crops and embeddings,
no teacher forward). Whole training steps through the trainer, data workers included (the reinforced samples'
extra member is read and decoded there); the variants alternate, rounds x steps each, the first steps of every run
are warm-up.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from typing import Dict

WARMUP = 5


def reinforce_once(recipe: str, root: str, export: str, cache: str, augmentations: int) -> str:
    """The bench shards reinforced by the tiny teacher (kept in the cache): their recipe."""
    from evaclip.curation.reinforce import reinforce
    from evaclip.encoders import load_source

    out = os.path.join(cache, f"reinforced_{os.path.basename(os.path.normpath(root))}_k{augmentations}")
    if not os.path.exists(os.path.join(out, "recipe.toml")):
        reinforce(recipe, root, load_source(export), export, out, augmentations, batch_size=64, workers=2)
    return os.path.join(out, "recipe.toml")


def _steps(recipe: str, root: str, export: str, steps: int, batch: int, variant: str) -> Dict:
    """One run's per-step wall times (from its logged samples/s; data wait included)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    extra = {"clip": ["objective.kind=clip"],
             "online": ["objective.kind=distill", f"distill.teacher={export}"],
             "offline": ["objective.kind=distill", "distill.source=shards", f"distill.teacher={export}"]}[variant]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("distill_demo_cpu", [
            f"run.output_dir={tmp}", f"run.name={variant}", f"run.steps={steps}", f"data.recipe={recipe}",
            f"data.root={root}", f"data.micro_batch_size={batch}", "data.workers=2", "eval.suite=\"\"",
            "checkpoint.every_steps=100000", "log.every_steps=1", "log.progress=false", "log.tensorboard=false",
            "log.plot=false", "schedule.warmup_steps=2", *extra])
        Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()
        rows = [json.loads(x) for x in open(os.path.join(tmp, variant, "metrics.jsonl")) if "train/samples_per_s" in x]
    return [batch / r["train/samples_per_s"] for r in rows[WARMUP:]]


def run(recipe: str, root: str, export: str, cache: str, steps: int = 40, batch: int = 64, rounds: int = 3,
        augmentations: int = 10) -> Dict:
    reinforced = reinforce_once(recipe, root, export, cache, augmentations)
    times = {"clip": [], "online": [], "offline": []}
    for _ in range(rounds):
        for variant in times:
            times[variant] += _steps(reinforced if variant == "offline" else recipe, root if variant != "offline"
                                     else os.path.dirname(reinforced), export, steps, batch, variant)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"student": "EVA02-Mi-8-64", "teacher": "EVA02-Ti-8-64", "batch": batch, "steps": steps, "rounds": rounds,
            "augmentations": augmentations,
            **{k: {"median": med[k], "min": min(v), "max": max(v), "n": len(v)} for k, v in times.items()},
            "online_over_clip": med["online"] / med["clip"], "offline_over_clip": med["offline"] / med["clip"]}
