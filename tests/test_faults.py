"""Issue 32's fault cases that need a run (the command-line table is tests/test_bad_inputs.py): each test
reproduces one case as the issue describes it and checks nothing is lost or silently wrong."""
import os

import pytest
import torch

from evaclip.checkpoint import latest_checkpoint
from evaclip.config import load_config
from evaclip.errors import TrainingStopped
from evaclip.preflight import resolve
from evaclip.train import Trainer
from tests.conftest import tiny_overrides


def _trainer(synth_dir, tmp_path, name, steps=4, extra=()):
    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), name, steps, extra))
    return Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)


def _poison_after(tr, step):
    """Make the optimizer step of ``step`` leave a NaN weight behind (its gradients were finite), as a huge lr
    would: the engine's skip guard, which looks at gradients, cannot see it."""
    real = tr.engine.step

    def step_then_poison():
        info = real()
        if tr.step + 1 == step:
            with torch.no_grad():
                next(tr.engine.model.parameters()).view(-1)[0] = float("nan")
        return info

    tr.engine.step = step_then_poison


@pytest.mark.parametrize("every,poisoned,match,kept", [
    (1, 3, r"step 3: non-finite weights", "step-00000002"),
    (100, 2, r"ended on 2 non-finite step\(s\) in a row \(the last: step 4\)", None)])
def test_13_non_finite_weights_are_never_checkpointed_and_the_run_fails_naming_the_step(synth_dir, tmp_path, every,
                                                                                        poisoned, match, kept):
    """Issue 32 (13): a NaN checkpoint pushed the good ones out of keep_last and the run exited 0. Now a save of
    non-finite weights is refused (every=1: step 3's update left a NaN), and a run that ends on non-finite steps
    (every=100: steps 3-4 skipped) raises, naming the step; the checkpoint kept is the last finite one."""
    tr = _trainer(synth_dir, tmp_path, "nan", steps=4, extra=[f"checkpoint.every_steps={every}",
                                                              "checkpoint.keep_last=1"])
    _poison_after(tr, poisoned)
    with pytest.raises(TrainingStopped, match=match):
        tr.train()
    latest = latest_checkpoint(tr.run_dir)
    assert (latest and os.path.basename(latest)) == kept
