#!/usr/bin/env bash
# Single node, one process per GPU, DeepSpeed engine:
#   launch/torchrun.sh launch/experiments/eva02_clip_b16.toml [section.key=value ...]
# NPROC defaults to the number of visible GPUs. Preemption: `touch <run dir>/STOP` (or SIGTERM/SIGUSR1 to the
# workers) makes the run finish its step, checkpoint and exit; rerunning the same command resumes.
set -euo pipefail
EXPERIMENT=${1:?usage: launch/torchrun.sh EXPERIMENT.toml [overrides...]}
shift
NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec torchrun --standalone --nproc-per-node "$NPROC" -m evaclip.cli train "$EXPERIMENT" \
    engine.kind=deepspeed run.device=cuda "$@"
