"""Issue 32's fault cases that need a run (the command-line table is tests/test_bad_inputs.py): each test
reproduces one case as the issue describes it and checks nothing is lost or silently wrong."""
import os
from typing import Tuple

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
        if tr.state.step + 1 == step:
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


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("buf", torch.arange(4.0))
        self.mask = torch.ones(2)  # a tensor attribute, neither parameter nor buffer: not in a state dict

    def forward(self, x):
        return self.lin(x) + self.mask.sum() + self.buf.sum()


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = _Lin()
        self.scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2).half(), torch.nn.ReLU())

    def forward(self, x):
        return self.blocks(self.sub(x).half()).double() * self.scale


class _ActsOnLoad(torch.nn.Module):
    """Its __setstate__, TorchScript that torch.jit.load runs, zeroes the stored weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.ones(3))

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]):
        self.w = state[0] * 0
        self.training = state[1]

    def forward(self, x):
        return x * self.w


def test_6_torchscript_weights_are_read_without_running_the_archive(tmp_path):
    """Issue 32 (6): TorchScript archives were opened with torch.jit.load, which runs the archive's code. Now
    their parameters and buffers are read from the zip: the same tensors as torch.jit.load's state dict (dtypes,
    strides, no plain tensor attributes); an archive whose state only its own code can restore is refused, and
    loads (running its code) only with the trust opt-in."""
    from evaclip.errors import UnsafeFileError
    from evaclip.safe_load import load_torch

    path = str(tmp_path / "ts.pt")
    torch.jit.script(_Scripted()).save(path)
    ours, ref = load_torch(path, "model.init"), torch.jit.load(path).state_dict()
    assert sorted(ours) == sorted(ref) and "sub.mask" not in ours
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].stride() == v.stride() and torch.equal(ours[k], v), k
    acts = str(tmp_path / "acts.pt")
    torch.jit.script(_ActsOnLoad()).save(acts)
    assert torch.jit.load(acts).state_dict()["w"].eq(0).all()  # its code ran
    with pytest.raises(UnsafeFileError, match=r"acts.pt: TorchScript class .*_ActsOnLoad.* own code.*trust_pickle"):
        load_torch(acts, "model.init")
    assert load_torch(acts, "model.init", trust_pickle=True)["w"].eq(0).all()


def test_17_no_checkpoint_to_roll_back_to_names_what_was_kept_and_both_settings():
    """Issue 32 (17): the advice when a spike has no checkpoint before it named checkpoint.keep_last wrongly (only
    every_steps, or only keep_last, can be the cause depending on the run): it lists the kept steps and both."""
    from evaclip.config import ExperimentConfig
    from evaclip.train.healing import Healing

    cfg = ExperimentConfig().spike
    cfg.enabled = True
    h = Healing(cfg, global_batch=8)
    with pytest.raises(TrainingStopped, match=r"spike at step 9 .*\(kept: 10, 11\).*every_steps.*keep_last"):
        h.targets(9, ["b", "a"], {"a": 10, "b": 11}.get)
    assert h.targets(10, ["b", "a"], {"a": 10, "b": 11}.get) == ["a"]


@pytest.mark.parametrize("workers", [0, 2])
def test_14_7_shards_of_undecodable_images_stop_at_once_with_the_reason_at_any_worker_count(synth_dir, tmp_path,
                                                                                          workers):
    """Issue 32 (14): shards with captions but only undecodable images made `evaclip train` wait silently (the
    batch bound, 10 minutes by default, never reached in the 90 and 300 s tried); (7) with data.workers=2 the
    user saw "Caught TrainingStopped in DataLoader worker process 0", not the reason. Now the run stops after
    UNUSABLE_LIMIT unusable samples in a row with the reason and the skip counts, whatever the worker count."""
    import time

    from tests.test_data import write_shards

    pattern = write_shards(str(tmp_path / "bad"), "b", 2, 20, corrupt={(s, i) for s in range(2) for i in range(20)})
    tr = _trainer(synth_dir, tmp_path, "undecodable", steps=3, extra=[
        'data.recipe=""', f"data.shards={pattern}", f"data.workers={workers}"])
    t0 = time.time()
    with pytest.raises(TrainingStopped) as e:
        tr.train()
    msg = str(e.value)
    assert time.time() - t0 < 60 and "\n" not in msg and "Caught" not in msg, msg
    assert "rank 0 worker" in msg and "are all unusable" in msg and "'decode_error': 64" in msg, msg


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signal_at", ["late", "early", "in_a_decode"])
def test_9_a_signal_during_a_long_skip_ends_it(synth_dir, tmp_path, monkeypatch, signal_at):
    """Issue 32 (9): a huge spike.skip_samples ignored SIGTERM while it skipped. A signal more than STALLED_WAIT_S
    into a skip ends it at once ("late"); one that came earlier ends it once the skip has lasted that long
    ("early"; it used to be forgotten until the skip ended); one landing inside an image decode is not counted as
    a corrupt image ("in_a_decode"; it was, and the skip went on: CI hung here). No checkpoint: a skip is no step."""
    import signal
    import threading
    import time

    from evaclip.data import samples
    from evaclip.train import preemption

    monkeypatch.setattr(preemption, "STALLED_WAIT_S", 2.0)
    tr = _trainer(synth_dir, tmp_path, "skip", steps=3)
    tr.data.open()
    tr.stops.install()
    timer = threading.Timer({"late": 3.0, "early": 0.3}.get(signal_at, 0), os.kill, (os.getpid(), signal.SIGTERM))
    if signal_at == "in_a_decode":
        decode, decoded = samples.decode_image, []

        def decode_then_signal(*a):  # the handler runs inside samples.decode's `except Exception` block
            decoded.append(1)
            if len(decoded) == 50:
                monkeypatch.setattr(preemption, "STALLED_WAIT_S", 0.0)
                os.kill(os.getpid(), signal.SIGTERM)
            return decode(*a)

        monkeypatch.setattr(samples, "decode_image", decode_then_signal)
    try:
        if signal_at != "in_a_decode":
            timer.start()
        t0 = time.time()
        with pytest.raises(TrainingStopped, match=r"received SIGTERM after \d+ s waiting while skipping 1000000000 "):
            tr.data.skip(10 ** 9, tick=tr.stops.check_wait)
        assert time.time() - t0 < 2.0 + 15
        assert tr.data.state.skip_counts().get("decode_error", 0) == 0
    finally:
        timer.cancel()
        tr.stops.restore()
        tr.data.close()


@pytest.mark.parametrize("expr,says", [("score / 0 > 1", "divide by zero"), ("s < 1", "no kernel"),
                                       ("(" * 300 + "score > 1" + ")" * 300, "nested"),
                                       ("not " * 3000 + "score > 1", "characters; at most")])
def test_17_where_expressions_that_fail_are_one_line_errors(expr, says):
    """Issue 32 (17): --where dividing by zero (integer columns), comparing a string with a number, or nested
    too deep ended in a traceback (ArrowInvalid, RecursionError)."""
    import pyarrow as pa

    from evaclip.curation.filter import select
    from evaclip.errors import UserError

    t = pa.table({"score": [1, 2], "s": ["a", "b"]})
    with pytest.raises(UserError, match=says) as e:
        select(t, where=expr)
    assert str(e.value).startswith("--where") and "\n" not in str(e.value)


@pytest.mark.parametrize("edit", ["weight", "source"])
def test_10_a_recipe_edited_before_a_resume_is_refused_with_the_difference(synth_dir, tmp_path, edit):
    """Issue 32 (10): a recipe edited between a checkpoint and its resume was accepted silently (the saved data
    positions then point into other shards) or ended in an IndexError (a source added). Now the resume is refused
    naming data.recipe_sources with the old and new values, and nothing is written to the run."""
    from evaclip.errors import CheckpointError

    recipe = tmp_path / "recipe.toml"
    text = open(os.path.join(synth_dir, "recipe.toml")).read()
    recipe.write_text(text)
    _trainer(synth_dir, tmp_path, "edited", steps=2, extra=[f"data.recipe={recipe}"]).train()
    if edit == "weight":
        recipe.write_text(text + "weight = 2.0\n")
    else:
        recipe.write_text(text + '\n[[source]]\nname = "more"\nshards = "{root}/train/00000.tar"\nsamples = 100\n')
    before = sorted(os.listdir(os.path.join(tmp_path, "edited")))
    with pytest.raises(CheckpointError, match=r"other settings: data.recipe_sources \(\[\[.*\]\] -> \[\[.*\]\]\)"):
        _trainer(synth_dir, tmp_path, "edited", steps=4, extra=[f"data.recipe={recipe}"])
    assert sorted(os.listdir(os.path.join(tmp_path, "edited"))) == before


def test_17_a_full_disk_is_one_line_for_every_command(tmp_path, capsys, monkeypatch):
    """Issue 32 (17): a full disk during data synth / score / filter / export was an OSError traceback. Here on a
    real 1 MiB tmpfs (or, where none can be mounted, the writer patched to raise ENOSPC as a full disk does)."""
    import errno
    import subprocess

    from evaclip import cli

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        from evaclip.data import synth

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(synth, "write_train", full)
    try:
        assert cli.main(["data", "synth", "--out", str(disk / "s"), "--shards", "4", "--per-shard", "500"]) == 2
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    err = [x for x in capsys.readouterr().err.splitlines() if " error: " in x]
    assert len(err) == 1 and "disk full" in err[0] and "No space left on device" in err[0], err
