"""sbatch on a real two-node Slurm (nodes n1, n2 on this machine; DeepSpeed ZeRO-2 over gloo, one CPU process per
node): a whole job, a pre-timeout signal with automatic requeue, the requeue cap, a hard kill and a TERM with
resubmission, a 2-node checkpoint resumed on 1 node, and sharded evaluation. Each training job is compared with one
process of the same settings (tests/cluster/conftest.py: same keys per step, weights within 1e-5)."""
import os
import re
import subprocess

import pytest

from tests.cluster.conftest import (EVAL_SBATCH, LONG, LONG_MICRO, TRAIN_SBATCH, eval_metrics, job_env, job_log, overrides,
                                    resumed_steps, same_run, sbatch, wait_job)
from tests.conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_two_node_sbatch_equals_one_process(slurm, synth_dir, reference, tmp_path):
    """`sbatch --nodes 2 train.sbatch demo_cpu run.steps=30 data.streams=4 ...`: completes, same as 1 process."""
    out = str(tmp_path)
    jid = sbatch(["--nodes", "2", TRAIN_SBATCH, *overrides(synth_dir, out, "two", 30, 10)], cwd=out)
    info = wait_job(jid, out)
    log = job_log(out, jid)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "2 node(s) x 1 cpu process(es)" in log and "trained 30 steps" in log
    assert log.count("trained 30 steps") == 1, "only rank 0 prints the summary"
    same_run(os.path.join(out, "two"), reference[30], 30)


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, synth_dir, reference, tmp_path):
    """A 1-minute job with --signal=B:USR1@60: Slurm's pre-timeout signal comes at its first time-limit check, the
    run checkpoints, writes REQUEUE, the script requeues the job and the requeued job resumes and completes, the
    same as the uninterrupted run. Once requeued, the test lengthens the job's limit (scontrol update), so a slow
    machine does not need a requeue per minute."""
    out = str(tmp_path)
    jid = sbatch(["--nodes", "2", "--time=1", "--signal=B:USR1@60", TRAIN_SBATCH,
                  *overrides(synth_dir, out, "sig", LONG, 10, LONG_MICRO)], cwd=out)
    info = wait_job(jid, out, until=lambda i: int(i.get("Restarts", 0)) >= 1 or i.get("JobState") in
                    ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"))
    assert int(info.get("Restarts", 0)) == 1, job_log(out, jid)[-4000:]
    subprocess.run(["scontrol", "update", f"JobId={jid}", "TimeLimit=10"], check=True, timeout=30)
    info = wait_job(jid, out, timeout=400)
    log = job_log(out, jid)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert open(os.path.join(out, "sig", "slurm_requeues.log")).read().split()[:2] == [str(jid), "timeout"]
    # one line each: signal received, checkpoint N saved, REQUEUE written, requeued, resumed from N
    [n] = resumed_steps(log)
    assert log.count("signal received: USR1 (timeout") == 1
    assert len(re.findall(rf"checkpoint: \S+/step-{n:08d}\n", log)) == 1
    assert log.count(f"REQUEUE written by the run: step {n}:") == 1
    assert log.count(f"requeued job {jid} after its time limit (1 of 3)") == 1
    same_run(os.path.join(out, "sig"), reference[LONG], LONG)


def test_requeue_cap_and_a_two_node_checkpoint_resumed_on_one_node(slurm, synth_dir, reference, tmp_path):
    """With EVACLIP_MAX_TIMEOUT_REQUEUES=0 the signalled job checkpoints but is not requeued (the log says why);
    an `sbatch --nodes 1` job (micro-batch 32: the same global batch) resumes the 2-node checkpoint: same result."""
    out = str(tmp_path)
    jid = sbatch(["--nodes", "2", "--time=1", "--signal=B:USR1@60", TRAIN_SBATCH,
                  *overrides(synth_dir, out, "cap", LONG, 10, LONG_MICRO)], cwd=out,
                 env=job_env(EVACLIP_MAX_TIMEOUT_REQUEUES="0"))
    info = wait_job(jid, out, timeout=200)
    log = job_log(out, jid)
    assert info["Restarts"] == "0" and info["JobState"] == "FAILED", log[-4000:]
    assert "not requeued: this job was already requeued 0 time(s) after its time limit" in log
    stopped = int(open(os.path.join(out, "cap", "REQUEUE")).read().split()[1].rstrip(":"))
    assert 0 < stopped < LONG
    one = sbatch(["--nodes", "1", TRAIN_SBATCH, *overrides(synth_dir, out, "cap", LONG, 10, 2 * LONG_MICRO)],
                 cwd=out)
    info = wait_job(one, out, timeout=300)
    log = job_log(out, one)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "1 node(s) x 1 cpu process(es)" in log and resumed_steps(log) == [stopped]
    assert "written by 2 ranks" in log
    same_run(os.path.join(out, "cap"), reference[LONG], LONG)


def kill_9_job(out: str, name: str) -> None:
    """SIGKILL every process of the run on both nodes at once, as a node failure or the OOM killer does. (Not
    `scancel --signal=KILL`: Slurm 22.05 handles that as a cancel, TERM first and KILL after KillWait, and the run
    saves; tested here as the TERM case.)"""
    import psutil

    def ours(cmd):
        return "evaclip.cli" in cmd and f"run.output_dir={out}" in cmd and f"run.name={name}" in cmd

    procs = [p for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])]
    assert procs, "no process of the run found"
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_hard_kill_and_term_then_resubmission(slurm, synth_dir, reference, tmp_path):
    """Every process of the job SIGKILLed after the step-20 checkpoint: resubmitted, the job resumes at 20 (it loses
    only the steps since). `scancel --signal=TERM` mid-run: the run saves where it is and the job does not requeue itself;
    resubmitted, it resumes from that newest checkpoint. The result equals the uninterrupted run's."""
    out = str(tmp_path)
    args = ["--nodes", "2", TRAIN_SBATCH, *overrides(synth_dir, out, "kt", LONG, 10, LONG_MICRO)]
    ck = os.path.join(out, "kt", "checkpoints")
    jid = sbatch(args, cwd=out)
    wait_job(jid, out, timeout=300, until=lambda i: os.path.isdir(os.path.join(ck, "step-00000020"))
             or i.get("JobState") in ("COMPLETED", "FAILED"))
    kill_9_job(out, "kt")
    wait_job(jid, out, timeout=120)
    assert not os.path.exists(os.path.join(ck, "step-00000030")), "the job was not killed between its checkpoints"

    jid = sbatch(args, cwd=out)
    wait_job(jid, out, timeout=300, until=lambda i: os.path.isdir(os.path.join(ck, "step-00000040"))
             or i.get("JobState") in ("COMPLETED", "FAILED"))
    subprocess.run(["scancel", "--signal=TERM", str(jid)], check=True, timeout=30)
    info = wait_job(jid, out, timeout=120)
    log = job_log(out, jid)
    assert resumed_steps(log) == [20], log[-4000:]
    assert info["Restarts"] == "0" and "not requeued (stopped by a TERM or a STOP file)" in log, log[-4000:]
    stopped = int(open(os.path.join(out, "kt", "REQUEUE")).read().split()[1].rstrip(":"))
    assert 40 <= stopped < LONG

    jid = sbatch(args, cwd=out)
    info = wait_job(jid, out, timeout=300)
    log = job_log(out, jid)
    assert info["JobState"] == "COMPLETED" and resumed_steps(log) == [stopped], log[-4000:]
    same_run(os.path.join(out, "kt"), reference[LONG], LONG)


def test_eval_sbatch_on_two_nodes_equals_one_process_eval(slurm, synth_dir, reference, tmp_path):
    """eval.sbatch on 2 nodes (each rank a share of every set) gives exactly the metrics of one `evaclip eval`."""
    out = str(tmp_path)
    zs = os.path.join(synth_dir, "zeroshot")
    r = subprocess.run([job_env()["PYTHON"], "-m", "evaclip.cli", "eval", "--checkpoint", reference[30], "--suite",
                        "quick", "--datasets-root", zs, "--out", os.path.join(out, "one"), "--device", "cpu",
                        "--batch-size", "64"],
                       cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jid = sbatch(["--nodes", "2", EVAL_SBATCH, reference[30], "quick", zs], cwd=out,
                 env=job_env(EVACLIP_EVAL_OUT=os.path.join(out, "two"), EVACLIP_EVAL_BATCH="64"))
    info = wait_job(jid, out, timeout=300)
    assert info["JobState"] == "COMPLETED", job_log(out, jid)[-4000:]
    one, two = eval_metrics(os.path.join(out, "one")), eval_metrics(os.path.join(out, "two"))
    assert one and one == two
    assert "2 node(s) x 1 cpu process(es)" in job_log(out, jid)

