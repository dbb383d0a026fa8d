"""Launch scripts rendered with a fake Slurm environment; preemption by signal and by STOP file; a kill
during a checkpoint save leaves the previous checkpoint as latest."""
import os
import shlex
import signal
import subprocess
import sys

import pytest

from evaclip.checkpoint import latest_checkpoint
from tests.conftest import REPO, tiny_overrides, wait_for
from tests.test_train import make_trainer


def _fake_slurm_env(tmp_path, nodes=4, gpus=8):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # `scontrol show hostnames node[001-004]` -> one name per line, like the real one
    scontrol.write_text("#!/usr/bin/env bash\n[ \"$1 $2\" = \"show hostnames\" ] || exit 1\n"
                        f"for i in $(seq 1 {nodes}); do printf 'gpu-node%03d\\n' $i; done\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               SLURM_JOB_ID="4242", SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=f"gpu-node[001-00{nodes}]",
               EVACLIP_DRY_RUN="1", PYTHON=sys.executable)
    for k in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "EVACLIP_PROCS_PER_NODE", "MASTER_PORT"):
        env.pop(k, None)
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    return env


def _opt(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_train_sbatch_renders_the_torchrun_command(tmp_path):
    """On a GPU allocation: one torchrun per node, a process per GPU, cuda, the rendezvous on the first node."""
    env = _fake_slurm_env(tmp_path, nodes=4)
    r = subprocess.run(["bash", "launch/slurm/train.sbatch", "launch/experiments/eva02_clip_b16.toml",
                        "run.name=b16_test", "optim.lr=3e-4"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "run_dir: runs/b16_test"
    cmd = shlex.split(lines[1])
    assert cmd[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[3:6] == [sys.executable, "-m", "torch.distributed.run"]
    assert _opt(cmd, "--nnodes") == "4" and _opt(cmd, "--nproc-per-node") == "8"
    # the port is the job's own (20000 + job id % 20000): two jobs sharing a node do not collide
    assert _opt(cmd, "--rdzv-backend") == "c10d" and _opt(cmd, "--rdzv-endpoint") == "gpu-node001:24242"
    assert _opt(cmd, "--rdzv-id") == "4242-0"
    tail = cmd[cmd.index("evaclip.cli") - 1:]
    assert tail[:4] == ["-m", "evaclip.cli", "train", "launch/experiments/eva02_clip_b16.toml"]
    assert "engine.kind=deepspeed" in tail and "run.device=cuda" in tail
    assert "run.name=b16_test" in tail and "optim.lr=3e-4" in tail
    # the global batch is micro x ranks: 2048 x 32 ranks here; the recipe's 131,072 on its 64 GPUs
    for world, batch in [(32, 65536), (64, 131072)]:
        d = subprocess.run([sys.executable, "-m", "evaclip.cli", "train", "eva02_clip_b16", "--dry-run",
                            "--world-size", str(world)], cwd=REPO, capture_output=True, text=True)
        assert f"global batch {batch}" in d.stdout, d.stderr


def test_train_sbatch_on_a_cpu_allocation_runs_cpu_processes(tmp_path):
    """No GPUs in the allocation: EVACLIP_PROCS_PER_NODE CPU processes (1 by default) with run.device=cpu."""
    env = _fake_slurm_env(tmp_path, nodes=2, gpus=0)
    for procs, want in [(None, "1"), ("3", "3")]:
        e = dict(env, **({"EVACLIP_PROCS_PER_NODE": procs} if procs else {}))
        r = subprocess.run(["bash", "launch/slurm/train.sbatch", "demo_cpu"], cwd=REPO, env=e, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        cmd = shlex.split(r.stdout.strip().splitlines()[1])
        assert _opt(cmd, "--nproc-per-node") == want and "run.device=cpu" in cmd and _opt(cmd, "--nnodes") == "2"


def test_train_sbatch_on_a_long_node_list_takes_the_first_node(tmp_path):
    """A node list longer than a pipe's buffer: the rendezvous is the first node and the script exits 0 (a
    `scontrol ... | head -n 1` under pipefail failed with SIGPIPE, 141, when scontrol was still writing)."""
    env = _fake_slurm_env(tmp_path, nodes=12000, gpus=0)
    r = subprocess.run(["bash", "launch/slurm/train.sbatch", "demo_cpu"], cwd=REPO, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[1])
    assert _opt(cmd, "--rdzv-endpoint") == "gpu-node001:24242" and _opt(cmd, "--nnodes") == "12000"


def test_eval_sbatch_renders(tmp_path):
    env = _fake_slurm_env(tmp_path, nodes=1)
    r = subprocess.run(["bash", "launch/slurm/eval.sbatch", "runs/x", "eval/suites/retrieval.toml", "/data/cb"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip())
    assert cmd[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    tail = cmd[cmd.index("evaclip.cli") - 1:]
    assert tail[:3] == ["-m", "evaclip.cli", "eval"] and _opt(cmd, "--nproc-per-node") == "8"
    assert _opt(cmd, "--suite") == "eval/suites/retrieval.toml"
    assert _opt(cmd, "--datasets-root") == "/data/cb" and _opt(cmd, "--device") == "cuda"
    assert _opt(cmd, "--precision") == "bf16" and _opt(cmd, "--out") == "runs/x/eval-retrieval"


def _steps_logged(run):
    p = os.path.join(run, "metrics.jsonl")
    return sum(1 for line in open(p) if "train/loss" in line) if os.path.exists(p) else 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGUSR1", "STOP file"])
def test_preemption_saves_and_exits_for_requeue(synth_dir, tmp_path, how):
    run = tmp_path / "pre"
    args = [sys.executable, "-m", "evaclip.cli", "train", os.path.join(REPO, "launch/experiments/demo_cpu.toml"),
            *tiny_overrides(synth_dir, str(tmp_path), "pre", steps=500)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: _steps_logged(str(run)) >= 2), "training did not start"
    if how == "STOP file":
        (run / "STOP").write_text("")
    else:
        proc.send_signal(getattr(signal, how))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 85, out[-2000:]
    latest = latest_checkpoint(str(run))
    step = int(os.path.basename(latest).split("-")[1])
    assert step >= 2 and (run / "REQUEUE").exists() and not (run / "STOP").exists()
    # the requeued job resumes from that checkpoint
    tr = make_trainer(synth_dir, tmp_path, "pre", steps=500)
    assert tr.state.step == step and not (run / "REQUEUE").exists()


def test_kill_during_save_keeps_previous_latest(synth_dir, tmp_path):
    tr = make_trainer(synth_dir, tmp_path, "ks", steps=4, extra=["checkpoint.every_steps=2"])
    tr.engine.train(True)
    for _ in range(2):
        tr.train_step([tr.data.next_batch()])
        tr.state.step += 1
    first = tr.save()
    assert latest_checkpoint(tr.run_dir) == first
    tr.train_step([tr.data.next_batch()])
    tr.state.step += 1

    real_save = tr.engine.save

    def dying_save(path):  # the engine writes part of its files, then the process dies
        real_save(path)
        raise KeyboardInterrupt("killed during save")

    tr.engine.save = dying_save
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    assert latest_checkpoint(tr.run_dir) == first
    leftovers = [d for d in os.listdir(os.path.join(tr.run_dir, "checkpoints")) if d.startswith(".tmp-")]
    assert leftovers  # the partial save is there, never promoted
    tr.engine.save = real_save
    second = tr.save()  # the next save succeeds and cleans the leftovers
    assert latest_checkpoint(tr.run_dir) == second and second.endswith("step-00000003")
    assert not [d for d in os.listdir(os.path.join(tr.run_dir, "checkpoints")) if d.startswith(".tmp-")]


def test_deepspeed_in_one_plain_process_trains(synth_dir, tmp_path):
    """`evaclip train EXP engine.kind=deepspeed` started without torchrun (as a user first tries DeepSpeed): the
    run makes its own one-process group; it used to die in DeepSpeed's MPI discovery (no mpi4py)."""
    from tests.conftest import run_cli

    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ  # a plain process, not under torchrun
    r = run_cli(["train", "demo_cpu", *tiny_overrides(synth_dir, str(tmp_path), "ds1", steps=2),
                 "engine.kind=deepspeed"], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest_checkpoint(str(tmp_path / "ds1")).endswith("step-00000002")
