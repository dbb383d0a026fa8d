"""One typed, strict experiment config: a dataclass per component, loaded from TOML, overridden by dotted keys.

    cfg = load_config("launch/experiments/demo_cpu.toml", ["optim.visual.lr=3e-4", "model.vision.patch_dropout=0.5"])
    derived = resolve(cfg, world_size=8)      # global batch, steps, warmup ... computed once
    save_run_config(run_dir, cfg, derived)    # written into the run directory

Strictness: an unknown key, a wrong type or a bad value raises ``ConfigError`` naming the dotted key and
(for unknown keys) the valid ones. Components receive their own section (``cfg.optim``, ``cfg.data`` ...),
never the root. An experiment file may start from another with ``base = "other.toml"`` (deep-merged).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from evaclip.files import ConfigError, atomic_write, deep_merge, find, from_dict, read_toml, resolve_paths

__all__ = ["ConfigError", "ExperimentConfig", "Derived", "load_config", "derive", "save_run_config",
           "load_run_config", "describe", "to_dict", "dumps_toml", "parse_override"]


def _f(default, help: str, choices=None, path: Optional[str] = None, keywords: tuple = ()):
    """A documented field (``evaclip train --help-config`` prints the help). ``path``: the field holds a path
    (or, for an asset kind, a built-in name) resolved by the rule in ``evaclip.files``."""
    md = {"help": help}
    if choices:
        md["choices"] = tuple(choices)
    if path:
        md["path"], md["keywords"] = path, tuple(keywords)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str = _f("run", "run name; the run directory is <output_dir>/<name>")
    output_dir: str = _f("runs", "parent folder of run directories")
    seed: int = _f(0, "global seed (model init, data order, patch dropout)")
    train_samples: int = _f(0, "samples to train on; steps = ceil(train_samples / global batch) (or set steps)")
    steps: int = _f(0, "optimizer steps to train (overrides train_samples when > 0)")
    device: str = _f("auto", "auto | cpu | cuda", ["auto", "cpu", "cuda"])
    collective_timeout_s: float = _f(1800.0, "bound on the barriers after rank-local work (evaluation on rank 0, "
                                     "checkpoints, the end of the run): a rank that does not arrive stops the "
                                     "others with a message naming it")


@dataclass
class VisionConfig:
    patch_dropout: float = _f(0.0, "FLIP token dropping rate during training (EVA-CLIP E/g+: 0.5)")
    attn_impl: str = _f("sdpa", "attention kernel", ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                                                      "sdpa_cudnn", "flash_attn", "math"])
    grad_checkpointing: bool = _f(False, "activation checkpointing per block")
    init: str = _f("", "EVA / EVA-02 MIM checkpoint to start from (original EVA or timm layout)", path="file")
    lock: bool = _f(False, "freeze the image tower")
    unlocked_layers: int = _f(0, "with lock: leave the last N layer groups trainable")


@dataclass
class TextConfig:
    kind: str = _f("clip", "clip (CLIP text transformer) | hf (Hugging Face encoder)", ["clip", "hf"])
    act: str = _f("gelu", "MLP activation of the CLIP text tower (OpenAI weights: quick_gelu)",
                  ["gelu", "quick_gelu"])
    attn_impl: str = _f("sdpa", "attention kernel (causal)", ["sdpa", "sdpa_flash", "sdpa_efficient",
                                                             "sdpa_math", "sdpa_cudnn", "flash_attn", "math"])
    grad_checkpointing: bool = _f(False, "activation checkpointing per block")
    init: str = _f("", "text weights to start from: an OpenAI CLIP or open_clip checkpoint", path="file")
    hf_path: str = _f("", "kind=hf: local folder with config.json (+ weights); no downloads", path="file")
    hf_pooler: str = _f("mean", "kind=hf: cls | mean | eos", ["cls", "mean", "eos"])
    lock: bool = _f(False, "freeze the text tower")
    unlocked_layers: int = _f(0, "with lock: leave the last N layer groups trainable")


@dataclass
class ModelConfig:
    name: str = _f("EVA02-Ti-8-64", "model architecture: a built-in name (`evaclip models`), a model TOML file, or "
                  "a file name in model.model_dir", path="model")
    model_dir: str = _f("", "a folder of your own model TOML files; model.name may name one of them", path="file")
    init_temperature: float = _f(0.07, "initial softmax temperature (logit_scale = ln(1/T))")
    max_logit_scale: float = _f(100.0, "cap on exp(logit_scale) (EVA-CLIP: 100)")
    init: str = _f("", "a whole CLIP checkpoint to start from (evaclip checkpoint or open_clip export)",
                  path="file")
    use_logit_bias: bool = _f(False, "learned logit bias (SigLIP; needed by loss.kind = 'siglip')")
    init_logit_bias: float = _f(-10.0, "initial logit bias (SigLIP paper: -10)")
    trust_pickle: bool = _f(False, "let model.init / model.*.init load .pt/.bin files that hold pickled objects "
                            "(they can run code when loaded: only files you trust); default: tensors only")
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class DataConfig:
    recipe: str = _f("", "data recipe: a built-in name (merged2b, laion2b, ...) or a recipe TOML file",
                    path="recipe")
    root: str = _f("", "substituted for {root} in the recipe's shard patterns (and in eval.datasets_root)",
                  path="file")
    shards: str = _f("", "instead of a recipe: one brace pattern of tar shards (local, pipe:, or URL)",
                    path="file")
    micro_batch_size: int = _f(32, "samples per rank per micro-step")
    workers: int = _f(2, "dataloader worker processes per rank")
    shuffle_buffer: int = _f(1000, "sample shuffle buffer per worker")
    resampled: bool = _f(True, "draw shards with replacement (infinite stream; restart-safe position)")
    crop_scale: List[float] = _f([0.9, 1.0], "RandomResizedCrop scale range for training")
    max_skip_fraction: float = _f(0.1, "stop with an error when more than this fraction of samples is unusable "
                                  "(checked every step; an unreadable shard counts as the samples it should hold)")
    batch_timeout_s: float = _f(600.0, "a DataLoader worker that yields no batch for this many seconds stops the "
                                "run with a message naming it, its shards and its skip counts (0: no bound)")
    streams: int = _f(0, "logical data streams: global batch s takes a fixed share from each, whatever the number of "
                      "ranks, workers, micro-batches and accumulation steps (ranks x workers must divide into them; "
                      "0: ranks x workers of the first launch); fixed for the run, stored in its checkpoints")
    log_keys: bool = _f(False, "write the key, source and reading stream of every sample of every step to "
                        "<run>/keys/*.parquet (one row per sample, every rank, at each checkpoint): what the run saw")
    hflip: bool = _f(False, "random horizontal flip in training (MIM: on, as EVA-02; CLIP: off, captions say "
                     "left and right)")


@dataclass
class LossConfig:
    kind: str = _f("clip", "clip (softmax InfoNCE) | siglip (sigmoid)", ["clip", "siglip"])
    impl: str = _f("local", "naive (full G x G logits) | local (gather with grad, local rows) | tiled "
                   "(never materialises logits; for 100k+ batches) | ring (nothing gathered: feature blocks "
                   "pass around the ranks; memory independent of the global batch, for 1M+ batches)",
                   ["naive", "local", "tiled", "ring"])
    tile_size: int = _f(4096, "impl=tiled|ring: rows and columns per tile")


@dataclass
class ObjectiveConfig:
    kind: str = _f("clip", "clip (image-text contrastive, the [loss] section) | mim (masked image modeling of the "
                   "image tower against a frozen CLIP teacher, the [mim] section; images only)", ["clip", "mim"])


@dataclass
class MIMConfig:
    teacher: str = _f("", "objective.kind=mim: the frozen CLIP whose image tower gives the targets: an evaclip run "
                      "dir or checkpoint, an evaclip / open_clip export folder, or open_clip:<model name> (with "
                      "mim.teacher_weights)", path="file")
    teacher_weights: str = _f("", "with teacher = open_clip:<name>: its weights file (.safetensors; a .pt/.bin "
                              "needs model.trust_pickle)", path="file")
    teacher_layer: int = _f(-1, "the teacher block whose patch features are the targets (-1: the last, after its "
                            "final norm; an intermediate block's output goes through that norm too)")
    mask_ratio: float = _f(0.4, "fraction of patches masked per image (exact count, BEiT block-wise; EVA-02: 0.4)")
    min_block_patches: int = _f(4, "smallest masking block, in patches (BEiT: 16 on a 14 x 14 grid)")
    min_aspect: float = _f(0.3, "block aspect ratios are drawn log-uniformly in [min_aspect, 1 / min_aspect]")
    loss_on: str = _f("masked", "positions the loss covers: masked (EVA / EVA-02) | all", ["masked", "all"])


@dataclass
class TowerOptimConfig:
    lr: float = _f(-1.0, "learning rate of this tower (-1: optim.lr)")
    weight_decay: float = _f(-1.0, "weight decay of this tower (-1: optim.weight_decay)")
    layer_decay: float = _f(1.0, "layer-wise lr decay: lr * ld ** (num_layers + 1 - layer_id)")


@dataclass
class OptimConfig:
    name: str = _f("lamb", "lamb | adamw", ["lamb", "adamw"])
    lr: float = _f(5e-4, "peak learning rate (towers may override)")
    weight_decay: float = _f(0.05, "decoupled weight decay (not on biases, norms, pos/cls, logit_scale)")
    betas: List[float] = _f([0.9, 0.98], "Adam/LAMB betas")
    eps: float = _f(1e-6, "Adam/LAMB epsilon")
    trust_clip: List[float] = _f([0.0, 10.0], "LAMB trust-ratio clamp [min, max]")
    bias_correction: bool = _f(True, "LAMB bias correction")
    visual: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)


@dataclass
class ScheduleConfig:
    name: str = _f("cosine", "cosine | constant | const_cooldown", ["cosine", "constant", "const_cooldown"])
    warmup_steps: int = _f(0, "linear warmup steps")
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of peak (cosine)")
    cooldown_steps: int = _f(0, "const_cooldown: steps of linear decay to min lr at the end")
    unmasked_tuning_samples: int = _f(0, "last N samples with patch dropout 0 (FLIP unmasked tuning)")


@dataclass
class EngineConfig:
    kind: str = _f("torch", "torch (plain, single process or DDP-free CPU) | deepspeed", ["torch", "deepspeed"])
    precision: str = _f("fp32", "fp32 | bf16 | fp16 (fp16: dynamic loss scaling)", ["fp32", "bf16", "fp16"])
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3", [0, 1, 2, 3])
    grad_clip: float = _f(0.0, "global grad-norm clip (0 = off; EVA-CLIP: 5.0)")
    accum_steps: int = _f(1, "micro-steps per optimizer step (feature-cached, exact for contrastive loss)")
    deepspeed_overlay: str = _f("", "JSON merged over the generated DeepSpeed config: a built-in name (zero1, "
                                "zero2, zero3, offload) or a .json file", path="overlay")
    max_bad_steps: int = _f(10, "consecutive non-finite steps before the run stops")
    compile: bool = _f(False, "torch.compile the towers")


@dataclass
class SpikeConfig:
    enabled: bool = _f(False, "self-healing: on a loss spike restore the newest checkpoint from before it and skip "
                       "the data window that caused it (PaLM / OPT did this by hand)")
    window: int = _f(100, "steps in the robust loss statistic (median and MAD of the last N losses)")
    k_mad: float = _f(8.0, "a spike is a loss above median + k_mad x MAD ...")
    patience: int = _f(3, "... for this many consecutive steps")
    max_nonfinite: int = _f(3, "non-finite steps in a row that also count as a spike (below engine.max_bad_steps)")
    skip_samples: int = _f(0, "samples to skip from the spike's first step on (0: those of the steps seen while "
                           "it was being confirmed)")
    lr_scale: float = _f(1.0, "lr multiplier after a rollback ...")
    lr_scale_steps: int = _f(0, "... for this many steps from the spike's first step")
    max_rollbacks: int = _f(3, "stop the run with a message after this many rollbacks")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(1000, "save every N optimizer steps (and at the end)")
    keep_last: int = _f(3, "checkpoints kept (older ones deleted)")
    resume: str = _f("auto", "auto (newest valid checkpoint in the run dir; damaged ones are skipped) | none | "
                     "<checkpoint dir>", path="file", keywords=("auto", "none"))
    allow_changes: List[str] = _f([], "settings a resume may change (e.g. [\"data.root\"]); others must match "
                                  "the checkpoint's")
    trust_pickle: bool = _f(False, "let resume load checkpoint files that hold pickled objects (they can run "
                            "code: only checkpoints you trust)")


@dataclass
class EvalConfig:
    suite: str = _f("", "zero-shot suite run during training and at the end: a built-in name (quick, eva27, "
                   "retrieval) or a suite TOML file", path="suite")
    every_steps: int = _f(0, "evaluate every N steps (0: only at the end)")
    datasets_root: str = _f("", "folder holding the suite's datasets ({root} stands for data.root)", path="file")
    batch_size: int = _f(64, "eval batch size")
    workers: int = _f(2, "threads decoding/transforming eval images (0: inline)")


@dataclass
class LogConfig:
    every_steps: int = _f(10, "log metrics every N steps")
    tensorboard: bool = _f(True, "write tensorboard events (if tensorboard is installed)")
    wandb: bool = _f(False, "log to Weights & Biases (if installed)")
    plot: bool = _f(True, "write plots.png (loss, lr, zero-shot) into the run dir")
    progress: bool = _f(True, "progress bar on rank 0")
    sample_loss: bool = _f(False, "write each sample's contrastive loss (step, key, source, loss) to "
                           "<run>/sample_loss/*.parquet, every rank, at each checkpoint; input for `evaclip data filter`")


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mim: MIMConfig = field(default_factory=MIMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the launch environment, saved with the run."""

    world_size: int
    global_batch: int  # micro_batch_size * world_size * accum_steps
    steps: int
    warmup_steps: int
    train_samples: int  # steps * global_batch
    unmasked_from_step: int  # first step with patch dropout 0
    run_dir: str
    image_size: int = 0  # from the model file (filled by the preflight, evaclip.preflight.resolve)
    context_length: int = 0


