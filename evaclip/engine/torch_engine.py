"""Plain PyTorch: one process (CPU or one GPU), bf16 by autocast with fp32 weights."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from evaclip import dist as edist
from evaclip.engine.base import DS_MODEL, OPT_IN, TORCH_STATE, StepInfo
from evaclip.engine.compiling import Compiler
from evaclip.errors import CheckpointError
from evaclip.safe_load import load_torch


class TorchEngine:
    """Plain PyTorch: one process; bf16 by autocast with fp32 weights."""

    name = "torch"
    shards_params = False  # parameters are whole on every rank

    def __init__(self, model, optimizer, engine_cfg, device: torch.device, compiler: Optional[Compiler] = None):
        if edist.world_size() > 1:
            raise RuntimeError("multi-process training needs engine.kind = 'deepspeed'")
        self.model, self.optimizer, self.cfg, self.device = model.to(device), optimizer, engine_cfg, device
        self.input_dtype = torch.float32
        self._amp = engine_cfg.precision == "bf16"
        self.compiler = compiler
        # "step": the optimizer's update compiled too (its foreach ops fused; the clip and the finite check stay
        # eager: the check decides on the host whether to step at all). dynamic=None: the lr and the step count
        # change every step, so after their first change they become symbolic inputs instead of a rebuild each
        self._compiled_step = self.compiler.function("optimizer", optimizer.step, dynamic=None) \
            if engine_cfg.compile == "step" else None

    def _optimizer_step(self) -> None:
        # the step that creates the optimizer's state (a fresh run's first) runs eagerly: traced, it would be a
        # graph of its own that no later step matches (measured: one of three optimizer graphs in 30 steps)
        if self._compiled_step is None or not self.optimizer.state:
            self.optimizer.step()
        else:
            self._compiled_step()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp)

    def __call__(self, image, *inputs):
        with self.autocast():
            out = self.model(image, *inputs)
        return {k: v.float() for k, v in out.items()} if self._amp else out

    def train(self, mode: bool = True):
        self.model.train(mode)

    def backward(self, loss, boundary: bool = True):
        loss.backward()

    def step(self) -> StepInfo:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        skipped = not torch.isfinite(norm).item()
        if not skipped:
            self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(float(norm), skipped)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   os.path.join(path, TORCH_STATE))

    def load(self, path: str, load_optimizer: bool = True, trust_pickle: bool = False) -> None:
        if not os.path.exists(os.path.join(path, TORCH_STATE)) and os.path.exists(os.path.join(path, DS_MODEL)):
            raise CheckpointError(f"{path} was written by DeepSpeed (engine.kind = 'deepspeed'); resume it with "
                                  "engine.kind = 'deepspeed', which also runs as a single process")
        st = load_torch(os.path.join(path, TORCH_STATE), "checkpoint", trust_pickle, OPT_IN, self.device)
        self.model.load_state_dict(st["model"])
        if load_optimizer:
            self.optimizer.load_state_dict(st["optimizer"])

    @contextlib.contextmanager
    def full_weights(self):
        yield self.model
