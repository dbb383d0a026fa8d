"""The Trainer: one explicit build order, a short step loop, resumable state.

Build order: distributed -> seed -> objective and its model (+ weight init) -> optimizer -> resume settings
check -> engine -> schedule -> checkpoint (resume) -> data -> evaluator -> logger. ``train()`` runs steps (not
epochs) until ``derived.steps``.

One optimizer step = ``engine.accum_steps`` micro-batches, whose forward and backward passes are the objective's
(``evaclip.train.objectives``: CLIP with feature-cached accumulation, MIM); the trainer owns the engine step, skipped
steps, logging, evaluation, checkpoints and the rollback itself. Its parts: the input (``train.data``), what a
resume keeps (``train.resume``), self-healing decisions (``train.healing``), signals (``train.preemption``), the
loop's counters (``train.state.TrainState``).
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Dict, List, Optional

import torch

from evaclip import dist as edist
from evaclip.checkpoint import (
    candidates,
    load_checkpoint,
    read_meta,
    resume_candidates,
    rewind,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from evaclip.config import Derived, ExperimentConfig, save_run_config, to_dict
from evaclip.engine import build_engine, pick_device
from evaclip.errors import TrainingStopped
from evaclip.metrics import KeyLog, MetricLogger, SampleLossLog, plot_run, progress_bar
from evaclip.models import get_variant, model_record
from evaclip.models.convert import init_from_files
from evaclip.optim import build_optimizer
from evaclip.schedule import LrScheduler, patch_dropout_at
from evaclip.train.data import TrainData, logical_streams
from evaclip.train.evaluation import Evaluator
from evaclip.train.healing import Healing, without_abandoned
from evaclip.train.objectives import build_objective
from evaclip.train.preemption import REQUEUE_EXIT_CODE, StopRequests
from evaclip.train.resume import check_resume_settings, resume_settings
from evaclip.train.state import TrainState


def _meta_step(path: str) -> Optional[int]:
    try:
        return read_meta(path)["step"]
    except (OSError, ValueError, KeyError):
        return None


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    """Builds a run from its config (``__init__``, in the order the module docstring gives) and trains it."""

    data_class = TrainData  # a test may train on another source by subclassing it

    def __init__(self, cfg: ExperimentConfig, derived: Derived, log=print):
        self.cfg, self.derived = cfg, derived
        self.run_dir = derived.run_dir
        # 1. distributed (first: which rank logs is known only once the process group is up)
        self.device = pick_device(cfg.run.device)
        edist.init_distributed(self.device, collective_timeout_s=cfg.run.collective_timeout_s,
                               single=cfg.engine.kind == "deepspeed")
        self.log = log if edist.is_main() else (lambda *a, **k: None)
        if edist.world_size() != derived.world_size:
            raise RuntimeError(f"resolved for {derived.world_size} processes but running with {edist.world_size()}")
        # 2. seed (same model init on every rank; data and dropout streams differ per rank below)
        torch.manual_seed(cfg.run.seed)
        # 3. the objective and its model (MIM: its frozen teacher too), 4. optimizer
        model = self._build_model()
        optimizer = build_optimizer(model, cfg.optim)
        # 5. a resume must keep the settings its checkpoint was written with: checked before anything is written
        resume = resume_candidates(cfg.checkpoint.resume, self.run_dir)
        if cfg.checkpoint.resume == "auto":  # not those a recorded rollback left behind (a crash right after it)
            resume = without_abandoned(self.run_dir, resume, self.log)
        streams = self._check_resume(resume)
        # 6. engine, schedule
        if edist.is_main():
            save_run_config(self.run_dir, cfg, derived, {"git_sha": git_sha(), "world_size": edist.world_size()})
        self.engine = build_engine(model, optimizer, cfg.engine, self.device, cfg.data.micro_batch_size, self.run_dir)
        self.model = self.engine.model
        if self.engine.compiler is not None:
            self.objective.compile(self.model, self.engine.compiler, whole_step=cfg.engine.compile == "step")
        self.scheduler = LrScheduler(optimizer, derived.steps, derived.warmup_steps, cfg.schedule.name,
                                     cfg.schedule.min_lr_ratio, cfg.schedule.cooldown_steps)
        torch.manual_seed(cfg.run.seed * 1000 + edist.rank())  # per-rank dropout / patch-drop stream
        # 7. data, then the checkpoint: resumed before the data iterator starts (it starts at the saved position)
        self.state = TrainState()  # step, samples seen, bad-step streaks
        self.healing = Healing(cfg.spike, derived.global_batch)  # loss-spike rollbacks and their aftermath
        self.data = self.data_class(cfg.data, cfg.run.seed, self.variant, cfg.model.text, self.objective.uses_text,
                                    self.device, derived.global_batch, cfg.engine.accum_steps, streams)
        if resume:
            self._resume(resume)
        self.data.open()
        r, w = edist.rank(), edist.world_size()
        self.sample_log = SampleLossLog(self.run_dir, r, self.state.step, w) if cfg.log.sample_loss else None
        self.key_log = KeyLog(self.run_dir, r, self.state.step, w) if cfg.data.log_keys else None
        # 8. evaluator, logger, signals
        self.evaluator = Evaluator(cfg.eval, cfg.model, self.variant, cfg.data.root, self.run_dir, self.device, self.log,
                                   self.objective.model_extras)
        self.logger = MetricLogger(self.run_dir, cfg.log, enabled=edist.is_main(), run_name=cfg.run.name,
                                   config=to_dict(cfg))
        self.stops = StopRequests(self.run_dir, self.log, waiting=lambda: self.data.waiting)

    def _build_model(self):
        """The objective (``self.objective``) and the model it trains, initialised from files and towers locked."""
        cfg = self.cfg
        self.variant = get_variant(cfg.model.name, cfg.model.model_dir)
        self.objective = build_objective(cfg, self.variant, self.device, self.log)
        model = self.objective.build_model()
        trained = {id(p) for p in model.parameters()}
        for part in self.objective.frozen_modules():  # a teacher: never trained, never in the optimizer
            if any(p.requires_grad or id(p) in trained for p in part.parameters()):
                raise RuntimeError(f"objective {self.objective.kind}: a frozen module is trainable or shared")
        report = init_from_files(model, cfg.model)  # refuses pickles and inits that load nothing
        if report:
            self.log(report)
        if cfg.model.vision.lock:
            model.lock_tower("visual", cfg.model.vision.unlocked_layers)
        if cfg.model.text.lock:
            model.lock_tower("text", cfg.model.text.unlocked_layers)
        return model

    def _check_resume(self, resume) -> int:
        """The settings of the newest readable checkpoint against this run's (``self.settings``); returns the
        run's logical data streams (fixed by the first leg of the run)."""
        saved, saved_in = None, None
        for c in resume:  # the newest checkpoint whose meta can be read (damaged ones are reported at load)
            try:
                saved, saved_in = read_meta(c).get("settings", {}), c
            except (OSError, ValueError):
                continue
            break
        streams = logical_streams(self.cfg.data, saved, edist.world_size(), self.derived.global_batch)
        self.settings = dict(resume_settings(self.cfg, edist.world_size()), **self.objective.resume_settings(),
                             **{"data.num_streams": streams})
        if saved is not None:
            check_resume_settings(saved, self.settings, self.cfg.checkpoint.allow_changes, saved_in)
        return streams

    def _resume(self, resume) -> None:
        ckpt, meta, rank_state = load_checkpoint(self.engine, resume, self.cfg.checkpoint.trust_pickle, self.log)
        self.state.load_state_dict(meta)
        self._restore_rank_state(ckpt, meta, rank_state)
        self.healing.load_state_dict(meta, self.run_dir)
        w = meta.get("world_size")
        elastic = "" if rank_state is not None else f", written by {w} rank{'s' if w != 1 else ''}"
        self.log(f"resumed from {ckpt} at step {self.state.step} ({self.state.samples_seen} samples{elastic})")

    def _restore_rank_state(self, ckpt: str, meta: Dict, rank_state: Optional[Dict]) -> None:
        """This rank's data position, RNG and order hash from a checkpoint. One written by another number of
        ranks (``rank_state`` None; the engine has re-partitioned its own state) gives each rank the saved
        positions of the logical streams it now owns: the data continue exactly. Its RNG is seeded from
        (seed, rank, step): augmentation and token dropping do not use it (they are seeded per sample), only
        in-model randomness such as dropout does, which thus differs from the uninterrupted run."""
        if rank_state is None:
            rank_state = dict(self.data.regroup(ckpt, meta["world_size"], self.cfg.checkpoint.trust_pickle), rng=None)
            torch.manual_seed((self.cfg.run.seed * 1000 + edist.rank()) * 1_000_003 + self.state.step)
        self.data.load_state_dict(rank_state)
        if rank_state["rng"] is not None:
            set_rng_state(rank_state["rng"])

    # ------------------------------------------------------------------------------------------------ step
    def train_step(self, micro: List[Dict]) -> Dict:
        """The objective's forward/backward over the micro-batches of one optimizer step, then the engine step."""
        fwd = self.objective.forward_backward(self.engine, micro, self.state.step)
        if not fwd.finite:
            return self._bad_step(fwd.loss)
        info, skipped = self._engine_step(fwd.loss)
        if skipped is not None:
            return skipped
        if self.sample_log is not None and fwd.sample_losses is not None:
            self.sample_log.add(self.state.step + 1, *([x for m in micro for x in m[c]] for c in ("key", "source", "shard")),
                                fwd.sample_losses)
        # each rank's local loss covers its rows; the global loss is their mean
        mean_loss = edist.all_reduce_sum(fwd.loss.clone().reshape(1)) / edist.world_size()
        return {"train/loss": mean_loss.item(), **fwd.metrics, "train/grad_norm": info.grad_norm}

    def _engine_step(self, loss) -> tuple:
        """The engine's step after the backward passes: (info, None), or (info, the metrics of a step that
        made no update: non-finite gradients, or an fp16 loss-scale calibration skip)."""
        info = self.engine.step()
        if info.skipped:
            return info, self._bad_step(loss, info)
        self.state.bad_steps = 0
        if info.overflow:
            return info, self._fp16_overflow()
        self.state.overflows = 0
        return info, None

    def _fp16_overflow(self) -> Dict:
        """fp16 loss-scale calibration: counted, stops only if it never recovers."""
        self.state.overflows += 1
        if self.state.overflows >= 100:
            raise TrainingStopped(f"fp16 loss scaling overflowed on {self.state.overflows} consecutive steps at step "
                                  f"{self.state.step}; use engine.precision = 'bf16' or lower the lr")
        return {"train/overflow_skip": 1.0}

    def _bad_step(self, loss, info=None) -> Dict:
        self.engine.zero_grad()
        self.state.bad_steps += 1
        self.healing.nonfinite(self.state.step, self.state.bad_steps)
        self.log(f"step {self.state.step}: non-finite {'loss' if info is None else 'gradients'} "
                 f"({float(loss.detach()):.4g}); step skipped ({self.state.bad_steps} in a row)")
        if self.state.bad_steps >= self.cfg.engine.max_bad_steps:
            raise TrainingStopped(f"{self.state.bad_steps} consecutive non-finite steps at step {self.state.step}; stopping. "
                                  "Lower the lr, raise engine.grad_clip, or use bf16/fp32 instead of fp16.")
        return {"train/skipped_step": 1.0}

    # ------------------------------------------------------------------------------------------------ loop
    def _exit_for_requeue(self):
        self.data.close()
        self.stops.mark_requeue(self.state.step)
        edist.shutdown()
        raise SystemExit(REQUEUE_EXIT_CODE)

    def save(self):
        meta = {**self.state.state_dict(), "world_size": edist.world_size(),
                "skips": self.data.state.skip_counts(), "model": model_record(self.cfg.model, self.variant, self.objective.model_extras),
                "settings": self.settings, **self.healing.state_dict()}
        # the rows first: a kill after the checkpoint loses none; one before it leaves rows past the previous
        # checkpoint, which the resume truncates
        for row_log in (self.sample_log, self.key_log):
            if row_log is not None:
                row_log.flush()
        path = save_checkpoint(self.engine, self.run_dir, self.state.step, meta,
                               dict(self.data.state_dict(), rng=rng_state()),
                               self.cfg.checkpoint.keep_last)
        self.log(f"checkpoint: {path}")
        return path

    def evaluate(self) -> Dict[str, float]:
        """The zero-shot suite at the current step ({} without one)."""
        return self.evaluator(self.engine, self.state.step)

    def train(self) -> Dict:
        try:
            return self._train()
        finally:
            self.data.close()
            self.stops.restore()

    def _train(self) -> Dict:
        cfg, d = self.cfg, self.derived
        self.stops.install()
        self.engine.train(True)
        bar = None
        if edist.is_main() and cfg.log.progress:
            bar = progress_bar(d.steps, "train", "step", initial=self.state.step)
        window = {"time": time.time(), "samples": self.state.samples_seen, "data_wait": 0.0}  # since the last log line
        while self.state.step < d.steps:
            rate = patch_dropout_at(self.state.step, cfg.model.vision.patch_dropout, d.unmasked_from_step)
            self.model.set_patch_dropout(rate)
            lr_factor = self._set_lr()
            if self.state.step in self.healing.skip_windows:
                self._skip_data(self.state.step)
            t_data = time.time()
            micro = self.data.next_step()
            window["data_wait"] += time.time() - t_data
            metrics = self.train_step(micro)
            if self.key_log is not None:  # a skipped step's samples too: the batch of that step
                self.key_log.add(self.state.step + 1, [k for m in micro for k in m["key"]],
                                 [x for m in micro for x in m["source"]], [x for m in micro for x in m["stream"]])
            self.data.check_skips()  # every step: a run on mostly missing data must stop early, not at a log step
            if "train/loss" in metrics:
                self.healing.observe(self.state.step, metrics["train/loss"])
            if self.healing.pending is not None:
                self._rollback(self.healing.pending)
                if bar:
                    bar.n = self.state.step
                    bar.refresh()
                continue
            self.state.advance(d.global_batch)
            if bar:
                bar.update(1)
            if self.state.step % cfg.log.every_steps == 0 or self.state.step == d.steps:
                self._log_step(metrics, window, rate, lr_factor, bar)
            if cfg.eval.every_steps and self.state.step % cfg.eval.every_steps == 0 and self.state.step < d.steps:
                self.logger.log(self.state.step, self.evaluate())
            stop = self.stops.asked(self.device)
            if ((self.state.step % cfg.checkpoint.every_steps == 0 and self.state.step < d.steps) or stop) and self._may_save():
                self.save()
            if stop:
                if bar:
                    bar.close()
                self.logger.close()
                self._exit_for_requeue()
        if bar:
            bar.close()
        return self._finish()

    def _may_save(self) -> bool:
        """Checkpoints only after a finite step: weights a non-finite step left are never kept."""
        if self.state.bad_steps:
            self.log(f"step {self.state.step}: checkpoint skipped, the last step was non-finite")
        return not self.state.bad_steps

    def _finish(self) -> Dict:
        """The last checkpoint, the final evaluation and the plots; the run's summary."""
        if not self._may_save():
            raise TrainingStopped(f"the run ended on {self.state.bad_steps} non-finite step(s) in a row (the last: step "
                                  f"{self.state.step}); no final checkpoint written (the kept ones are from finite steps)")
        final = self.save()
        last_eval = self.evaluate()
        if last_eval:
            self.logger.log(self.state.step, last_eval)
        plot = plot_run(self.run_dir) if edist.is_main() and self.cfg.log.plot else None
        self.logger.close()
        return {"run_dir": self.run_dir, "checkpoint": final, "steps": self.state.step, "samples": self.state.samples_seen,
                "zeroshot": last_eval, "plot": plot, "skips": self.data.state.skip_counts(),
                "rollbacks": self.healing.rollbacks,
                "compiled_graphs": dict(self.engine.compiler.graphs) if self.engine.compiler is not None else {}}

    def _set_lr(self) -> float:
        """The schedule's lr for this step, scaled while a post-rollback window is open; the schedule's factor."""
        lr_factor = self.scheduler.set_step(self.state.step)
        lr_scale = self.healing.lr_multiplier(self.state.step)
        if lr_scale is not None:
            for g in self.engine.optimizer.param_groups:
                g["lr"] *= lr_scale
        return lr_factor

    def _log_step(self, metrics: Dict, window: Dict, rate: float, lr_factor: float, bar) -> None:
        """Log this step's metrics with the throughput and data wait of the steps since the last log line."""
        now = time.time()
        elapsed = max(now - window["time"], 1e-9)
        sps = (self.state.samples_seen - window["samples"]) / elapsed
        # the share of the wall time spent waiting for the input pipeline: near 1, the run is data-bound (more
        # data.workers, or CPUs); near 0, the step is the bottleneck (the step's loss .item() synchronises the
        # device, so the wait is not hidden in queued device work)
        metrics["train/data_wait_frac"] = window["data_wait"] / elapsed
        window.update(time=now, samples=self.state.samples_seen, data_wait=0.0)
        metrics.update(self._lr_metrics(lr_factor))
        metrics.update({"train/samples_per_s": sps, "train/patch_dropout": rate,
                        "train/samples_seen": self.state.samples_seen, "data/order_hash": self.data.order_hash})
        metrics.update({f"data/skipped/{k}": v for k, v in self.data.state.skip_counts().items()})
        if self.engine.compiler is not None:  # graphs built per compiled piece: a count that grows is recompiling
            metrics.update(self.engine.compiler.metrics())
        if self.device.type == "cuda":  # the high-water mark since the start, what a plan is checked against
            metrics["sys/max_mem_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.logger.log(self.state.step, metrics)
        if bar and "train/loss" in metrics:
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", samples_s=f"{sps:.0f}", refresh=False)

    # ------------------------------------------------------------------------------------------------ healing
    def _rollback(self, first: int) -> None:
        """Back to the newest valid checkpoint from before step ``first``; skip the data from there on."""
        detected = self.state.step
        before = self.healing.targets(first, candidates(self.run_dir), _meta_step)
        ckpt, meta, rank_state = load_checkpoint(self.engine, before, self.cfg.checkpoint.trust_pickle, self.log)
        self.state.load_state_dict(meta)
        self._restore_rank_state(ckpt, meta, rank_state)  # the healing state (rollbacks, windows) stays
        for row_log in (self.sample_log, self.key_log):
            if row_log is not None:
                row_log.truncate(self.state.step)
        event = self.healing.rolled_back(first, detected, self.state.step, ckpt)
        if edist.is_main():  # durable before training goes on: a crash from here on resumes this rollback
            self.healing.record(self.run_dir)
            aside = rewind(self.run_dir, ckpt)
            if aside:
                self.log(f"set aside the checkpoints from after the spike: {', '.join(aside)} (as rolled-back-*)")
        edist.barrier(f"rollback to step {self.state.step}")
        self.data.reopen()
        n, skip, most = len(self.healing.rollbacks), event["skip_samples"], self.cfg.spike.max_rollbacks
        self.logger.log(detected, {"rollback/spike_step": first, "rollback/to_step": self.state.step,
                                   "rollback/skip_samples": skip, "rollback/count": n})
        self.log(f"loss spike from step {first} (detected at {detected}): rolled back to {ckpt}; the {skip} samples "
                 f"from step {first} on will be skipped ({n} of {most} rollbacks)")

    def _skip_data(self, step: int) -> None:
        """Consume, without training on them, the samples a rollback marked for skipping at ``step``."""
        n = self.healing.skip_windows[step]  # kept: a later rollback to before this step must skip it again
        self.data.skip(n, tick=self.stops.check_wait)
        self.log(f"step {step}: skipped {n} samples (the window of a loss spike)")

    def _lr_metrics(self, factor: float) -> Dict[str, float]:
        peak: Dict[str, float] = {}
        for g in self.engine.optimizer.param_groups:
            tower = g.get("name", "all").split("/")[0]
            peak[tower] = max(peak.get(tower, 0.0), g["lr"])
        return {f"lr/{k}": v for k, v in peak.items()}