# ---------------------------------------------------------------------------------------------------- parsing
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _read_experiment(path: str, _seen=()) -> Dict[str, Any]:
    """Raw experiment data with its paths resolved against its own folder, ``base`` chain merged."""
    data = read_toml(path)
    base = data.pop("base", None)
    data = resolve_paths(ExperimentConfig, data, os.path.dirname(os.path.abspath(path)))
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a string, got {base!r}")
        base_path = find("experiment", base, os.path.dirname(os.path.abspath(path)))
        if base_path in _seen:
            raise ConfigError(f"{path}: circular 'base' chain through {base_path}")
        data = deep_merge(_read_experiment(base_path, _seen + (base_path,)), data)
    return data


def parse_override(text: str) -> tuple:
    """``a.b.c=value`` -> (['a','b','c'], value); value parsed as TOML (numbers, booleans, lists), else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: model.name=EVA02-B-16
    return key.split("."), value


def _field_type(cls, path: List[str]):
    """Declared type of a dotted key, or None when the path is not a config field."""
    for name in path:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = _hints(cls)
        if name not in hints:
            return None
        cls = hints[name]
    return cls


def _set_path(data: Dict, path: List[str], value: Any) -> None:
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
    node[path[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> ExperimentConfig:
    """Load an experiment (a built-in name or a file; or the defaults) and apply CLI overrides, strictly.
    Relative paths in a file resolve against its folder, those in overrides against the current directory."""
    if path:
        path = find("experiment", path)
    data = _read_experiment(path) if path else {}
    for o in overrides or []:
        keys, value = parse_override(o)
        if _field_type(ExperimentConfig, keys) is str and not isinstance(value, str):
            value = o.split("=", 1)[1].strip()  # run.name=nan, model.name=1e3: strings stay strings
        one: Dict[str, Any] = {}
        _set_path(one, keys, value)
        data = deep_merge(data, resolve_paths(ExperimentConfig, one, os.getcwd()))
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(obj) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


# ---------------------------------------------------------------------------------------------------- resolve
def derive(cfg: ExperimentConfig, world_size: int = 1) -> Derived:
    """Check the values against each other and compute the derived ones once. What the config names in other
    files (the model file, the recipe, the suite, the DeepSpeed overlay) is checked by the preflight
    (``evaclip.preflight.resolve``, the entry point), which calls this."""
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


# ---------------------------------------------------------------------------------------------------- writing
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: Dict[str, Any], _prefix: str = "") -> str:
    """A small TOML writer for nested dicts of scalars and lists (what configs hold)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    chunks = ["\n".join(scalars)] if scalars else []
    for k, v in data.items():
        if isinstance(v, dict):
            sub = dumps_toml(v, f"{_prefix}{k}.")
            chunks.append(f"[{_prefix}{k}]" + ("\n" + sub if sub else ""))
    return "\n\n".join(chunks)


