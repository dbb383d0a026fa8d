"""Values checked against each other and the derived ones computed once (``derive``); the files a config names
are checked by the preflight (``evaclip.preflight.resolve``), which calls this."""
from __future__ import annotations

import math
import os

from evaclip.config.schema import Derived, ExperimentConfig
from evaclip.files import ConfigError



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
    """Ranges and combinations of values; an error names the key."""
    for key, v in [("data.micro_batch_size", cfg.data.micro_batch_size), ("engine.accum_steps", cfg.engine.accum_steps),
                   ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("log.every_steps", cfg.log.every_steps),
                   ("checkpoint.every_steps", cfg.checkpoint.every_steps)]:
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    for key, v in [("data.workers", cfg.data.workers), ("eval.workers", cfg.eval.workers),
                   ("eval.every_steps", cfg.eval.every_steps)]:
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if cfg.spike.enabled:
        sp = cfg.spike
        if sp.window < 5 or sp.patience < 1 or sp.max_rollbacks < 1 or sp.k_mad <= 0 or sp.skip_samples < 0:
            raise ConfigError("spike: window >= 5, patience >= 1, max_rollbacks >= 1, k_mad > 0, skip_samples >= 0")
        if sp.max_nonfinite >= cfg.engine.max_bad_steps:
            raise ConfigError(f"spike.max_nonfinite ({sp.max_nonfinite}) must be below engine.max_bad_steps "
                              f"({cfg.engine.max_bad_steps}), or the run stops before it can roll back")
    if cfg.data.streams < 0:
        raise ConfigError(f"data.streams must be >= 0, got {cfg.data.streams}")
    if cfg.data.streams:
        from evaclip.data.topology import check_streams

        g = cfg.data.micro_batch_size * world_size * cfg.engine.accum_steps
        why = check_streams(cfg.data.streams, g, world_size, max(1, cfg.data.workers))
        if why:
            raise ConfigError(f"data.streams = {cfg.data.streams} cannot serve {world_size} ranks x "
                              f"{max(1, cfg.data.workers)} data.workers with a global batch of {g}: {why}; choose "
                              "data.streams so that every rank's streams give its share (a multiple of ranks x "
                              "workers that divides the global batch always does)")
    if cfg.data.batch_timeout_s < 0:
        raise ConfigError(f"data.batch_timeout_s must be >= 0, got {cfg.data.batch_timeout_s}")
    if not 0.0 <= cfg.model.vision.patch_dropout < 1.0:
        raise ConfigError(f"model.vision.patch_dropout must be in [0, 1), got {cfg.model.vision.patch_dropout}")
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
    if cfg.objective.kind == "mim":
        _check_mim(cfg)


def _check_mim(cfg: ExperimentConfig) -> None:
    m = cfg.mim
    if not m.teacher:
        raise ConfigError("objective.kind = 'mim' needs mim.teacher (an evaclip run dir or checkpoint, an export "
                          "folder, or open_clip:<name> with mim.teacher_weights)")
    if m.teacher.startswith("open_clip:") and not m.teacher_weights:
        raise ConfigError(f"mim.teacher = {m.teacher!r} needs mim.teacher_weights (no downloads)")
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"mim.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    if m.min_block_patches < 1 or not 0.0 < m.min_aspect <= 1.0:
        raise ConfigError("mim.min_block_patches must be >= 1 and mim.min_aspect in (0, 1]")
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
