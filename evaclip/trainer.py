"""The Trainer: one explicit build order, a short step loop, resumable state.

Build order: distributed -> seed -> objective and its model (+ weight init) -> optimizer -> resume settings
check -> engine -> schedule -> checkpoint (resume) -> data -> evaluator -> logger. ``train()`` runs steps (not
epochs) until ``derived.steps``.

One optimizer step = ``engine.accum_steps`` micro-batches, whose forward and backward passes are the objective's
(``evaclip.objectives``: CLIP with feature-cached accumulation, MIM); the trainer owns the engine step, skipped
steps, logging, evaluation, checkpoints, preemption and loss-spike rollback.
"""
from __future__ import annotations

import math
import os
import subprocess
import time
import zlib
from typing import Dict, List, Optional

import torch

from evaclip import dist as edist
from evaclip.checkpoint import (candidates, load_checkpoint, read_meta, resume_candidates, rng_state,
                                rank_states, save_checkpoint, set_rng_state)
from evaclip.config import Derived, ExperimentConfig, save_run_config, to_dict
from evaclip.engine import build_engine, pick_device
from evaclip.errors import ConfigError, TrainingStopped
from evaclip.metrics import KeyLog, MetricLogger, SampleLossLog, plot_run, progress_bar
from evaclip.models import create_model, get_variant, model_record
from evaclip.models.convert import init_from_files
from evaclip.objectives import build_objective
from evaclip.preemption import REQUEUE_EXIT_CODE, StopRequests
from evaclip.resume import check_resume_settings, resume_settings, same_ranks_only
from evaclip.optim import build_optimizer
from evaclip.schedule import LrScheduler, patch_dropout_at
from evaclip.spike import SpikeDetector



def _meta_step(path: str) -> Optional[int]:
    try:
        return read_meta(path)["step"]
    except (OSError, ValueError, KeyError):
        return None


