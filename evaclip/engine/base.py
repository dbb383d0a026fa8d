"""The engine contract: what the trainer may call on an engine (``Engine``), what a step reports (``StepInfo``),
and the checkpoint file layouts of both engines (known here only: ``read_weights`` reads either back).

    out = engine(image, *inputs)     forward (DeepSpeed: through its wrapper, ZeRO-3 hooks included); CLIP:
                                     (image, text[, drop_noise]), MIM: (image, mask); only image is cast
    engine.backward(loss, boundary)  accumulate gradients of ``loss`` (no division by accumulation steps:
                                     feature-cached accumulation already makes each micro-loss the big one)
    info = engine.step()             clip, optimizer step at the accumulation boundary -> StepInfo
    engine.zero_grad()               drop the gradients of a step that is skipped
    engine.save(dir) / load(dir)     engine state (weights, optimizer, loss scaler) into/from a directory; a
                                     ZeRO checkpoint of another number of ranks is re-partitioned on load
    with engine.full_weights():      the unwrapped model with full parameters (ZeRO-3 gathers them)
    engine.compiler                  ``engine.compile`` on: the ``Compiler`` the objective compiles its pieces
                                     with (the plain engine compiles its optimizer step itself in "step" mode)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Dict, Optional, Protocol

import torch

from evaclip.engine.compiling import Compiler

from evaclip import dist as edist
from evaclip.safe_load import deepspeed_loads, load_torch

TORCH_STATE = "engine_state.pt"  # TorchEngine's checkpoint file
DS_MODEL = "mp_rank_00_model_states.pt"  # DeepSpeed's module (and, without ZeRO, optimizer) state
ZERO_SHARD = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt")  # one per data-parallel rank
OPT_IN = "checkpoint.trust_pickle=true (or --trust-pickle)"


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What an optimizer step did. ``skipped``: non-finite gradients, no update (both engines, every precision);
    ``overflow``: an fp16 loss-scale calibration skip (DeepSpeed lowers the scale; normal while it calibrates)."""

    grad_norm: float
    skipped: bool = False
    overflow: bool = False


class Engine(Protocol):
    """Everything the trainer uses of an engine (``TorchEngine``, ``DeepSpeedEngine``)."""

    name: str
    model: torch.nn.Module  # the unwrapped module (its parameters; under ZeRO-3 partitioned)
    optimizer: torch.optim.Optimizer  # the client optimizer: param groups with lr, base_lr, lr_scale
    device: torch.device
    input_dtype: torch.dtype  # the dtype images must have (bf16 / fp16 models under DeepSpeed)
    shards_params: bool  # parameters partitioned across ranks (ZeRO-3): one rank cannot run the model alone
    compiler: Optional[Compiler]  # engine.compile != "off": what the objective compiles its pieces with

    def __call__(self, image: torch.Tensor, *inputs) -> Dict[str, torch.Tensor]: ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context the model trains in, for running it outside ``__call__`` (evaluation)."""

    def train(self, mode: bool = True) -> None: ...

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None: ...

    def step(self) -> StepInfo: ...

    def zero_grad(self) -> None: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str, load_optimizer: bool = True, trust_pickle: bool = False) -> None: ...

    def full_weights(self) -> contextlib.AbstractContextManager: ...


def device_kind(run_device: str) -> str:
    """``run.device`` on this machine: "cpu" or "cuda" (``auto``: cuda where there is one)."""
    return "cpu" if run_device == "cpu" or (run_device == "auto" and not torch.cuda.is_available()) else "cuda"


def pick_device(run_device: str) -> torch.device:
    if device_kind(run_device) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    _, local, _ = edist.env_world()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def saved_zero_world(ckpt_dir: str) -> int:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint's partitioned optimizer state (0: none, e.g.
    the plain engine's or DeepSpeed's without ZeRO, which load on any number of ranks)."""
    if not os.path.isdir(ckpt_dir):
        return 0
    return sum(1 for f in os.listdir(ckpt_dir) if ZERO_SHARD.fullmatch(f))


def read_weights(ckpt_dir: str, trust_pickle: bool = False, opt_in: str = OPT_IN) -> Dict[str, torch.Tensor]:
    """Full fp32 model weights from a checkpoint directory written by either engine.

    DeepSpeed ZeRO-1/2/3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32`` utilities (fp32
    master weights, not the bf16/fp16 copies); every file is loaded weights-only (``safe_load``)."""
    plain = os.path.join(ckpt_dir, TORCH_STATE)
    if os.path.exists(plain):
        sd = load_torch(plain, "checkpoint", trust_pickle, opt_in)["model"]
        return {k: v.float() for k, v in sd.items()}
    parent, tag = os.path.split(ckpt_dir.rstrip("/"))
    with deepspeed_loads(ckpt_dir, "checkpoint", trust_pickle, opt_in):
        if any(f.endswith("optim_states.pt") and "zero_pp_rank" in f for f in os.listdir(ckpt_dir)):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
        else:  # DeepSpeed without ZeRO: the module weights are in the model-states file
            sd = torch.load(os.path.join(ckpt_dir, DS_MODEL), map_location="cpu")["module"]
    return {k: v.float() for k, v in sd.items() if not k.endswith("attn_mask")}
