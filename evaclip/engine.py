"""The engine seam: the only module that knows DeepSpeed.

Both engines expose the same small interface to the trainer:

    out = engine(image, *inputs)     forward (DeepSpeed: through its wrapper, ZeRO-3 hooks included); CLIP:
                                     (image, text[, drop_noise]), MIM: (image, mask); only image is cast
    engine.backward(loss, boundary)  accumulate gradients of ``loss`` (no division by accumulation steps:
                                     feature-cached accumulation already makes each micro-loss the big one)
    info = engine.step()             clip, optimizer step at the accumulation boundary -> {grad_norm, skipped,
                                     overflow}: ``skipped`` = non-finite gradients, no update (both engines, every
                                     precision); ``overflow`` = an fp16 loss-scale calibration skip
    engine.save(dir) / load(dir)     engine state (weights, optimizer, loss scaler) into/from a directory; a
                                     ZeRO checkpoint of another number of ranks is re-partitioned on load
    with engine.full_weights():      the unwrapped model with full parameters (ZeRO-3 gathers them)
    engine.input_dtype               dtype images must have (bf16/fp16 models under DeepSpeed)

``TorchEngine`` is plain PyTorch for single-process runs (CPU or one GPU); ``DeepSpeedEngine`` runs under
torchrun / Slurm with ZeRO 0-3, bf16 / fp16 (dynamic loss scaling), gradient clipping. The DeepSpeed config
is generated from the resolved config (``deepspeed_config``) and written into the run directory.
``read_weights(dir)`` reads full fp32 weights back from either engine's checkpoint directory: the file
layouts of both engines are known here only.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import types
from typing import Dict, Optional

import torch

from evaclip import dist as edist
from evaclip.errors import CheckpointError
from evaclip.files import deep_merge, find
from evaclip.optim import FlatLayout, Lamb, flat_layout
from evaclip.safe_load import deepspeed_loads, load_torch

TORCH_STATE = "engine_state.pt"  # TorchEngine's checkpoint file
_DS_MODEL = "mp_rank_00_model_states.pt"  # DeepSpeed's module (and, without ZeRO, optimizer) state
_ZERO_SHARD = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt")  # one per data-parallel rank
_OPT_IN = "checkpoint.trust_pickle=true (or --trust-pickle)"


def pick_device(run_device: str) -> torch.device:
    if run_device == "cpu" or (run_device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    _, local, _ = edist.env_world()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


class TorchEngine:
    """Plain PyTorch: one process; bf16 by autocast with fp32 weights."""

    name = "torch"
    shards_params = False  # parameters are whole on every rank

    def __init__(self, model, optimizer, engine_cfg, device: torch.device):
        if edist.world_size() > 1:
            raise RuntimeError("multi-process training needs engine.kind = 'deepspeed'")
        self.model, self.optimizer, self.cfg, self.device = model.to(device), optimizer, engine_cfg, device
        self.input_dtype = torch.float32
        self._amp = engine_cfg.precision == "bf16"

    def __call__(self, image, *inputs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            out = self.model(image, *inputs)
        return {k: v.float() for k, v in out.items()} if self._amp else out

    def train(self, mode: bool = True):
        self.model.train(mode)

    def backward(self, loss, boundary: bool = True):
        loss.backward()

    def step(self) -> Dict:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        skipped = not torch.isfinite(norm).item()
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "skipped": skipped, "overflow": False}

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   os.path.join(path, TORCH_STATE))

    def load(self, path: str, load_optimizer: bool = True, trust_pickle: bool = False) -> None:
        if not os.path.exists(os.path.join(path, TORCH_STATE)) and os.path.exists(os.path.join(path, _DS_MODEL)):
            raise CheckpointError(f"{path} was written by DeepSpeed (engine.kind = 'deepspeed'); resume it with "
                                  "engine.kind = 'deepspeed', which also runs as a single process")
        st = load_torch(os.path.join(path, TORCH_STATE), "checkpoint", trust_pickle, _OPT_IN, self.device)
        self.model.load_state_dict(st["model"])
        if load_optimizer:
            self.optimizer.load_state_dict(st["optimizer"])

    @contextlib.contextmanager
    def full_weights(self):
        yield self.model


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


class DeepSpeedEngine:
    """DeepSpeed under torchrun / Slurm: ZeRO 0-3, bf16 / fp16, clipping; LAMB kept exact under partitioning."""

    name = "deepspeed"

    def __init__(self, model, optimizer, engine_cfg, device: torch.device, ds_config: Dict):
        import deepspeed

        self.cfg, self.device = engine_cfg, device
        self.client_optimizer = optimizer
        self._group_params = [list(g["params"]) for g in optimizer.param_groups]  # before DeepSpeed swaps them
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                config=ds_config)
        self.model = self.ds.module
        self.optimizer = optimizer  # param groups (lr, base_lr, lr_scale) live in the client optimizer
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine_cfg.precision, torch.float32)
        # under ZeRO-3 every forward gathers parameters collectively: one rank cannot run the model alone
        self.shards_params = engine_cfg.zero_stage == 3
        if isinstance(optimizer, Lamb):
            self._install_lamb_layouts()
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

    # LAMB needs to know which tensor each stretch of the flat partitions it is handed belongs to
    def _install_lamb_layouts(self) -> None:
        opt, lamb = self.ds.optimizer, self.client_optimizer
        kind = type(opt).__name__
        if opt is lamb or kind == "FP16_UnfusedOptimizer":
            return  # no ZeRO: the optimizer sees real (fp32 master) tensors, one per parameter
        dist = torch.distributed
        flats = []  # (flat partition the optimizer will see, DeepSpeed's ordered params, layout)
        if kind == "DeepSpeedZeroOptimizer":  # ZeRO-1/2: padded concatenation of the group, cut in W pieces
            for i, params in enumerate(opt.round_robin_bit16_groups):
                pg = opt.real_dp_process_group[i]
                numels = [m.numel() for m in opt.round_robin_bit16_meta[i]]
                part, pid = opt.partition_size[i], dist.get_rank(group=pg)
                flats.append((opt.single_partition_of_fp32_groups[i], params,
                              flat_layout(numels, list(opt.round_robin_bit16_offsets[i]), pid * part, part, pg)))
        elif kind in ("BF16_Optimizer", "FP16_Optimizer"):  # one flat per group (BF16: sharded like ZeRO-1)
            sharded = kind == "BF16_Optimizer"
            for i, params in enumerate(opt.bf16_groups if sharded else opt.fp16_groups):
                numels = [p.numel() for p in params]
                offsets = [sum(numels[:j]) for j in range(len(numels))]
                if sharded:
                    pg = opt.real_dp_process_group[i]
                    part, pid = opt.bf16_groups_flat[i].numel() // dist.get_world_size(pg), dist.get_rank(group=pg)
                    flat = opt.fp32_groups_flat_partition[i]
                else:
                    pg, part, pid, flat = None, sum(numels), 0, opt.fp32_groups_flat[i]
                flats.append((flat, params, flat_layout(numels, offsets, pid * part, part, pg)))
        elif kind == "DeepSpeedZeroOptimizer_Stage3":  # each parameter partitioned on its own, concatenated
            for i, params in enumerate(opt.fp16_groups):
                sizes = [p.partition_numel() for p in params]
                pads = opt.groups_padding[i]
                ids, lengths = [], []
                for j, (n, pad) in enumerate(zip(sizes, pads)):
                    ids += [j, len(params)] if pad else [j]
                    lengths += [n - pad, pad] if pad else [n]
                keep = [k for k, n in enumerate(lengths) if n > 0]
                layout = FlatLayout(torch.tensor([ids[k] for k in keep]), torch.tensor([lengths[k] for k in keep]),
                                    len(params), opt.sub_group_process_groups[i])
                flats.append((opt.fp32_partitioned_groups_flat[i], params, layout))
        else:
            raise RuntimeError(f"optim.name = 'lamb' is not supported with DeepSpeed's {kind} "
                               f"(ZeRO stage {self.cfg.zero_stage}); use optim.name = 'adamw'")
        for flat, ds_params, layout in flats:
            self._check_layout(ds_params, layout)
            lamb.register_flat(flat, layout)

    def _check_layout(self, ds_params, layout) -> None:
        """DeepSpeed's parameters must be a run of one of our groups, in order, and each tensor's stretches
        must add up to its size over the data-parallel ranks: a layout change in a future DeepSpeed fails
        here at start-up instead of silently breaking LAMB's trust ratios."""
        pos = {id(p): (g, j) for g, params in enumerate(self._group_params) for j, p in enumerate(params)}
        where = [pos.get(id(p)) for p in ds_params]
        if None in where or len({g for g, _ in where}) != 1 or \
                [j for _, j in where] != list(range(where[0][1], where[0][1] + len(where))):
            raise RuntimeError("DeepSpeed reordered a parameter group; LAMB layouts need the original order")
        sizes = torch.zeros(layout.num_tensors + 1, dtype=torch.long, device=self.device)
        sizes.index_add_(0, layout.ids.to(self.device), layout.lengths.to(self.device))
        if layout.process_group is not None:
            torch.distributed.all_reduce(sizes, group=layout.process_group)
        if sizes[:-1].tolist() != [getattr(p, "ds_numel", p.numel()) for p in ds_params]:
            raise RuntimeError("LAMB layout does not match DeepSpeed's partitioning")

    def __call__(self, image, *inputs):
        out = self.ds(image.to(self.input_dtype), *inputs)
        return {k: v.float() for k, v in out.items()}

    def train(self, mode: bool = True):
        self.ds.train(mode)

    def backward(self, loss, boundary: bool = True):
        self.ds.backward(loss, scale_wrt_gas=False)
        if not boundary:
            self.ds.step()  # DeepSpeed counts micro-steps in step(); it only updates at the boundary

    def step(self) -> Dict:
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
        return {"grad_norm": float("nan") if self._nonfinite else norm, "skipped": self._nonfinite,
                "overflow": overflow}

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
        saved = _saved_zero_world(path)
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
            opt.load_hp_checkpoint_state_from_checkpoint_dir = types.MethodType(_load_hp_state, opt)
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


