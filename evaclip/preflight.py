"""The preflight: everything a run's config names in other files is checked before anything starts, then the
derived values are computed once (``resolve``, the entry point of ``evaclip train``, ``--dry-run`` included).

Each check belongs to the module that reads the file: the model file (``models.registry``), the recipe
(``data.recipes``), the zero-shot suite (``evalsuite``), the DeepSpeed overlay (``engine``); an error names the
config key. ``config.derive`` checks the values against each other and computes the numbers.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List

from evaclip.checkpoint import resume_candidates
from evaclip.config import Derived, ExperimentConfig, derive
from evaclip.data.recipes import load_recipe
from evaclip.engine import check_overlay
from evaclip.errors import CheckpointError, ConfigError
from evaclip.evalsuite import load_suite
from evaclip.models.registry import get_variant


def _named(key: str, check, *args):
    """``check(*args)``, with its ConfigError prefixed by the config key that named the file."""
    try:
        return check(*args)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def resolve(cfg: ExperimentConfig, world_size: int = 1, inputs_here: bool = True) -> Derived:
    """Check the files the config names, then derive the run's values (global batch, steps, run dir, ...).
    ``inputs_here=False`` (a --dry-run, maybe on another machine than the cluster's): the weights and
    checkpoints to start from need not exist here (``missing_inputs`` lists them)."""
    variant = _named("model.name", get_variant, cfg.model.name, cfg.model.model_dir)
    derived = derive(cfg, world_size)
    if cfg.data.recipe:
        recipe = _named("data.recipe", load_recipe, cfg.data.recipe)
        if not cfg.data.root and any("{root}" in s.shards for s in recipe.source):
            raise ConfigError(f"data.root is not set but recipe {recipe.name!r} names its shards under {{root}}: "
                              "set data.root=<folder holding the shards>")
    if cfg.eval.suite:
        _named("eval.suite", load_suite, cfg.eval.suite)
    if cfg.engine.deepspeed_overlay:
        check_overlay(cfg.engine.deepspeed_overlay)
    missing = missing_inputs(cfg) if inputs_here else []
    if missing:
        raise ConfigError(missing[0])
    return dataclasses.replace(derived, image_size=variant.image_size, context_length=variant.context_length)


def missing_inputs(cfg: ExperimentConfig) -> List[str]:
    """The weights and checkpoints a run starts from that do not exist, a line each naming the key (a missing one
    failed minutes in, after the data and the model were built); what they hold is checked when they are read."""
    m, out = cfg.model, []
    for key, path in [("model.init", m.init), ("model.vision.init", m.vision.init), ("model.text.init", m.text.init),
                      ("model.text.hf_path", m.text.hf_path if m.text.kind == "hf" else ""),
                      ("mim.teacher_weights", cfg.mim.teacher_weights),
                      ("mim.teacher", "" if cfg.mim.teacher.startswith("open_clip:") else cfg.mim.teacher)]:
        if path and "://" not in path and not os.path.exists(path):
            out.append(f"{key}: no such file or folder: {path}")
    resume = cfg.checkpoint.resume
    if resume in ("auto", "none"):
        return out
    if not os.path.exists(resume):
        out.append(f"checkpoint.resume: no such checkpoint: {resume}")
        return out
    try:
        resume_candidates(resume, "")
    except CheckpointError as e:
        out.append(str(e))
    return out