def _original_error(e: Exception, bound: float) -> str:
    """The first line of a DataLoader worker's error (the loader wraps it in traceback text)."""
    msg = str(e)
    if "DataLoader timed out" in msg:
        return (f"no batch within {2 * bound + 30:g} s (the loader's bound, data.batch_timeout_s = {bound:g}): a "
                "worker is blocked reading a shard")
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return msg.splitlines()[0] if msg else type(e).__name__


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    def __init__(self, cfg: ExperimentConfig, derived: Derived, log=print):
        self.cfg, self.derived = cfg, derived
        self.run_dir = derived.run_dir
        # 1. distributed (first: which rank logs is known only once the process group is up)
        self.device = pick_device(cfg.run.device)
        edist.init_distributed(self.device, collective_timeout_s=cfg.run.collective_timeout_s)
        self.log = log if edist.is_main() else (lambda *a, **k: None)
        if edist.world_size() != derived.world_size:
            raise RuntimeError(f"resolved for {derived.world_size} processes but running with {edist.world_size()}")
        # 2. seed (same model init on every rank; data and dropout streams differ per rank below)
        torch.manual_seed(cfg.run.seed)
        # 3. the objective and its model (MIM: its frozen teacher too)
        self.variant = get_variant(cfg.model.name, cfg.model.model_dir)
        self.objective = build_objective(cfg, self.variant, self.device, self.log)
        model = self.objective.build_model()
        report = init_from_files(model, cfg.model)  # refuses pickles and inits that load nothing
        if report:
            self.log(report)
        if cfg.model.vision.lock:
            model.lock_tower("visual", cfg.model.vision.unlocked_layers)
        if cfg.model.text.lock:
            model.lock_tower("text", cfg.model.text.unlocked_layers)
        # 4. optimizer, 5. engine, 6. schedule
        optimizer = build_optimizer(model, cfg.optim)
        # a resume must keep the settings its checkpoint was written with: checked before anything is written
        resume = resume_candidates(cfg.checkpoint.resume, self.run_dir)
        saved, saved_in = None, None
        for c in resume:  # the newest checkpoint whose meta can be read (damaged ones are reported at load)
            try:
                saved, saved_in = read_meta(c).get("settings", {}), c
            except (OSError, ValueError):
                continue
            break
        self.num_streams = self._data_streams(saved)
        self.settings = dict(resume_settings(cfg, edist.world_size()), **{"data.num_streams": self.num_streams})
        if saved is not None:
            check_resume_settings(saved, self.settings, cfg.checkpoint.allow_changes, saved_in)
        if edist.is_main():
            save_run_config(self.run_dir, cfg, derived, {"git_sha": git_sha(), "world_size": edist.world_size()})
        self.engine = build_engine(model, optimizer, cfg.engine, self.device, cfg.data.micro_batch_size, self.run_dir)
        self.model = self.engine.model
        if cfg.engine.compile:
            self.model.visual.compile()
            if self.objective.uses_text:
                self.model.text.compile()
        self.scheduler = LrScheduler(optimizer, derived.steps, derived.warmup_steps, cfg.schedule.name,
                                     cfg.schedule.min_lr_ratio, cfg.schedule.cooldown_steps)
        torch.manual_seed(cfg.run.seed * 1000 + edist.rank())  # per-rank dropout / patch-drop stream
        # 8. data
        self.step, self.samples_seen, self.bad_steps, self.overflows = 0, 0, 0, 0
        # self-healing (evaclip.spike): detector, rollbacks so far, data windows to skip, lr scaled for a while
        self.spike = SpikeDetector(cfg.spike.window, cfg.spike.k_mad, cfg.spike.patience) if cfg.spike.enabled else None
        self.rollbacks: List[Dict] = []
        self.skip_windows: Dict[int, int] = {}  # step -> samples to skip when the run gets there
        self.lr_window = [0, 0, 1.0]  # [from step, until step, lr multiplier]
        self._rollback_from: Optional[int] = None
        self.order_hash = 0  # running CRC of the sample keys consumed: the data order, comparable across runs
        self.data_states: Optional[Dict] = None
        # 9. checkpoint: resume before building the data iterator (it starts at the saved position)
        if resume:
            ckpt, meta, rank_state = load_checkpoint(self.engine, resume, cfg.checkpoint.trust_pickle, self.log)
            self.step, self.samples_seen = meta["step"], meta["samples_seen"]
            self._restore_rank_state(ckpt, meta, rank_state)
            self._restore_healing(meta)
            w = meta.get("world_size")
            elastic = "" if rank_state is not None else f", written by {w} rank{'s' if w != 1 else ''}"
            self.log(f"resumed from {ckpt} at step {self.step} ({self.samples_seen} samples{elastic})")
        self._build_data()
        r, w = edist.rank(), edist.world_size()
        self.sample_log = SampleLossLog(self.run_dir, r, self.step, w) if cfg.log.sample_loss else None
        self.key_log = KeyLog(self.run_dir, r, self.step, w) if cfg.data.log_keys else None
        # 10. evaluator, 11. logger
        self.eval_entries = None
        if cfg.eval.suite:
            from evaclip.evalsuite import load_suite

            self.eval_entries = load_suite(cfg.eval.suite)
        self.logger = MetricLogger(self.run_dir, cfg.log, enabled=edist.is_main(), run_name=cfg.run.name,
                                   config=to_dict(cfg))
        self.stops = StopRequests(self.run_dir, self.log)

    def _restore_rank_state(self, ckpt: str, meta: Dict, rank_state: Optional[Dict]) -> None:
        """This rank's data position, RNG and order hash from a checkpoint. One written by another number of
        ranks (``rank_state`` None; the engine has re-partitioned its own state) gives each rank the saved
        positions of the logical streams it now owns: the data continue exactly. Its RNG is seeded from
        (seed, rank, step): augmentation and token dropping do not use it (they are seeded per sample), only
        in-model randomness such as dropout does, which thus differs from the uninterrupted run."""
        if rank_state is None:
            saved = meta["world_size"]
            if not self.num_streams:
                raise same_ranks_only(ckpt, saved)
            states = rank_states(ckpt, saved, self.cfg.checkpoint.trust_pickle)
            mine = set(range(edist.rank(), self.num_streams, edist.world_size()))
            data = {int(k): v for st in states for k, v in st["data"].items() if int(k) in mine}
            order = states[edist.rank()].get("order_hash", 0) if edist.rank() < saved else 0
            rank_state = {"data": data, "order_hash": order, "rng": None}
            torch.manual_seed((self.cfg.run.seed * 1000 + edist.rank()) * 1_000_003 + self.step)
        self.data_states, self.order_hash = rank_state["data"], rank_state.get("order_hash", 0)
        if rank_state["rng"] is not None:
            set_rng_state(rank_state["rng"])

    def _data_streams(self, saved: Optional[Dict]) -> int:
        """The run's logical data streams: data.streams, else the checkpoint's, else ranks x workers now (0:
        a checkpoint from before logical streams, which resumes with per-worker streams)."""
        from evaclip.data.wds import check_streams

        c, w = self.cfg.data, edist.world_size()
        if saved is not None and "data.num_streams" not in saved:
            return 0
        n = c.streams or (saved or {}).get("data.num_streams") or w * max(1, c.workers)
        why = check_streams(n, self.derived.global_batch, w, max(1, c.workers))
        if why:
            raise ConfigError(f"the run's {n} logical data streams cannot serve {w} ranks x {max(1, c.workers)} "
                              f"data.workers: {why}; change data.workers (the streams are fixed for the run)")
        return n

    # ------------------------------------------------------------------------------------------------ data
    def _build_data(self):
        from evaclip.data.recipes import load_recipe, recipe_from_shards
        from evaclip.data.transforms import draft_side, make_tokenizer, train_transform
        from evaclip.data.wds import DataState, ImageTextStream, build_stream_spec, make_loader

        c = self.cfg.data
        recipe = load_recipe(c.recipe) if c.recipe else recipe_from_shards(c.shards)
        spec = build_stream_spec(recipe, c.root, self.cfg.run.seed, edist.rank(), edist.world_size(),
                                 c.resampled, c.shuffle_buffer, batch_timeout_s=c.batch_timeout_s,
                                 num_streams=self.num_streams, step_samples=self.derived.global_batch)
        v = self.variant
        transform = train_transform(v.image_size, v.mean, v.std, c.crop_scale, v.interpolation, c.hflip)
        tokenizer = make_tokenizer(v.context_length, self.cfg.model.text.kind, self.cfg.model.text.hf_path) \
            if self.objective.uses_text else None  # MIM: images only
        stream = ImageTextStream(spec, c.micro_batch_size, transform, tokenizer,
                                 min_side=draft_side(v.image_size, c.crop_scale[0]))
        stream.set_state(self.data_states)
        self.data_state = DataState(self.data_states)
        self.loader = make_loader(stream, c.workers, pin_memory=self.device.type == "cuda")
        self.data_iter = iter(self.loader)

    def _next_batch(self):
        try:
            batch = next(self.data_iter)
        except TrainingStopped:
            raise
        except Exception as e:  # noqa: BLE001 - a worker's error arrives wrapped in the loader's traceback text
            raise TrainingStopped(f"data (rank {edist.rank()}): {_original_error(e, self.cfg.data.batch_timeout_s)}") from None
        state = batch.pop("__state__")
        self.data_state.update(state)
        self.order_hash = zlib.crc32(",".join(batch["key"]).encode(), self.order_hash)
        ids = batch.pop("stream_id", None)
        batch["stream"] = [f"stream{i}" for i in ids] if ids is not None else \
            [f"rank{edist.rank()}/worker{state['worker']}"] * len(batch["key"])
        return batch

    def _next_step(self) -> List[Dict]:
        """The micro-batches of one optimizer step. Logical streams: one piece from each DataLoader worker (in
        the loader's worker order) joined into this rank's share of the global batch, cut into accum_steps
        micro-batches; per-worker streams: accum_steps loader batches."""
        accum = self.cfg.engine.accum_steps
        if not self.num_streams:
            return [self._next_batch() for _ in range(accum)]
        pieces = [self._next_batch() for _ in range(max(1, self.cfg.data.workers))]
        whole = {k: torch.cat([p[k] for p in pieces]) if torch.is_tensor(pieces[0][k]) else
                 [x for p in pieces for x in p[k]] for k in pieces[0]}
        m = self.cfg.data.micro_batch_size
        return [{k: v[j * m:(j + 1) * m] for k, v in whole.items()} for j in range(accum)]

    # ------------------------------------------------------------------------------------------------ step
    def train_step(self, micro: List[Dict]) -> Dict:
        """The objective's forward/backward over the micro-batches of one optimizer step, then the engine step."""
        fwd = self.objective.forward_backward(self.engine, micro, self.step)
        if not fwd.finite:
            return self._bad_step(fwd.loss)
        info, skipped = self._engine_step(fwd.loss)
        if skipped is not None:
            return skipped
        if self.sample_log is not None and fwd.sample_losses is not None:
            self.sample_log.add(self.step + 1, [k for m in micro for k in m["key"]],
                                [s for m in micro for s in m["source"]], fwd.sample_losses)
        # each rank's local loss covers its rows; the global loss is their mean
        mean_loss = edist.all_reduce_sum(fwd.loss.clone().reshape(1)) / edist.world_size()
        return {"train/loss": mean_loss.item(), **fwd.metrics, "train/grad_norm": info.grad_norm}

    def _engine_step(self, loss) -> tuple:
        """The engine's step after the backward passes: (info, None), or (info, the metrics of a step that
        made no update: non-finite gradients, or an fp16 loss-scale calibration skip)."""
        info = self.engine.step()
        if info.skipped:
            return info, self._bad_step(loss, info)
        self.bad_steps = 0
        if info.overflow:
            return info, self._fp16_overflow()
        self.overflows = 0
        return info, None

    def _fp16_overflow(self) -> Dict:
        """fp16 loss-scale calibration: counted, stops only if it never recovers."""
        self.overflows += 1
        if self.overflows >= 100:
            raise TrainingStopped(f"fp16 loss scaling overflowed on {self.overflows} consecutive steps at step "
                                  f"{self.step}; use engine.precision = 'bf16' or lower the lr")
        return {"train/overflow_skip": 1.0}

    def _bad_step(self, loss, info=None) -> Dict:
        self.engine.zero_grad()
        self.bad_steps += 1
        if self.spike is not None and self.bad_steps >= self.cfg.spike.max_nonfinite:
            self._rollback_from = self.step - self.bad_steps + 1  # the first of the non-finite steps
        self.log(f"step {self.step}: non-finite {'loss' if info is None else 'gradients'} "
                 f"({float(loss.detach()):.4g}); step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.engine.max_bad_steps:
            raise TrainingStopped(f"{self.bad_steps} consecutive non-finite steps at step {self.step}; stopping. "
                                  "Lower the lr, raise engine.grad_clip, or use bf16/fp32 instead of fp16.")
        return {"train/skipped_step": 1.0}

    # ------------------------------------------------------------------------------------------------ loop
    def _exit_for_requeue(self):
        self.close_data()
        self.stops.mark_requeue(self.step)
        edist.shutdown()
        raise SystemExit(REQUEUE_EXIT_CODE)

    def save(self):
        meta = {"samples_seen": self.samples_seen, "world_size": edist.world_size(),
                "skips": self.data_state.skip_counts(), "model": model_record(self.cfg.model, self.variant, self.objective.teacher_width),
                "settings": self.settings, "rollbacks": self.rollbacks,
                "skip_windows": {str(k): v for k, v in self.skip_windows.items()}, "lr_window": self.lr_window}
        # the rows first: a kill after the checkpoint loses none; one before it leaves rows past the previous
        # checkpoint, which the resume truncates
        for row_log in (self.sample_log, self.key_log):
            if row_log is not None:
                row_log.flush()
        path = save_checkpoint(self.engine, self.run_dir, self.step, meta,
                               {"data": self.data_state.state_dict(), "rng": rng_state(),
                                "order_hash": self.order_hash},
                               self.cfg.checkpoint.keep_last)
        self.log(f"checkpoint: {path}")
        return path

    def evaluate(self) -> Dict[str, float]:
        """The zero-shot suite on every rank, each a share of every dataset (the metrics equal one process's);
        under ZeRO-3 the gathered weights are copied out and rank 0 evaluates them alone."""
        if not self.eval_entries:
            return {}
        from evaclip.data.transforms import make_tokenizer
        from evaclip.evalsuite import run_suite, write_results

        out: Dict[str, float] = {}
        self.engine.train(False)
        model, dtype = self.engine.model, self.engine.input_dtype
        shard, gather = (edist.rank(), edist.world_size()), edist.all_gather_objects
        if self.engine.shards_params:
            # ZeRO-3: gather the weights (every rank), evaluate a plain copy on rank 0 without DeepSpeed's hooks
            shard, gather = (0, 1), None
            with self.engine.full_weights() as m:
                sd = {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} if edist.is_main() else None
            if edist.is_main():
                model = create_model(self.cfg.model, self.variant, load_hf_weights=False)
                model.load_state_dict(sd)
                model.to(self.device).eval()
                dtype = torch.float32
        if edist.is_main() or gather is not None:
            v = self.variant
            def in_precision(fn):  # evaluate in the precision the model trains in
                def run(x):
                    with self.engine.autocast():
                        return fn(x)
                return run

            results = run_suite(in_precision(lambda x: model.encode_image(x.to(dtype), normalize=False)),
                                in_precision(lambda t: model.encode_text(t, normalize=False)),
                                make_tokenizer(v.context_length, self.cfg.model.text.kind, self.cfg.model.text.hf_path),
                                self.eval_entries, self.cfg.eval.datasets_root.replace("{root}", self.cfg.data.root),
                                v.image_size, v.mean, v.std,
                                self.device, self.cfg.eval.batch_size, model_name=v.name,
                                pretrained=f"{self.run_dir}@step{self.step}", log=self.log,
                                workers=self.cfg.eval.workers, interpolation=v.interpolation,
                                shard=shard, gather=gather)
            if edist.is_main():
                write_results(results, os.path.join(self.run_dir, "eval", f"step-{self.step:08d}"))
            for r in results:
                for k, val in r["metrics"].items():
                    out[f"zeroshot/{r['dataset']}/{k}"] = val
        edist.barrier(f"the evaluation at step {self.step}")
        self.engine.train(True)
        return out

    def close_data(self) -> None:
        """Shut the DataLoader workers down now. They ignore SIGTERM (so a process-group signal reaches the main
        process first): left to interpreter exit, multiprocessing would SIGTERM and then wait for them forever."""
        from evaclip.data.wds import stop_workers

        stop_workers(getattr(self, "data_iter", None))
        self.data_iter = None
        self.loader = None

    def train(self) -> Dict:
        try:
            return self._train()
        finally:
            self.close_data()
            self.stops.restore()

    def _train(self) -> Dict:
        cfg, d = self.cfg, self.derived
        self.stops.install()
        self.engine.train(True)
        bar = None
        if edist.is_main() and cfg.log.progress:
            bar = progress_bar(d.steps, "train", "step", initial=self.step)
        t_last, n_last = time.time(), self.samples_seen
        data_wait = 0.0  # seconds spent waiting for batches since the last log line
        last_eval: Dict[str, float] = {}
        while self.step < d.steps:
            rate = patch_dropout_at(self.step, cfg.model.vision.patch_dropout, d.unmasked_from_step)
            self.model.set_patch_dropout(rate)
            lr_factor = self.scheduler.set_step(self.step)
            if self.lr_window[0] <= self.step < self.lr_window[1]:
                for g in self.engine.optimizer.param_groups:
                    g["lr"] *= self.lr_window[2]
            if self.step in self.skip_windows:
                self._skip_data(self.step)
            t_data = time.time()
            micro = self._next_step()
            data_wait += time.time() - t_data
            metrics = self.train_step(micro)
            if self.key_log is not None:  # a skipped step's samples too: the batch of that step
                self.key_log.add(self.step + 1, [k for m in micro for k in m["key"]],
                                 [x for m in micro for x in m["source"]], [x for m in micro for x in m["stream"]])
            self._check_skips()  # every step: a run on mostly missing data must stop early, not at a log step
            if self.spike is not None and "train/loss" in metrics:
                first = self.spike.observe(self.step, metrics["train/loss"])
                self._rollback_from = first if first is not None else self._rollback_from
            if self._rollback_from is not None:
                self._rollback(self._rollback_from)
                if bar:
                    bar.n = self.step
                    bar.refresh()
                continue
            self.step += 1
            self.samples_seen += d.global_batch
            if bar:
                bar.update(1)
            if self.step % cfg.log.every_steps == 0 or self.step == d.steps:
                now = time.time()
                sps = (self.samples_seen - n_last) / max(now - t_last, 1e-9)
                # the share of the wall time spent waiting for the input pipeline: near 1, the run is data-bound
                # (more data.workers, or CPUs); near 0, the step is the bottleneck (the step's loss .item()
                # synchronises the device, so the wait is not hidden in queued device work)
                metrics["train/data_wait_frac"] = data_wait / max(now - t_last, 1e-9)
                t_last, n_last, data_wait = now, self.samples_seen, 0.0
                metrics.update(self._lr_metrics(lr_factor))
                metrics.update({"train/samples_per_s": sps, "train/patch_dropout": rate,
                                "train/samples_seen": self.samples_seen, "data/order_hash": self.order_hash})
                metrics.update({f"data/skipped/{k}": v for k, v in self.data_state.skip_counts().items()})
                if self.device.type == "cuda":  # the high-water mark since the start, what a plan is checked against
                    metrics["sys/max_mem_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                self.logger.log(self.step, metrics)
                if bar and "train/loss" in metrics:
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", samples_s=f"{sps:.0f}", refresh=False)
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < d.steps:
                last_eval = self.evaluate()
                self.logger.log(self.step, last_eval)
            stop = self.stops.asked(self.device)
            if (self.step % cfg.checkpoint.every_steps == 0 and self.step < d.steps) or stop:
                self.save()
            if stop:
                if bar:
                    bar.close()
                self.logger.close()
                self._exit_for_requeue()
        if bar:
            bar.close()
        final = self.save()
        last_eval = self.evaluate()
        if last_eval:
            self.logger.log(self.step, last_eval)
        plot = plot_run(self.run_dir) if edist.is_main() and cfg.log.plot else None
        self.logger.close()
        return {"run_dir": self.run_dir, "checkpoint": final, "steps": self.step, "samples": self.samples_seen,
                "zeroshot": last_eval, "plot": plot, "skips": self.data_state.skip_counts(),
                "rollbacks": self.rollbacks}

    # ------------------------------------------------------------------------------------------------ healing
    def _rollback(self, first: int) -> None:
        """Back to the newest valid checkpoint from before step ``first``; skip the data from there on."""
        c, detected = self.cfg.spike, self.step
        self._rollback_from = None
        if len(self.rollbacks) >= c.max_rollbacks:
            raise TrainingStopped(f"loss spike at step {first} after {len(self.rollbacks)} rollbacks "
                                  f"(spike.max_rollbacks = {c.max_rollbacks}); stopping: look at the data and the lr")
        before = [p for p, s in ((p, _meta_step(p)) for p in candidates(self.run_dir)) if s is not None and s <= first]
        if not before:
            raise TrainingStopped(f"loss spike at step {first} but no checkpoint from before it to roll back to "
                                  "(lower checkpoint.every_steps)")
        ckpt, meta, rank_state = load_checkpoint(self.engine, before, self.cfg.checkpoint.trust_pickle, self.log)
        self.step, self.samples_seen = meta["step"], meta["samples_seen"]
        self._restore_rank_state(ckpt, meta, rank_state)  # the healing state (rollbacks, windows) stays
        for row_log in (self.sample_log, self.key_log):
            if row_log is not None:
                row_log.truncate(self.step)
        skip = c.skip_samples or (detected + 1 - first) * self.derived.global_batch
        self.skip_windows[first] = self.skip_windows.get(first, 0) + skip
        if c.lr_scale != 1.0 and c.lr_scale_steps > 0:
            self.lr_window = [first, first + c.lr_scale_steps, c.lr_scale]
        self.spike.forget_from(self.step)
        self.bad_steps = 0
        self.close_data()
        self._build_data()
        event = {"spike_step": first, "detected_step": detected, "rolled_back_to": self.step,
                 "checkpoint": ckpt, "skip_samples": skip}
        self.rollbacks.append(event)
        self.logger.log(detected, {"rollback/spike_step": first, "rollback/to_step": self.step,
                                   "rollback/skip_samples": skip, "rollback/count": len(self.rollbacks)})
        self.log(f"loss spike from step {first} (detected at {detected}): rolled back to {ckpt}; the {skip} samples "
                 f"from step {first} on will be skipped ({len(self.rollbacks)} of {c.max_rollbacks} rollbacks)")

    def _skip_data(self, step: int) -> None:
        """Consume, without training on them, the samples a rollback marked for skipping at ``step``."""
        n = self.skip_windows[step]  # kept: a later rollback to before this step must skip it again
        if self.num_streams:  # whole data steps: the pieces of ceil(n / global batch) steps
            batches = math.ceil(n / self.derived.global_batch) * max(1, self.cfg.data.workers)
        else:
            batches = math.ceil(n / (self.cfg.data.micro_batch_size * edist.world_size()))
        for _ in range(batches):
            batch = next(self.data_iter)
            self.data_state.update(batch.pop("__state__"))  # the position moves on; the order hash does not
        self.log(f"step {step}: skipped {n} samples (the window of a loss spike)")

    def _restore_healing(self, meta: Dict) -> None:
        self.rollbacks = list(meta.get("rollbacks", self.rollbacks))
        self.skip_windows = {int(k): v for k, v in meta.get("skip_windows", {}).items()}
        self.lr_window = list(meta.get("lr_window", self.lr_window))

    def _lr_metrics(self, factor: float) -> Dict[str, float]:
        peak: Dict[str, float] = {}
        for g in self.engine.optimizer.param_groups:
            tower = g.get("name", "all").split("/")[0]
            peak[tower] = max(peak.get(tower, 0.0), g["lr"])
        return {f"lr/{k}": v for k, v in peak.items()}

    def _check_skips(self):
        # summed over ranks, so every rank takes the same decision (one rank stopping alone would hang the rest)
        local = self.data_state.lost_samples()  # unreadable shards count by the samples they should hold
        tot = edist.all_reduce_sum(torch.tensor([float(local), float(self.data_state.samples() + local)],
                                                device=self.device))
        skips, seen = int(tot[0].item()), int(tot[1].item())
        if seen >= 1000 and skips / seen > self.cfg.data.max_skip_fraction:
            raise TrainingStopped(f"{skips} of {seen} samples were unusable (this rank: {self.data_state.skip_counts()}), "
                                  f"above data.max_skip_fraction = {self.cfg.data.max_skip_fraction}; check the shards "
                                  "(`evaclip data verify`)")