def _load_hp_state(self, lp_groups_name: str, checkpoint_dir: str) -> None:
    """DeepSpeed 0.19.7's ``load_hp_checkpoint_state_from_checkpoint_dir`` for ZeRO-1/2, with one fix: it takes
    a parameter group's step from the first of this rank's fragments of it and fails (IndexError) when the rank
    holds none, which happens whenever a small group (logit_scale, biases) fits in the first ranks' partitions.
    Such a rank's share of the group is padding only: nothing to restore but the group's settings."""
    from deepspeed.runtime.base_optimizer import _get_universal_checkpoint_ep_info
    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    checkpoint_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(checkpoint_dir, "optimizer_state.pt"))  # weights-only (deepspeed_loads)
    self._load_global_state(optim_sd)
    tp_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu)
    tp_world_size = 1 if self.mpu is None else self.mpu.get_tensor_model_parallel_world_size()
    ep_rank, ep_size = _get_universal_checkpoint_ep_info()
    for i, (group, saved_group) in enumerate(zip(self.optimizer.param_groups, optim_sd["param_groups"])):
        lps = [lp for lp in getattr(self, lp_groups_name)[i] if lp._hp_mapping is not None]
        keys, steps = set(), []
        for lp in lps:
            steps.append(lp.load_hp_checkpoint_state(os.path.join(checkpoint_dir, self.param_names[lp]), tp_rank,
                                                     tp_world_size, ep_rank=ep_rank, ep_size=ep_size))
            keys.update(lp._hp_mapping.get_optim_state_keys())
        if len(set(map(str, steps))) > 1:
            raise RuntimeError(f"parameter group {i}: its parameters were saved at different steps {steps}")
        hp = group["params"][0]
        if steps and steps[0] is not None:
            self.optimizer.state[hp]["step"] = steps[0]
        if lps:
            map_to_flat_opt_states(hp, getattr(self, lp_groups_name)[i], self.optimizer.state, keys)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _saved_zero_world(ckpt_dir: str) -> int:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint's partitioned optimizer state (0: none, e.g.
    the plain engine's or DeepSpeed's without ZeRO, which load on any number of ranks)."""
    if not os.path.isdir(ckpt_dir):
        return 0
    return sum(1 for f in os.listdir(ckpt_dir) if _ZERO_SHARD.fullmatch(f))


def build_engine(model, optimizer, engine_cfg, device: torch.device, micro_batch_size: int,
                 run_dir: Optional[str] = None):
    """The engine ``engine.kind`` names; writes ``ds_config.json`` into the run dir for DeepSpeed."""
    if engine_cfg.kind == "torch":
        return TorchEngine(model, optimizer, engine_cfg, device)
    ds_cfg = deepspeed_config(engine_cfg, micro_batch_size, edist.world_size())
    if run_dir and edist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "ds_config.json"), "w") as f:
            json.dump(ds_cfg, f, indent=2)
    return DeepSpeedEngine(model, optimizer, engine_cfg, device, ds_cfg)


def read_weights(ckpt_dir: str, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Full fp32 model weights from a checkpoint directory written by either engine.

    DeepSpeed ZeRO-1/2/3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32`` utilities (fp32
    master weights, not the bf16/fp16 copies); every file is loaded weights-only (``safe_load``)."""
    plain = os.path.join(ckpt_dir, TORCH_STATE)
    if os.path.exists(plain):
        sd = load_torch(plain, "checkpoint", trust_pickle, _OPT_IN)["model"]
        return {k: v.float() for k, v in sd.items()}
    parent, tag = os.path.split(ckpt_dir.rstrip("/"))
    with deepspeed_loads(ckpt_dir, "checkpoint", trust_pickle):
        if any(f.endswith("optim_states.pt") and "zero_pp_rank" in f for f in os.listdir(ckpt_dir)):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
        else:  # DeepSpeed without ZeRO: the module weights are in the model-states file
            sd = torch.load(os.path.join(ckpt_dir, _DS_MODEL), map_location="cpu")["module"]
    return {k: v.float() for k, v in sd.items() if not k.endswith("attn_mask")}
