"""Shared fixtures: tiny synthetic shards and zero-shot sets made locally (no downloads), tiny configs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import evaclip  # noqa: F401  (installs the CPU import hooks before timm / open_clip are imported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".venv", "torch_extensions"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run where the device tool lends one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """4 shards x 64 samples at 64 px + small zero-shot sets (seconds)."""
    from evaclip.data import synth

    out = str(tmp_path_factory.mktemp("synth"))
    synth.write_all(out, shards=4, per_shard=64, image_size=64, seed=1, eval_per_class=2, retrieval_images=24)
    return out


def tiny_overrides(synth_dir: str, run_dir_parent: str, name: str = "t", steps: int = 4, extra=()):
    """Overrides that turn the demo experiment into a seconds-long test run."""
    return [
        f"run.output_dir={run_dir_parent}", f"run.name={name}", f"run.steps={steps}",
        f'data.recipe="{os.path.join(synth_dir, "recipe.toml")}"', f'data.root="{synth_dir}"',
        "data.micro_batch_size=8", "data.workers=0", "data.shuffle_buffer=16",
        "schedule.warmup_steps=1", "checkpoint.every_steps=1000", "log.every_steps=1", "log.progress=false",
        "log.tensorboard=false", "log.plot=false",
        'eval.suite=""', *extra,
    ]


def run_cli(args, cwd=REPO, env=None, timeout=600):
    """Run ``python -m evaclip.cli ...`` in a fresh process; returns CompletedProcess."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "evaclip.cli", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def mcfg(name: str = "EVA02-Ti-8-64", patch_dropout: float = 0.0, attn_impl: str = "sdpa"):
    """A ``[model]`` config section for ``create_model`` with the two knobs tests vary."""
    from evaclip.config import ModelConfig, VisionConfig

    return ModelConfig(name=name, vision=VisionConfig(patch_dropout=patch_dropout, attn_impl=attn_impl))


def preempt_during(trainer, step: int) -> None:
    """Make ``trainer`` receive a SIGTERM during optimizer step ``step`` (as Slurm's preemption would)."""
    import signal

    step_fn = trainer.train_step

    def wrapped(micro):
        out = step_fn(micro)
        if trainer.state.step == step - 1:
            trainer.stops.signal = signal.SIGTERM
        return out

    trainer.train_step = wrapped


def wait_for(pred, timeout=120.0, every=0.1) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` seconds pass (False)."""
    import time

    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        time.sleep(every)
    return False


@pytest.fixture(scope="session")
def mim_teacher(tmp_path_factory):
    """A MIM teacher: an (untrained, seeded) EVA02-Ti-8-64 CLIP exported as an evaclip / open_clip folder."""
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import create_model, model_record

    torch.manual_seed(123)
    model = create_model(mcfg())
    out = str(tmp_path_factory.mktemp("teacher") / "export")
    export_open_clip(model.state_dict(), model_record(mcfg()), out)
    return out
