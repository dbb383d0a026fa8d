"""What a resume must keep: the settings recorded in every checkpoint (``resume_settings``) and the check a resume
passes before anything is written (``check_resume_settings``). With logical data streams the ranks, micro-batch
size and accumulation may change as long as the global batch does not (elastic resume)."""
from __future__ import annotations

from typing import Dict, Optional

from evaclip.config import ExperimentConfig
from evaclip.data.recipes import load_recipe
from evaclip.errors import CheckpointError

# the settings a resume must keep (else the data order, batch or model would silently change)
# (data.workers may change: with logical data streams the samples do not depend on it)
RESUME_KEYS = ("model.name", "model.model_dir", "model.text.kind", "model.use_logit_bias", "data.recipe",
               "data.root", "data.shards", "data.micro_batch_size", "data.shuffle_buffer",
               "data.resampled", "data.crop_scale", "data.hflip", "engine.accum_steps", "engine.zero_stage",
               "run.seed", "objective.kind", "mim.teacher", "mim.teacher_layer", "mim.mask_ratio", "mim.loss_on",
               "distill.teacher", "distill.source", "distill.loss", "distill.teacher_width", "distill.weight", "distill.clip_weight", "distill.temperature",
               "coca.decoder_layers", "coca.n_queries", "coca.caption_weight", "coca.clip_weight",
               "coca.label_smoothing",
               "world_size")


def resume_settings(cfg: ExperimentConfig, world_size: int) -> Dict:
    """The values of ``RESUME_KEYS`` for this run (recorded in every checkpoint's meta), and the recipe's sources
    as they are now: a recipe file edited between a checkpoint and its resume (shards, sizes, weights, sources
    added or removed) changes the data the saved positions point into."""
    flat = {"world_size": world_size}
    for key in RESUME_KEYS[:-1]:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        flat[key] = list(node) if isinstance(node, (list, tuple)) else node
    if cfg.data.recipe:
        flat["data.recipe_sources"] = [[s.name, s.shards, s.samples, s.weight] for s in load_recipe(cfg.data.recipe).source]
    return flat


def global_batch(settings: Dict) -> Optional[int]:
    """micro-batch x ranks x accumulation of a settings record (None where one is missing)."""
    try:
        return settings["data.micro_batch_size"] * settings["world_size"] * settings["engine.accum_steps"]
    except (KeyError, TypeError):
        return None


def check_global_batch(saved: Dict, now: Dict, ckpt: str) -> None:
    """A resume never changes the global batch (the lr schedule, the loss over the batch and the data per step
    depend on it): one line saying which keys give the saved one on this many ranks."""
    g_saved, g_now = global_batch(saved), global_batch(now)
    if g_saved is None or g_now is None or g_saved == g_now:
        return
    world = now["world_size"]
    fix = f"no micro-batch size gives {g_saved} on {world} ranks: resume on a number of ranks that divides it"
    if g_saved % world == 0:
        per_rank, micro = g_saved // world, saved["data.micro_batch_size"]
        micro = micro if per_rank % micro == 0 else per_rank
        fix = f"set data.micro_batch_size={micro} engine.accum_steps={per_rank // micro}"
    raise CheckpointError(f"{ckpt} was trained with a global batch of {g_saved} (data.micro_batch_size "
                          f"{saved['data.micro_batch_size']} x {saved['world_size']} ranks x engine.accum_steps "
                          f"{saved['engine.accum_steps']}); this run's would be {g_now} (data.micro_batch_size "
                          f"{now['data.micro_batch_size']} x {world} x engine.accum_steps {now['engine.accum_steps']}): "
                          f"{fix}")


def same_ranks_only(ckpt: str, saved_world: int) -> CheckpointError:
    """The refusal of a checkpoint from before logical data streams on another number of ranks."""
    return CheckpointError(f"{ckpt} was written by {saved_world} ranks with per-worker data streams (before logical "
                           f"data streams); resume it on {saved_world} ranks")


def check_resume_settings(saved: Dict, now: Dict, allowed, ckpt: str) -> None:
    """A resume keeps the settings its checkpoint was written with. With logical data streams the ranks,
    micro-batch size and accumulation may change as long as the global batch does not (elastic resume)."""
    factors = ("data.micro_batch_size", "world_size", "engine.accum_steps")
    if not all(k in allowed for k in factors if saved.get(k) != now.get(k)):  # unless the user allowed it
        check_global_batch(saved, now, ckpt)
    elastic = set(factors) if saved.get("data.num_streams") else set()
    if not elastic and saved.get("world_size", now["world_size"]) != now["world_size"]:
        raise same_ranks_only(ckpt, saved["world_size"])
    changed = [f"{k} ({saved[k]} -> {now[k]})" for k in now
               if k in saved and saved[k] != now[k] and k not in allowed and k not in elastic]
    if changed:
        keys = ", ".join(f'"{c.split(" ")[0]}"' for c in changed)
        raise CheckpointError(f"{ckpt} was written with other settings: {', '.join(changed)}; set them back, start a "
                              f"new run (run.name=...), or allow it with checkpoint.allow_changes=[{keys}]")
