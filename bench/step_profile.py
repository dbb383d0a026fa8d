"""Where a train step's time goes, in evaclip and in open_clip_train, measured inside their own unchanged loops.

``install(framework, path)`` wraps the few functions every step passes through with wall-clock timers before the
framework is imported: the data loader's ``__next__`` (data wait), the CLIP model's forward (both towers and the
projections), the contrastive loss's forward, ``Tensor.backward`` (the towers' and the loss's backward together:
one autograd call in both frameworks), the optimizer's ``step`` and the loggers (Python ``logging`` and evaclip's
metrics file). Only the outermost timed call counts (a forward inside a forward is not counted twice). A step ends
when its optimizer step returns; what is left of a step's wall time after the timed parts is ``rest``: the loop's
own Python, zeroing gradients, the lr schedule, meters. At exit the per-step figures go to ``path`` as JSON.
A few ``perf_counter`` calls per timed call: negligible beside a step of hundreds of milliseconds.
With ``STEP_PROFILE_OPS=PREFIX`` in the environment, the 15th-17th backward calls also run under torch.profiler
and their per-operator tables go to ``PREFIX.<framework>.<call>``.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import time
from typing import Dict, List

CATEGORIES = ("data", "forward", "loss", "backward", "optimizer", "logging")


class StepClock:
    """Per-step seconds by category; a step closes when ``close_step`` is called (after the optimizer step)."""

    def __init__(self):
        self.steps: List[Dict[str, float]] = []
        self.current: Dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
        self.step_ends: List[float] = []
        self.depth = 0
        self.hits: Dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def timed(self, category: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.depth:  # inside another timed call: already counted there
                return fn(*args, **kwargs)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.current[category] += time.perf_counter() - t
                self.hits[category] += 1
                if category == "optimizer":
                    self.close_step()
        return wrapper

    def close_step(self) -> None:
        self.step_ends.append(time.perf_counter())
        self.steps.append(self.current)
        self.current = dict.fromkeys(CATEGORIES, 0.0)

    def summary(self, warmup: int) -> Dict:
        """Mean seconds per step by category over the steps after ``warmup`` (means add up to the step; medians
        would not), ``rest`` = the step's wall time less the timed parts."""
        walls = [b - a for a, b in zip(self.step_ends, self.step_ends[1:])]  # step i+1's wall: end i -> end i+1
        rows = self.steps[1:][warmup:]
        walls = walls[warmup:]
        if not rows:
            raise RuntimeError(f"no step after the {warmup} warm-up steps was timed (hits: {self.hits})")
        n = len(rows)
        out = {c: sum(r[c] for r in rows) / n for c in CATEGORIES}
        out["step"] = sum(walls) / n
        out["rest"] = out["step"] - sum(out[c] for c in CATEGORIES)
        return {"steps": n, "mean_s": out, "hits": self.hits}


def _wrap(clock: StepClock, category: str, owner, name: str) -> None:
    setattr(owner, name, clock.timed(category, getattr(owner, name)))


def install(framework: str, path: str, warmup: int) -> StepClock:
    """Wrap the step's functions for ``framework`` ("evaclip" or "open_clip"); write the summary to ``path`` at
    exit. Call before the framework builds its model and optimizer."""
    import logging

    import torch
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    clock = StepClock()
    _wrap(clock, "data", _BaseDataLoaderIter, "__next__")
    _wrap(clock, "backward", torch.Tensor, "backward")
    _wrap(clock, "optimizer", torch.optim.AdamW, "step")
    _wrap(clock, "logging", logging.Logger, "_log")
    if framework == "open_clip":
        import open_clip.loss
        import open_clip.model

        _wrap(clock, "forward", open_clip.model.CLIP, "forward")
        _wrap(clock, "forward", open_clip.model.CustomTextCLIP, "forward")
        _wrap(clock, "loss", open_clip.loss.ClipLoss, "forward")
    elif framework == "evaclip":
        import evaclip.losses
        import evaclip.metrics
        import evaclip.models.clip
        import evaclip.optim

        _wrap(clock, "forward", evaclip.models.clip.CLIP, "forward")
        _wrap(clock, "loss", evaclip.losses.ContrastiveLoss, "forward")
        _wrap(clock, "optimizer", evaclip.optim.Lamb, "step")
        _wrap(clock, "logging", evaclip.metrics.MetricLogger, "log")
    else:
        raise ValueError(f"framework: {framework!r} (evaclip or open_clip)")

    def dump():
        try:
            result = clock.summary(warmup)
        except RuntimeError as e:
            result = {"error": str(e)}
        with open(path, "w") as f:
            json.dump(result, f)

    atexit.register(dump)
    if os.environ.get("STEP_PROFILE_OPS"):  # "PREFIX": per-operator tables of the 15th-17th backward calls
        _profile_backward_ops(framework, os.environ["STEP_PROFILE_OPS"], (15, 16, 17))
    return clock


def _profile_backward_ops(framework: str, prefix: str, calls) -> None:
    """torch.profiler around the ``calls``-th ``Tensor.backward`` calls (after warm-up): each one's operators by self
    CPU time, written to ``PREFIX.FRAMEWORK.N`` (issue 28: is one framework's backward slower per operator?)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    real, count = torch.Tensor.backward, [0]

    def backward(self, *args, **kwargs):
        count[0] += 1
        if count[0] not in calls:
            return real(self, *args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            out = real(self, *args, **kwargs)
        with open(f"{prefix}.{framework}.{count[0]}", "w") as f:
            f.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        return out

    torch.Tensor.backward = backward
