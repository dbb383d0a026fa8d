"""Multi-node without Slurm: `torchrun --nnodes 2` as two agents on this machine meeting at a c10d rendezvous on
localhost (what each node of a cluster runs), against one process of the same settings."""
import os
import subprocess
import sys

import pytest

from tests.cluster.conftest import job_env, overrides, same_run
from tests.conftest import REPO
from tests.test_distributed import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_torchrun_two_agents_on_localhost_equal_one_process(synth_dir, reference, tmp_path):
    out, port = str(tmp_path), free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-agents",
           "-m", "evaclip.cli", "train", *overrides(synth_dir, out, "agents", 30, 10), "engine.kind=deepspeed"]
    # which agent hosts the rendezvous store is named, as node 0 is on a cluster: left to torch's guess, both agents
    # on one host race for it, and once (CI, 2026-12-06) both timed out as clients of a store nobody served
    agents = [subprocess.Popen([*cmd[:3], "--rdzv-conf", f"is_host={host}", *cmd[3:]], cwd=REPO, env=job_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for host in (1, 0)]
    try:
        logs = [a.communicate(timeout=600)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert sum(log.count("trained 30 steps") for log in logs) == 1
    same_run(os.path.join(out, "agents"), reference[30], 30)
