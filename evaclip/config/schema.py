"""The experiment schema: a dataclass per component, every field documented (``evaclip train --help-config``),
its type, default and allowed values; ``Derived``: the values computed once from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional




def _f(default, help: str, choices=None, path: Optional[str] = None, keywords: tuple = (), aliases: tuple = (),
       **bounds):
    """A documented field (``evaclip train --help-config`` prints the help). ``path``: the field holds a path
    (or, for an asset kind, a built-in name) resolved by the rule in ``evaclip.files``. ``bounds``: its range
    (gt / ge / lt / le; ``unset``: a sentinel also allowed), checked on load with every number finite: one
    validation for --dry-run and the start alike, and no NaN that compares false and turns a guard off."""
    md = {"help": help}
    if choices:
        md["choices"] = tuple(choices)
    if bounds:
        md["bounds"] = bounds
    if aliases:  # (old value, what it means now): e.g. an old boolean form of a setting that grew modes
        md["aliases"] = tuple(aliases)
    if path:
        md["path"], md["keywords"] = path, tuple(keywords)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class RunConfig:
    name: str = _f("run", "run name; the run directory is <output_dir>/<name>")
    output_dir: str = _f("runs", "parent folder of run directories")
    seed: int = _f(0, "global seed (model init, data order, patch dropout)")
    train_samples: int = _f(0, "samples to train on; steps = ceil(train_samples / global batch) (or set steps)", ge=0)
    steps: int = _f(0, "optimizer steps to train (overrides train_samples when > 0)", ge=0)
    device: str = _f("auto", "auto | cpu | cuda", ["auto", "cpu", "cuda"])
    collective_timeout_s: float = _f(1800.0, "bound on the barriers after rank-local work (evaluation on rank 0, "
                                     "checkpoints, the end of the run): a rank that does not arrive stops the "
                                     "others with a message naming it", gt=0)


@dataclass
class VisionConfig:
    patch_dropout: float = _f(0.0, "FLIP token dropping rate during training (EVA-CLIP E/g+: 0.5)", ge=0, lt=1)
    attn_impl: str = _f("sdpa", "attention kernel", ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                                                      "sdpa_cudnn", "flash_attn", "math"])
    grad_checkpointing: bool = _f(False, "activation checkpointing per block")
    init: str = _f("", "EVA / EVA-02 MIM checkpoint to start from (original EVA or timm layout)", path="file")
    lock: bool = _f(False, "freeze the image tower")
    unlocked_layers: int = _f(0, "with lock: leave the last N layer groups trainable", ge=0)


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
    unlocked_layers: int = _f(0, "with lock: leave the last N layer groups trainable", ge=0)


@dataclass
class ModelConfig:
    name: str = _f("EVA02-Ti-8-64", "model architecture: a built-in name (`evaclip models`), a model TOML file, or "
                  "a file name in model.model_dir", path="model")
    model_dir: str = _f("", "a folder of your own model TOML files; model.name may name one of them", path="file")
    init_temperature: float = _f(0.07, "initial softmax temperature (logit_scale = ln(1/T))", gt=0)
    max_logit_scale: float = _f(100.0, "cap on exp(logit_scale) (EVA-CLIP: 100)", gt=0)
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
    micro_batch_size: int = _f(32, "samples per rank per micro-step", ge=1)
    workers: int = _f(2, "dataloader worker processes per rank", ge=0)
    shuffle_buffer: int = _f(1000, "sample shuffle buffer per worker", ge=1)
    resampled: bool = _f(True, "draw shards with replacement (infinite stream; restart-safe position)")
    crop_scale: List[float] = _f([0.9, 1.0], "RandomResizedCrop scale range for training", gt=0, le=1)
    max_skip_fraction: float = _f(0.1, "stop with an error when more than this fraction of samples is unusable "
                                  "(checked every step; an unreadable shard counts as the samples it should hold)",
                                  ge=0, le=1)
    batch_timeout_s: float = _f(600.0, "a DataLoader worker that yields no batch for this many seconds stops the "
                                "run with a message naming it, its shards and its skip counts (0: no bound)", ge=0)
    streams: int = _f(0, "logical data streams: global batch s takes a fixed share from each, whatever the number of "
                      "ranks, workers, micro-batches and accumulation steps (ranks x workers must divide into them; "
                      "0: ranks x workers of the first launch); fixed for the run, stored in its checkpoints", ge=0)
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
    tile_size: int = _f(4096, "impl=tiled|ring: rows and columns per tile", ge=1)


@dataclass
class ObjectiveConfig:
    kind: str = _f("clip", "clip (image-text contrastive, the [loss] section) | mim (masked image modeling of the "
                   "image tower against a frozen CLIP teacher, the [mim] section; images only) | distill (clip plus "
                   "distillation from a frozen teacher CLIP, the [distill] section) | coca (clip plus a caption decoder: "
                   "CoCa, the [coca] section)", ["clip", "mim", "distill", "coca"])


@dataclass
class DistillConfig:
    teacher: str = _f("", "objective.kind=distill: the frozen teacher CLIP: an evaclip run dir or checkpoint, an "
                      "open_clip export folder, or open_clip:<model name> (with distill.teacher_weights); read "
                      "weights-only (with source = shards: only its identity is compared)", path="file")
    teacher_weights: str = _f("", "with teacher = open_clip:<name>: its weights file (.safetensors)", path="file")
    source: str = _f("online", "where the teacher's embeddings come from: online (its forward every step, on the "
                     "step's crops; a reinforced shard's stored crops are used when present) | shards (those "
                     "`evaclip data reinforce` stored: no teacher forward; distill.teacher, when set, must be the "
                     "teacher the shards record)", ["online", "shards"])
    loss: str = _f("soft_ce", "soft_ce (cross-entropy of the student's similarity distribution over the global "
                   "batch to the teacher's, both directions: open_clip's distillation) | cosine | mse (each "
                   "sample's embeddings regressed to the teacher's, through a learned linear head when the widths differ)",
                   ["soft_ce", "cosine", "mse"])
    teacher_width: int = _f(0, "cosine / mse with source = shards: the width of the teacher embeddings the shards "
                            "hold (0: the student's; online it is read from the teacher); another width than the "
                            "student's adds a learned linear head into the teacher's space", ge=0)
    weight: float = _f(1.0, "weight of the distillation term", gt=0)
    clip_weight: float = _f(1.0, "weight of the contrastive loss on the true pairs beside it (0: distillation "
                            "alone)", ge=0)
    temperature: float = _f(0.0, "soft_ce: the teacher's logits are its similarities / temperature (0: times "
                            "the teacher's own learned logit scale)", ge=0)


@dataclass
class CocaConfig:
    decoder_layers: int = _f(2, "objective.kind=coca: blocks of the multimodal decoder (each causal self-attention "
                             "then cross-attention to the image; the text tower's width and heads)", ge=1)
    n_queries: int = _f(32, "learned queries of the attentional pooler that gives the decoder its image context "
                        "(CoCa: 256)", ge=1)
    caption_weight: float = _f(2.0, "weight of the caption cross-entropy (CoCa: 2)", ge=0)
    clip_weight: float = _f(1.0, "weight of the contrastive loss (CoCa: 1)", ge=0)
    label_smoothing: float = _f(0.1, "label smoothing of the caption cross-entropy (CoCa: 0.1)", ge=0, lt=1)
    ce_chunk: int = _f(1024, "tokens whose vocabulary logits are computed at once in the caption loss (its memory: "
                       "ce_chunk x vocabulary floats, never tokens x vocabulary)", ge=1)


@dataclass
class MIMConfig:
    teacher: str = _f("", "objective.kind=mim: the frozen CLIP whose image tower gives the targets: an evaclip run "
                      "dir or checkpoint, an evaclip / open_clip export folder, or open_clip:<model name> (with "
                      "mim.teacher_weights)", path="file")
    teacher_weights: str = _f("", "with teacher = open_clip:<name>: its weights file (.safetensors; a .pt/.bin "
                              "needs model.trust_pickle)", path="file")
    teacher_layer: int = _f(-1, "the teacher block whose patch features are the targets (-1: the last, after its "
                            "final norm; an intermediate block's output goes through that norm too)")
    mask_ratio: float = _f(0.4, "fraction of patches masked per image (exact count, BEiT block-wise; EVA-02: 0.4)",
                            gt=0, lt=1)
    min_block_patches: int = _f(4, "smallest masking block, in patches (BEiT: 16 on a 14 x 14 grid)", ge=1)
    min_aspect: float = _f(0.3, "block aspect ratios are drawn log-uniformly in [min_aspect, 1 / min_aspect]",
                            gt=0, le=1)
    loss_on: str = _f("masked", "positions the loss covers: masked (EVA / EVA-02) | all", ["masked", "all"])


@dataclass
class TowerOptimConfig:
    lr: float = _f(-1.0, "learning rate of this tower (-1: optim.lr)", gt=0, unset=-1.0)
    weight_decay: float = _f(-1.0, "weight decay of this tower (-1: optim.weight_decay)", ge=0, unset=-1.0)
    layer_decay: float = _f(1.0, "layer-wise lr decay: lr * ld ** (num_layers + 1 - layer_id)", gt=0, le=1)


@dataclass
class OptimConfig:
    name: str = _f("lamb", "lamb | adamw", ["lamb", "adamw"])
    lr: float = _f(5e-4, "peak learning rate (towers may override)", gt=0)
    weight_decay: float = _f(0.05, "decoupled weight decay (not on biases, norms, pos/cls, logit_scale)", ge=0)
    betas: List[float] = _f([0.9, 0.98], "Adam/LAMB betas", ge=0, lt=1)
    eps: float = _f(1e-6, "Adam/LAMB epsilon", gt=0)
    trust_clip: List[float] = _f([0.0, 10.0], "LAMB trust-ratio clamp [min, max]", ge=0)
    bias_correction: bool = _f(True, "LAMB bias correction")
    visual: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)


@dataclass
class ScheduleConfig:
    name: str = _f("cosine", "cosine | constant | const_cooldown", ["cosine", "constant", "const_cooldown"])
    warmup_steps: int = _f(0, "linear warmup steps", ge=0)
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of peak (cosine)", ge=0, le=1)
    cooldown_steps: int = _f(0, "const_cooldown: steps of linear decay to min lr at the end", ge=0)
    unmasked_tuning_samples: int = _f(0, "last N samples with patch dropout 0 (FLIP unmasked tuning)", ge=0)


@dataclass
class EngineConfig:
    kind: str = _f("torch", "torch (plain, single process or DDP-free CPU) | deepspeed", ["torch", "deepspeed"])
    precision: str = _f("fp32", "fp32 | bf16 | fp16 (fp16: dynamic loss scaling)", ["fp32", "bf16", "fp16"])
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3", [0, 1, 2, 3])
    grad_clip: float = _f(0.0, "global grad-norm clip (0 = off; EVA-CLIP: 5.0)", ge=0)
    accum_steps: int = _f(1, "micro-steps per optimizer step (feature-cached, exact for contrastive loss)", ge=1)
    deepspeed_overlay: str = _f("", "JSON merged over the generated DeepSpeed config: a built-in name (zero1, "
                                "zero2, zero3, offload) or a .json file", path="overlay")
    max_bad_steps: int = _f(10, "consecutive non-finite steps before the run stops", ge=1)
    compile: str = _f("off", "torch.compile: off | towers (each tower, one graph: fullgraph) | step (the towers, "
                      "the loss for naive / local, and the plain engine's optimizer step); true / false mean towers / "
                      "off", ["off", "towers", "step"],
                      aliases=((True, "towers"), (False, "off"), ("true", "towers"), ("false", "off")))
    compile_backend: str = _f("inductor", "torch.compile backend: inductor (generated kernels, CPU and GPU) | "
                              "aot_eager (traced, no code generation: for checking graphs) | eager",
                              ["inductor", "aot_eager", "eager"])


@dataclass
class SpikeConfig:
    enabled: bool = _f(False, "self-healing: on a loss spike restore the newest checkpoint from before it and skip "
                       "the data window that caused it (PaLM / OPT did this by hand)")
    window: int = _f(100, "steps in the robust loss statistic (median and MAD of the last N losses)", ge=5)
    k_mad: float = _f(8.0, "a spike is a loss above median + k_mad x MAD ...", gt=0)
    patience: int = _f(3, "... for this many consecutive steps", ge=1)
    max_nonfinite: int = _f(3, "non-finite steps in a row that also count as a spike (below engine.max_bad_steps)",
                        ge=1)
    skip_samples: int = _f(0, "samples to skip from the spike's first step on (0: those of the steps seen while "
                           "it was being confirmed)", ge=0)
    lr_scale: float = _f(1.0, "lr multiplier after a rollback ...", gt=0)
    lr_scale_steps: int = _f(0, "... for this many steps from the spike's first step", ge=0)
    max_rollbacks: int = _f(3, "stop the run with a message after this many rollbacks", ge=1)


@dataclass
class CheckpointConfig:
    every_steps: int = _f(1000, "save every N optimizer steps (and at the end)", ge=1)
    keep_last: int = _f(3, "checkpoints kept (older ones deleted)", ge=1)
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
    every_steps: int = _f(0, "evaluate every N steps (0: only at the end)", ge=0)
    datasets_root: str = _f("", "folder holding the suite's datasets ({root} stands for data.root)", path="file")
    batch_size: int = _f(64, "eval batch size", ge=1)
    workers: int = _f(2, "threads decoding/transforming eval images (0: inline)", ge=0)


@dataclass
class LogConfig:
    every_steps: int = _f(10, "log metrics every N steps", ge=1)
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    coca: CocaConfig = field(default_factory=CocaConfig)
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
