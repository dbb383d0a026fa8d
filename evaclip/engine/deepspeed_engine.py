"""DeepSpeed under torchrun / Slurm: ZeRO 0-3, bf16 / fp16 (dynamic loss scaling), gradient clipping, LAMB kept
exact under partitioning (``zero_lamb``), a ZeRO checkpoint re-partitioned onto another number of ranks through
DeepSpeed's universal checkpoint. The DeepSpeed config is generated from the resolved config (``deepspeed_config``)
and written into the run directory."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import types
from typing import Dict, List, Optional, Tuple

import torch

from evaclip import dist as edist
from evaclip.engine.base import TORCH_STATE, StepInfo, saved_zero_world
from evaclip.engine.compiling import Compiler
from evaclip.engine.ds_compat import load_hp_state
from evaclip.engine.zero_lamb import install_lamb_layouts
from evaclip.errors import CheckpointError, ConfigError, UserError
from evaclip.files import deep_merge, find
from evaclip.optim import Lamb
from evaclip.safe_load import deepspeed_loads


def deepspeed_config(engine_cfg, micro_batch_size: int, world_size: int) -> Dict:
    """The DeepSpeed config dict for this run (overlay JSON merged on top)."""
    prec = engine_cfg.precision
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": engine_cfg.accum_steps,
        "train_batch_size": micro_batch_size * engine_cfg.accum_steps * world_size,
        # always explicit: the default changed to 1.0 in DeepSpeed 0.19.7 (it was 0.0)
        "gradient_clipping": float(engine_cfg.grad_clip),
        "zero_optimization": {"stage": engine_cfg.zero_stage},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # our LAMB / AdamW are client optimizers (FusedLamb has no CPU kernel)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if engine_cfg.zero_stage in (1, 2):
        cfg["zero_optimization"].update({"round_robin_gradients": False})  # LAMB layouts assume group order
    if engine_cfg.deepspeed_overlay:
        with open(find("overlay", engine_cfg.deepspeed_overlay)) as f:
            cfg = deep_merge(cfg, json.load(f))
    return cfg


def for_backend(ds_cfg: Dict, backend: Optional[str]) -> Dict:
    """``ds_cfg`` adjusted to the process group's backend. On gloo (CPU), ZeRO-3 gathers parameters one blocking
    all-gather at a time (``stage3_allgather_sequential``, unless the overlay sets it): DeepSpeed's coalesced
    gather (``_allgather_params_coalesced``: ``GatheredParameters``, the persistent parameters after each step)
    launches one asynchronous all-gather per parameter and waits on the last only. On a CUDA stream that orders
    them; gloo runs them on worker threads, so an earlier gather can still be writing when the weights are read
    (a gloo script launching the tiny CLIP's gathers that way left one incomplete in about 1 round of 100)."""
    z = ds_cfg.get("zero_optimization", {})
    if backend == "gloo" and z.get("stage") == 3 and "stage3_allgather_sequential" not in z:
        ds_cfg = deep_merge(ds_cfg, {"zero_optimization": {"stage3_allgather_sequential": True}})
    return ds_cfg


DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce / allgather / prefetch bucket default (elements; its config docs)


def bucket_elements(engine_cfg, micro_batch_size: int, world_size: int) -> Tuple[int, int]:
    """DeepSpeed's communication buffers during backward, the memory peak, as the generated config and its overlay
    set them (DeepSpeed's defaults otherwise): (elements allocated whole whatever the model's size, elements of
    stage 3's prefetched parameters, at most the model). With contiguous gradients (the default) ZeRO 1-2 allocate
    a reduce bucket for the backward, two with overlap_comm (double buffering; off by default below stage 3), and
    ZeRO-3 one for the run (stage_1_and_2.py ``setup_buckets``, stage3.py "IPG"). (0, 0) without ZeRO."""
    if engine_cfg.kind != "deepspeed" or engine_cfg.zero_stage == 0:
        return 0, 0
    z = deepspeed_config(engine_cfg, micro_batch_size, world_size).get("zero_optimization", {})
    stage3 = engine_cfg.zero_stage == 3
    reduce = int(z.get("reduce_bucket_size", DEFAULT_BUCKET)) if z.get("contiguous_gradients", True) else 0
    double = not stage3 and z.get("overlap_comm", False)
    prefetch = int(z.get("stage3_prefetch_bucket_size", DEFAULT_BUCKET)) if stage3 else 0
    return reduce * (2 if double else 1), prefetch


def zero3_persistent_elements(engine_cfg, numels: List[int], world_size: int) -> int:
    """Parameter elements ZeRO-3 keeps whole on every rank: each parameter of at most
    ``stage3_param_persistence_threshold`` elements (DeepSpeed's default 1e5), in model order, while their sum stays
    within ``model_persistence_threshold`` (parameter_offload.py ``mark_persistent_parameters``)."""
    cfg = dataclasses.replace(engine_cfg, kind="deepspeed", zero_stage=3)
    z = deepspeed_config(cfg, 1, world_size).get("zero_optimization", {})
    each = int(z.get("stage3_param_persistence_threshold", 100_000))
    limit = int(z.get("stage3_model_persistence_threshold", sys.maxsize))
    total = 0
    for n in numels:
        if n <= each and total + n <= limit:
            total += n
    return total


def zero_held_grad_elements(group_numels: List[List[int]], ranks: int) -> int:
    """Gradient elements a ZeRO-1/2 rank holds at the end of backward (the optimizer's ``averaged_gradients``): the
    whole gradients of the parameters that overlap its share of each group's flat buffer; the most over ranks."""
    worst = 0
    for r in range(ranks):
        held = 0
        for numels in group_numels:
            share = -(-sum(numels) // ranks)
            lo, hi, off = r * share, (r + 1) * share, 0
            for n in numels:
                held += n if off < hi and off + n > lo else 0
                off += n
        worst = max(worst, held)
    return worst


class DeepSpeedEngine:
    """DeepSpeed under torchrun / Slurm: ZeRO 0-3, bf16 / fp16, clipping; LAMB kept exact under partitioning."""

    name = "deepspeed"

    def __init__(self, model, optimizer, engine_cfg, device: torch.device, ds_config: Dict,
                 compiler: Optional[Compiler] = None):
        check_extension_builds()
        import deepspeed

        self.cfg, self.device = engine_cfg, device
        self.client_optimizer = optimizer
        # the towers (and in "step" mode the loss) are compiled by the objective; DeepSpeed's optimizer stays eager
        self.compiler = compiler
        self._group_params = [list(g["params"]) for g in optimizer.param_groups]  # before DeepSpeed swaps them
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                config=ds_config)
        self.model = self.ds.module
        self.optimizer = optimizer  # param groups (lr, base_lr, lr_scale) live in the client optimizer
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine_cfg.precision, torch.float32)
        # under ZeRO-3 every forward gathers parameters collectively: one rank cannot run the model alone
        self.shards_params = engine_cfg.zero_stage == 3
        if isinstance(optimizer, Lamb):
            install_lamb_layouts(self.ds.optimizer, optimizer, self._group_params, engine_cfg.zero_stage, device)
        self._nonfinite = False
        self._guard_client_step()

    def _guard_client_step(self) -> None:
        """Skip the update when the gradients are not finite, for every precision and ZeRO stage.

        DeepSpeed checks this only for fp16 (and bf16 ZeRO-1/2), and its gradient norm does not show NaN
        (measured: a NaN partition gives a finite norm under fp32 ZeRO-2). So ``step`` decides from the
        gradients themselves before DeepSpeed's step (``_grads_nonfinite``, agreed by all ranks), and every
        DeepSpeed path ends in the client optimizer's ``step``, which then does nothing; DeepSpeed still
        clears its buffers and copies the (unchanged) master weights back as after any step."""
        opt, real_step = self.client_optimizer, self.client_optimizer.step

        def step(closure=None):
            if self._nonfinite:
                return None
            return real_step(closure) if closure is not None else real_step()

        opt.step = step

    def _grads_nonfinite(self) -> bool:
        """Any non-finite gradient on any rank, wherever this DeepSpeed optimizer keeps them."""
        opt, kind = self.ds_optimizer, type(self.ds_optimizer).__name__
        if kind in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"):
            return bool(opt.has_overflow(partition_gradients=getattr(opt, "partition_gradients", True)))
        if kind == "BF16_Optimizer":
            grads = list(opt.fp32_groups_gradient_flat_partition)
        else:  # no ZeRO wrapper (or fp16's, which checks itself): the module's averaged gradients
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        bad = torch.tensor([float(any(not bool(torch.isfinite(g).all()) for g in grads))], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        return bad.item() > 0

    def autocast(self):
        return contextlib.nullcontext()  # the weights themselves are in the training precision

    def __call__(self, image, *inputs):
        out = self.ds(image.to(self.input_dtype), *inputs)
        return {k: v.float() for k, v in out.items()}

    def train(self, mode: bool = True):
        self.ds.train(mode)

    def backward(self, loss, boundary: bool = True):
        self.ds.backward(loss, scale_wrt_gas=False)
        if not boundary:
            self.ds.step()  # DeepSpeed counts micro-steps in step(); it only updates at the boundary

    def step(self) -> StepInfo:
        fp16 = self.cfg.precision == "fp16"
        self._nonfinite = False if fp16 else self._grads_nonfinite()  # fp16: DeepSpeed's loss scaler decides
        try:
            self.ds.step()
        except AssertionError:  # DeepSpeed's bf16 optimizer asserts a positive norm: NaN gradients fail it
            if not self._nonfinite:
                raise
            self.ds.zero_grad()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        # fp16: DeepSpeed skips the update and lowers the loss scale on overflow (normal while it calibrates)
        overflow = fp16 and bool(getattr(self.ds_optimizer, "overflow", False))
        return StepInfo(float("nan") if self._nonfinite else norm, self._nonfinite, overflow)

    def zero_grad(self):
        self.ds.zero_grad()

    def save(self, path: str) -> None:
        parent, tag = os.path.split(path.rstrip("/"))
        self.ds.save_checkpoint(parent, tag=tag, save_latest=False)

    def load(self, path: str, load_optimizer: bool = True, trust_pickle: bool = False) -> None:
        if os.path.exists(os.path.join(path, TORCH_STATE)):
            raise CheckpointError(f"{path} was written by the plain engine (engine.kind = 'torch'); resume it with "
                                  "engine.kind = 'torch' on one process")
        parent, tag = os.path.split(path.rstrip("/"))
        saved = saved_zero_world(path)
        if load_optimizer and saved and saved != edist.world_size():
            return self._load_repartitioned(path, saved, trust_pickle)
        with deepspeed_loads(path, "checkpoint", trust_pickle):
            load_path, _ = self.ds.load_checkpoint(parent, tag=tag, load_optimizer_states=load_optimizer,
                                                   load_lr_scheduler_states=False,
                                                   load_module_only=not load_optimizer)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")

    def _load_repartitioned(self, path: str, saved: int, trust_pickle: bool) -> None:
        """Resume a ZeRO checkpoint written by ``saved`` ranks on this many: DeepSpeed refuses to re-partition
        its optimizer shards directly, so rank 0 converts the checkpoint to DeepSpeed's universal format (per
        parameter fp32 weights and optimizer moments, ``ds_to_universal``) next to it, every rank loads its new
        partition from that, and the converted copy is removed. Collective."""
        import argparse
        import io
        import shutil

        from deepspeed.checkpoint import ds_to_universal

        root, tag = os.path.split(path.rstrip("/"))
        utag = f".tmp-universal-{tag}"  # ``.tmp-`` leftovers are pruned with interrupted saves
        out = os.path.join(root, utag)
        err = None
        if edist.is_main():
            shutil.rmtree(out, ignore_errors=True)
            args = argparse.Namespace(input_folder=path, output_folder=out, num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)
            try:
                with deepspeed_loads(path, "checkpoint", trust_pickle), \
                        contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    ds_to_universal.main(args)
            except Exception as e:  # every rank stops with rank 0's reason, none waits for a conversion
                err = f"{type(e).__name__}: {e}"
        err = edist.all_gather_objects(err)[0]
        if err:
            raise RuntimeError(f"{path}: re-partitioning its ZeRO state from {saved} to {edist.world_size()} ranks "
                               f"failed in DeepSpeed's universal-checkpoint conversion ({err})")
        conf, opt = self.ds._config, self.ds_optimizer
        conf.load_universal_checkpoint = True
        if type(opt).__name__ == "DeepSpeedZeroOptimizer":
            opt.load_hp_checkpoint_state_from_checkpoint_dir = types.MethodType(load_hp_state, opt)
        try:
            with deepspeed_loads(out, "checkpoint", trust_pickle):
                load_path, _ = self.ds.load_checkpoint(root, tag=utag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        except Exception as e:  # raised here at once (the copy stays; the next save prunes it)
            raise RuntimeError(f"{path}: loading its ZeRO state re-partitioned from {saved} to {edist.world_size()} "
                               f"ranks failed on rank {edist.rank()} ({type(e).__name__}: {e})") from e
        finally:
            conf.load_universal_checkpoint = False
            opt.__dict__.pop("load_hp_checkpoint_state_from_checkpoint_dir", None)
        edist.barrier(f"loading the re-partitioned checkpoint {path}")
        if edist.is_main():
            shutil.rmtree(out, ignore_errors=True)
            pointer = os.path.join(root, "latest_universal")  # the converter's, naming the copy
            if os.path.exists(pointer) and open(pointer).read().strip() == utag:
                os.remove(pointer)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the re-partitioned checkpoint of {path}")

    @contextlib.contextmanager
    def full_weights(self):
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield self.model
        else:
            yield self.model


OVERLAY_FORBIDDEN = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


STALE_LOCK_S = 600.0  # a JIT build of DeepSpeed's ops takes ~30-60 s here; a lock this old lost its builder


def check_extension_builds(now: Optional[float] = None) -> str:
    """Where DeepSpeed JIT-builds its ops: ``TORCH_EXTENSIONS_DIR``, by default inside this Python environment
    (not the home folder's cache shared by every environment). A build killed midway leaves its ``lock`` file, on
    which every later run waits forever without a word (torch's FileBaton): such a lock, older than
    ``STALE_LOCK_S``, is an error naming it. Returns the folder."""
    import sys
    import time

    root = os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    now = time.time() if now is None else now
    for folder, _, files in os.walk(root):
        if "lock" in files:
            lock = os.path.join(folder, "lock")
            try:
                age = now - os.path.getmtime(lock)
            except OSError:
                continue  # the build just finished
            if age > STALE_LOCK_S:
                raise UserError(f"{lock} is {age / 60:.0f} minutes old: a DeepSpeed op build was killed "
                                      "midway and every run would wait on it forever; delete it (no build is "
                                      "running) and start again")
    return root


def check_overlay(value: str) -> None:
    """``engine.deepspeed_overlay`` exists, is JSON, and sets nothing the experiment decides: overlays tune
    DeepSpeed; the stage, precision, batch and clipping stay in the experiment."""
    try:
        path = find("overlay", value)
    except ConfigError as e:
        raise ConfigError(f"engine.deepspeed_overlay: {e}") from None
    try:
        with open(path) as f:
            ov = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.deepspeed_overlay: {path}: invalid JSON: {e}") from None
    bad = [k for k in OVERLAY_FORBIDDEN if k in ov]
    if "stage" in ov.get("zero_optimization", {}):
        bad.append("zero_optimization.stage")
    if bad:
        raise ConfigError(f"engine.deepspeed_overlay {path} sets {', '.join(bad)}: set these in the experiment "
                          "(engine.zero_stage, engine.precision, data.micro_batch_size, engine.grad_clip, optim.*)")