def save_run_config(run_dir: str, cfg: ExperimentConfig, derived: Derived, extra: Optional[Dict] = None) -> str:
    """Write ``config.resolved.toml``: the full config plus a [derived] table (and e.g. the git sha)."""
    os.makedirs(run_dir, exist_ok=True)
    data = to_dict(cfg)
    data["derived"] = dict(dataclasses.asdict(derived), **(extra or {}))
    path = os.path.join(run_dir, "config.resolved.toml")
    with atomic_write(path) as f:
        f.write("# written by evaclip: the config this run used, with values derived at launch\n")
        f.write(dumps_toml(data) + "\n")
    return path


def load_run_config(run_dir: str) -> tuple:
    """Read a run's ``config.resolved.toml`` back: (ExperimentConfig, derived dict)."""
    path = os.path.join(run_dir, "config.resolved.toml")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    derived = data.pop("derived", {})
    return from_dict(ExperimentConfig, data), derived


def describe(cls=ExperimentConfig, prefix: str = "") -> List[str]:
    """Every key with its type, default and help: the text of ``--help-config``."""
    out = []
    hints = _hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(f"[{prefix}{f.name}]")
            out += describe(tp, f"{prefix}{f.name}.")
        else:
            tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            default = getattr(inst, f.name)
            out.append(f"  {prefix}{f.name} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
    return out
