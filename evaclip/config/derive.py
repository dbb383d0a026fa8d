"""Values checked against each other and the derived ones computed once (``derive``); the files a config names
are checked by the preflight (``evaclip.preflight.resolve``), which calls this."""
from __future__ import annotations

import dataclasses
import math
import os

from evaclip.config.schema import Derived, ExperimentConfig
from evaclip.data.topology import check_streams
from evaclip.files import ConfigError, from_dict


def derive(cfg: ExperimentConfig, world_size: int = 1) -> Derived:
    """Check the values against each other and compute the derived ones once. What the config names in other
    files (the model file, the recipe, the suite, the DeepSpeed overlay) is checked by the preflight
    (``evaclip.preflight.resolve``, the entry point), which calls this."""
    _check_values(cfg, world_size)
    global_batch = cfg.data.micro_batch_size * world_size * cfg.engine.accum_steps
    if cfg.run.steps > 0:
        steps = cfg.run.steps
    elif cfg.run.train_samples > 0:
        steps = math.ceil(cfg.run.train_samples / global_batch)
    else:
        raise ConfigError("run: set run.steps or run.train_samples")
    if cfg.schedule.warmup_steps >= steps and steps > 1:
        raise ConfigError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) must be below the {steps} steps")
    unmasked = cfg.schedule.unmasked_tuning_samples
    unmasked_from = steps - math.ceil(unmasked / global_batch) if unmasked > 0 else steps
    return Derived(
        world_size=world_size,
        global_batch=global_batch,
        steps=steps,
        warmup_steps=cfg.schedule.warmup_steps,
        train_samples=steps * global_batch,
        unmasked_from_step=max(0, unmasked_from),
        run_dir=os.path.join(cfg.run.output_dir, cfg.run.name),
    )


def _check_values(cfg: ExperimentConfig, world_size: int) -> None:
    """Combinations of values; an error names the key. (Each value's own range is checked on load, from the
    schema's bounds, here again for a config built or changed in code.)"""
    from_dict(ExperimentConfig, dataclasses.asdict(cfg))
    if cfg.spike.enabled:
        sp = cfg.spike
        if sp.max_nonfinite >= cfg.engine.max_bad_steps:
            raise ConfigError(f"spike.max_nonfinite ({sp.max_nonfinite}) must be below engine.max_bad_steps "
                              f"({cfg.engine.max_bad_steps}), or the run stops before it can roll back")
    if cfg.data.streams:
        g = cfg.data.micro_batch_size * world_size * cfg.engine.accum_steps
        why = check_streams(cfg.data.streams, g, world_size, max(1, cfg.data.workers))
        if why:
            raise ConfigError(f"data.streams = {cfg.data.streams} cannot serve {world_size} ranks x "
                              f"{max(1, cfg.data.workers)} data.workers with a global batch of {g}: {why}; choose "
                              "data.streams so that every rank's streams give its share (a multiple of ranks x "
                              "workers that divides the global batch always does)")
    if cfg.engine.kind == "torch" and cfg.engine.zero_stage:
        raise ConfigError("engine.zero_stage needs engine.kind = 'deepspeed'")
    if cfg.engine.kind == "torch" and cfg.engine.precision == "fp16":
        raise ConfigError("engine.precision = 'fp16' needs engine.kind = 'deepspeed' (dynamic loss scaling)")
    if cfg.loss.kind == "siglip" and not cfg.model.use_logit_bias:
        raise ConfigError("loss.kind = 'siglip' needs model.use_logit_bias = true (SigLIP's learned bias)")
    if cfg.model.text.kind == "hf" and not cfg.model.text.hf_path:
        raise ConfigError("model.text.kind = 'hf' needs model.text.hf_path (a local folder with config.json)")
    if not cfg.data.recipe and not cfg.data.shards:
        raise ConfigError("data: set data.recipe (a built-in name or a recipe file) or data.shards (a tar pattern)")
    if cfg.eval.suite and "{root}" in cfg.eval.datasets_root and not cfg.data.root:
        raise ConfigError("eval.datasets_root uses {root} but data.root is not set")
    if len(cfg.optim.betas) != 2 or len(cfg.optim.trust_clip) != 2 or len(cfg.data.crop_scale) != 2:
        raise ConfigError("optim.betas, optim.trust_clip and data.crop_scale take two numbers each")
    for key, (lo, hi) in [("data.crop_scale", cfg.data.crop_scale), ("optim.trust_clip", cfg.optim.trust_clip)]:
        if lo > hi:
            raise ConfigError(f"{key} is [min, max]: got [{lo}, {hi}]")
    if cfg.objective.kind == "mim":
        _check_mim(cfg)
    if cfg.objective.kind == "distill":
        _check_distill(cfg)
    if cfg.objective.kind == "coca":
        _check_coca(cfg)


