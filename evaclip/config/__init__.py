"""One typed, strict experiment config: a dataclass per component, loaded from TOML, overridden by dotted keys.

    cfg = load_config("launch/experiments/demo_cpu.toml", ["optim.visual.lr=3e-4", "model.vision.patch_dropout=0.5"])
    derived = evaclip.preflight.resolve(cfg, world_size=8)  # files checked; global batch, steps ... computed once
    save_run_config(run_dir, cfg, derived)                  # written into the run directory

Strictness: an unknown key, a wrong type or a bad value raises ``ConfigError`` naming the dotted key and
(for unknown keys) the valid ones. Components receive their own section (``cfg.optim``, ``cfg.data`` ...),
never the root. An experiment file may start from another with ``base = "other.toml"`` (deep-merged).
``schema`` holds the sections, ``loading`` reading, overrides and writing, ``derive`` the value checks and the
derived values.
"""
from evaclip.config.derive import derive
from evaclip.config.loading import (describe, dumps_toml, load_config, load_run_config, parse_override,
                                    save_run_config, to_dict)
from evaclip.config.schema import (CheckpointConfig, DataConfig, Derived, EngineConfig, EvalConfig, ExperimentConfig,
                                   CocaConfig, DistillConfig, LogConfig, LossConfig, MIMConfig, ModelConfig, ObjectiveConfig, OptimConfig,
                                   RunConfig, ScheduleConfig, SpikeConfig, TextConfig, TowerOptimConfig,
                                   VisionConfig)
from evaclip.files import ConfigError

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "Derived", "EngineConfig", "EvalConfig",
           "CocaConfig", "DistillConfig", "ExperimentConfig", "LogConfig", "LossConfig", "MIMConfig", "ModelConfig", "ObjectiveConfig",
           "OptimConfig", "RunConfig", "ScheduleConfig", "SpikeConfig", "TextConfig", "TowerOptimConfig",
           "VisionConfig", "derive", "describe", "dumps_toml", "load_config", "load_run_config", "parse_override",
           "save_run_config", "to_dict"]
