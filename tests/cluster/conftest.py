"""The cluster tier (`make test-cluster`): a real two-node Slurm on this machine (launch/slurm/local_cluster.sh), jobs
submitted with sbatch, and torchrun with two agents. Every run is compared with one process of the same settings:
the same sample keys in every step and final weights within 1e-5 (fp32, LAMB lr 1e-4 / eps 1e-3, no clipping)."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, wait_for
from tests.test_train import step_keys

CLUSTER = os.path.join(REPO, "launch", "slurm", "local_cluster.sh")
TRAIN_SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")
EVAL_SBATCH = os.path.join(REPO, "launch", "slurm", "eval.sbatch")
# the acceptance run: demo_cpu, 4 logical streams, 50% token dropping, keys logged; exact-comparison optimizer
# settings; global batch 32 (2 nodes x micro 16, or 1 process x micro 32)
TOPO = ["data.streams=4", "model.vision.patch_dropout=0.5", "data.log_keys=true", "data.workers=1",
        'eval.suite=""', "optim.lr=1e-4", "optim.eps=1e-3", "engine.grad_clip=0", "log.progress=false",
        "log.plot=false", "log.tensorboard=false"]
LONG, LONG_MICRO = 60, 32  # the interrupted runs: 60 steps of 2 nodes x 32 samples
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def overrides(synth_dir: str, out: str, name: str, steps: int, every: int, micro: int = 16, zero: bool = True):
    """The experiment and overrides of a job (DeepSpeed ZeRO-2; ``zero=False`` for the plain reference)."""
    return ["demo_cpu", *(["engine.zero_stage=2"] if zero else []), f"run.output_dir={out}", f"run.name={name}",
            f"run.steps={steps}", f"checkpoint.every_steps={every}", f'data.recipe="{os.path.join(synth_dir, "recipe.toml")}"',
            f'data.root="{synth_dir}"', f"data.micro_batch_size={micro}", *TOPO]


def job_env(**extra) -> dict:
    """What sbatch passes on to the job (--export=ALL): this Python, one thread per process (two 'nodes' share
    two cores)."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    for k in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_GPUS_ON_NODE", "EVACLIP_DRY_RUN"):
        env.pop(k, None)
    return env


def sbatch(args, cwd, env=None) -> int:
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or job_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().split(";")[0])


def job_info(jid: int) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def job_log(cwd, jid: int) -> str:
    p = os.path.join(cwd, f"evaclip-{jid}.out")
    if not os.path.exists(p):
        p = os.path.join(cwd, f"evaclip-eval-{jid}.out")
    return open(p).read() if os.path.exists(p) else ""


def wait_job(jid: int, cwd, timeout: float = 300.0, until=None) -> dict:
    """Poll until the job is in a final state (or ``until(info)`` holds); after ``timeout`` seconds cancel it and
    fail with the job log's tail."""
    info = {}

    def done() -> bool:
        info.clear()
        info.update(job_info(jid))
        return until(info) if until is not None else info.get("JobState") in FINAL

    if wait_for(done, timeout, every=0.5):
        return info
    subprocess.run(["scancel", str(jid)], timeout=30)
    raise AssertionError(f"job {jid} not done within {timeout:.0f} s (state {info.get('JobState')}); "
                         f"log:\n{job_log(cwd, jid)[-4000:]}")


def same_run(run_dir: str, ref_dir: str, steps: int) -> None:
    """The same samples in every step and final weights within 1e-5."""
    from evaclip.checkpoint import load_weights

    got, want = step_keys(run_dir), step_keys(ref_dir)
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    assert got == want, [s for s in want if got.get(s) != want[s]][:5]
    a, _ = load_weights(run_dir)
    b, _ = load_weights(ref_dir)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
    assert diff <= 1e-5, diff


def resumed_steps(log: str):
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]


def eval_metrics(out_dir: str) -> dict:
    return {os.path.basename(p): json.load(open(p))["metrics"] for p in sorted(glob.glob(os.path.join(out_dir, "*.json")))}


@pytest.fixture(scope="session")
def slurm():
    """The two-node cluster: brought up once (and down at the end if this session started it)."""
    was_up = bool(shutil.which("sinfo")) and subprocess.run(["sinfo", "-h"], capture_output=True,
                                                            timeout=30).returncode == 0
    r = subprocess.run(["bash", CLUSTER, "up"], capture_output=True, text=True, timeout=600)
    if r.returncode in (4, 5):  # not root / the packages cannot be installed here: the one reason to skip
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    if not was_up:
        subprocess.run(["bash", CLUSTER, "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def reference(synth_dir, tmp_path_factory):
    """One plain process with the 2-node runs' global batch: {steps: run dir}. 30 steps of 32 samples (the
    acceptance run), and the LONG run the signal tests interrupt: it must outlast Slurm's first time-limit check,
    30 s after a job starts, on any machine."""
    out = str(tmp_path_factory.mktemp("ref"))
    runs = {}
    for steps, every, micro in ((30, 10, 32), (LONG, 10, 2 * LONG_MICRO)):
        args = overrides(synth_dir, out, f"ref{steps}", steps, every, micro=micro, zero=False)
        r = subprocess.run([sys.executable, "-m", "evaclip.cli", "train", *args, "engine.kind=torch"], cwd=REPO,
                           env=job_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        runs[steps] = os.path.join(out, f"ref{steps}")
    return runs
