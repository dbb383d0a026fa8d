"""The engine seam: the only package that knows DeepSpeed (its file names included).

``base`` holds the contract (``Engine``, ``StepInfo``), the checkpoint file layouts and ``read_weights``;
``torch_engine`` is plain PyTorch for one process; ``deepspeed_engine`` runs ZeRO 0-3 under torchrun / Slurm with
``zero_lamb`` (LAMB exact across ZeRO partitions) and ``ds_compat`` (work-arounds for the pinned DeepSpeed).
``build_engine`` picks one by ``engine.kind``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from evaclip import dist as edist
from evaclip.engine.base import Engine, StepInfo, device_kind, pick_device, read_weights
from evaclip.engine.compiling import Compiler
from evaclip.engine.deepspeed_engine import (DeepSpeedEngine, bucket_elements, check_overlay, deepspeed_config,
                                             for_backend, zero3_persistent_elements, zero_held_grad_elements)
from evaclip.engine.torch_engine import TorchEngine

__all__ = ["Engine", "StepInfo", "bucket_elements", "build_engine", "check_overlay", "deepspeed_config", "device_kind",
           "for_backend", "pick_device", "read_weights", "run_deepspeed_config", "zero3_persistent_elements",
           "zero_held_grad_elements"]


def run_deepspeed_config(engine_cfg, micro_batch_size: int, world_size: int, backend: Optional[str]) -> Dict:
    """The DeepSpeed config a run uses and writes (``ds_config.json``): the generated one, adjusted to the run's
    process-group backend (``for_backend``)."""
    return for_backend(deepspeed_config(engine_cfg, micro_batch_size, world_size), backend)


def build_engine(model, optimizer, engine_cfg, device: torch.device, micro_batch_size: int,
                 run_dir: Optional[str] = None) -> Engine:
    """The engine ``engine.kind`` names, with a ``Compiler`` when ``engine.compile`` is on; writes
    ``ds_config.json`` into the run dir for DeepSpeed."""
    compiler = Compiler(engine_cfg.compile_backend) if engine_cfg.compile != "off" else None
    if engine_cfg.kind == "torch":
        return TorchEngine(model, optimizer, engine_cfg, device, compiler)
    ds_cfg = run_deepspeed_config(engine_cfg, micro_batch_size, edist.world_size(), edist.backend())
    if run_dir and edist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "ds_config.json"), "w") as f:
            json.dump(ds_cfg, f, indent=2)
    return DeepSpeedEngine(model, optimizer, engine_cfg, device, ds_cfg, compiler)