def _check_coca(cfg: ExperimentConfig) -> None:
    if cfg.model.text.kind != "clip":
        raise ConfigError("objective.kind = 'coca' needs model.text.kind = 'clip': the caption decoder reads the "
                          "CLIP text tower's causal token states")
    if cfg.engine.compile != "off":
        raise ConfigError("objective.kind = 'coca' runs eager: set engine.compile = 'off' (the chunked caption loss "
                          "is not compiled yet)")
    if cfg.distill.teacher:
        raise ConfigError("objective.kind = 'coca' does not distill: distill.teacher is set (CoCa with a teacher is "
                          "not supported; train objective.kind = 'distill' or leave distill.teacher unset)")
    if cfg.coca.caption_weight == 0 and cfg.coca.clip_weight == 0:
        raise ConfigError("coca.caption_weight and coca.clip_weight are both 0: nothing to train")


def _check_distill(cfg: ExperimentConfig) -> None:
    d = cfg.distill
    if not d.teacher and d.source == "online":
        raise ConfigError("objective.kind = 'distill' needs distill.teacher (an evaclip run dir or checkpoint, an "
                          "open_clip export folder, or open_clip:<name> with distill.teacher_weights), or "
                          "distill.source = 'shards' with reinforced shards")
    if d.teacher.startswith("open_clip:") and not d.teacher_weights:
        raise ConfigError(f"distill.teacher = {d.teacher!r} needs distill.teacher_weights (no downloads)")
    if cfg.loss.kind == "siglip":
        # the sigmoid form (binary cross-entropy to the teacher's per-pair probabilities) is not built yet
        raise ConfigError("objective.kind = 'distill' takes loss.kind = 'clip': distillation into a SigLIP "
                          "student is not supported")


def _check_mim(cfg: ExperimentConfig) -> None:
    m = cfg.mim
    if not m.teacher:
        raise ConfigError("objective.kind = 'mim' needs mim.teacher (an evaclip run dir or checkpoint, an export "
                          "folder, or open_clip:<name> with mim.teacher_weights)")
    if m.teacher.startswith("open_clip:") and not m.teacher_weights:
        raise ConfigError(f"mim.teacher = {m.teacher!r} needs mim.teacher_weights (no downloads)")
    if cfg.model.vision.patch_dropout:
        raise ConfigError("model.vision.patch_dropout must be 0 with objective.kind = 'mim' (the student sees every "
                          "position, masked ones as the mask token)")
    if cfg.eval.suite:
        raise ConfigError("eval.suite: a MIM run has no text tower to evaluate zero-shot; unset it (the MIM loss "
                          "is logged) and evaluate the CLIP trained from it")
    if cfg.log.sample_loss:
        raise ConfigError("log.sample_loss is written by CLIP runs (per-pair contrastive losses); unset it for MIM")
    if cfg.model.vision.lock or cfg.model.init or cfg.model.text.init:
        raise ConfigError("model.vision.lock / model.init / model.text.init do not apply to a MIM run (its student "
                          "is the image tower alone; model.vision.init may start it)")
