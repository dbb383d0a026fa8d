# Sourced by train.sbatch and eval.sbatch (not run on its own): what both need inside a Slurm allocation.
# Slurm runs a copy of the batch script from its spool folder, so the scripts find this file through the
# installed evaclip package (its assets), not next to themselves.
#
# Needs: PYTHON, PY_PREFIX (the environment's sys.prefix). Sets: NNODES, NPROC (processes per node), DEVICE (cuda | cpu), MASTER_ADDR / MASTER_PORT (the c10d
# rendezvous on the first node of the allocation), TORCH_EXTENSIONS_DIR, OMP_NUM_THREADS, TORCHRUN (the command
# that starts one node's processes), evaclip_log (one timestamped line in the job log).

declare -F evaclip_log >/dev/null || evaclip_log() { echo "[evaclip-slurm $(date +%H:%M:%S)] $*"; }

NNODES=${SLURM_NNODES:?not inside a Slurm allocation (SLURM_NNODES unset)}

# GPUs when Slurm gave some on this node, otherwise CPU processes over gloo (EVACLIP_PROCS_PER_NODE of them, 1 by
# default). EVACLIP_PROCS_PER_NODE also caps the processes on a GPU node.
_gpus=${SLURM_GPUS_ON_NODE:-0}
if [[ $_gpus == 0 && -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "-1" ]]; then
    _gpus=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")
fi
if (( _gpus > 0 )); then
    DEVICE=cuda
    NPROC=${EVACLIP_PROCS_PER_NODE:-$_gpus}
else
    DEVICE=cpu
    NPROC=${EVACLIP_PROCS_PER_NODE:-1}
fi
# threads per process: the task's CPUs shared by the node's processes, unless the caller set it
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$NPROC}} / NPROC ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

# the rendezvous: the first node of the allocation; a port of this job's own (jobs may share a node)
# (the whole list is read, then cut: `| head -n 1` under `set -o pipefail` fails the script with SIGPIPE (141) when
# scontrol is still writing a long node list as head exits)
_hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${_hosts%%$'\n'*}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
# DeepSpeed JIT-builds its CPU ops on first use: beside the Python environment, as `make setup` does (sbatch runs
# outside make); a shared, writable folder on a real cluster
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PY_PREFIX/torch_extensions}
export NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1  # the job log shows each line when it happens, and keeps it if the job is killed

# one torchrun per node (srun starts it once on each); the rendezvous id is the job id, so a requeued job (same id,
# new processes) meets again without a stale store
TORCHRUN=("$PYTHON" -m torch.distributed.run
          --nnodes "$NNODES"
          --nproc-per-node "$NPROC"
          --rdzv-backend c10d
          --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv-id "${SLURM_JOB_ID:-0}-${SLURM_RESTART_COUNT:-0}")
