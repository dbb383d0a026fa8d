"""Process-group helpers: rank/world from torchrun or Slurm, init, and all-gather with gradient."""
from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

from evaclip.errors import TrainingStopped


def env_world() -> tuple:
    """(rank, local_rank, world_size) from torchrun's env, else Slurm's (one task per GPU), else (0, 0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0)), int(os.environ["SLURM_NTASKS"])
    return 0, 0, 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend() -> Optional[str]:
    """The default process group's backend ("gloo", "nccl"), None without one."""
    return dist.get_backend() if is_initialized() else None


def backend_for(device_type: str) -> str:
    """The backend a run on ``device_type`` ("cuda", "cpu") initialises: nccl on GPU, gloo on CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


_MONITOR = None  # a gloo group for monitored barriers (NCCL has none); the default group under gloo
_COLLECTIVE_TIMEOUT_S = 1800.0


def init_distributed(device: torch.device, timeout_min: int = 180, collective_timeout_s: float = 1800.0,
                     single: bool = False) -> None:
    """Initialise the default process group when launched with several processes (nccl on GPU, gloo on CPU);
    ``single``: also for one process (DeepSpeed needs a group, and left to find one itself in a plain process
    it tries MPI discovery and dies on a missing mpi4py), on a free local port unless MASTER_PORT is set.

    ``collective_timeout_s`` bounds the barriers after rank-local work (eval, checkpoints, the end of the
    run): a rank that does not arrive makes the others stop with a message naming it, instead of waiting
    for the process group's three-hour default."""
    global _MONITOR, _COLLECTIVE_TIMEOUT_S
    _COLLECTIVE_TIMEOUT_S = float(collective_timeout_s)
    r, local, w = env_world()
    if (w == 1 and not single) or is_initialized():
        return
    if w == 1 and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "MASTER_ADDR" not in os.environ:  # Slurm without torchrun: the first node of the job is the master
        os.environ["MASTER_ADDR"] = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(r))
    os.environ.setdefault("WORLD_SIZE", str(w))
    os.environ.setdefault("LOCAL_RANK", str(local))
    backend = backend_for(device.type)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min))
    _MONITOR = dist.new_group(backend="gloo") if backend != "gloo" else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RANKS_RE = re.compile(r"[Rr]anks? ([\d, ]+) failed to pass monitoredBarrier")


def barrier(what: str = "a barrier", timeout_s: Optional[float] = None) -> None:
    """Wait for every rank, at most ``timeout_s`` (default: ``collective_timeout_s``); a rank that does not
    arrive stops this one with ``TrainingStopped`` naming ``what`` was awaited and the missing rank(s)."""
    if not is_initialized() or dist.get_world_size() == 1:  # one process (a group DeepSpeed made included)
        return
    t = float(timeout_s or _COLLECTIVE_TIMEOUT_S)
    try:
        dist.monitored_barrier(group=_MONITOR, timeout=timedelta(seconds=t), wait_all_ranks=True)
    except RuntimeError as e:
        m = _RANKS_RE.search(str(e))
        who = f"rank {m.group(1).strip()}" if m else ("rank 0" if rank() != 0 else "a rank")
        raise TrainingStopped(f"{what}: {who} did not arrive within {t:g} s (this is rank {rank()}; "
                              "run.collective_timeout_s bounds the wait); see that rank's log") from None


def shutdown() -> None:
    """Leave the job cleanly: wait for every rank (bounded), then destroy the process groups. Exiting with a
    live gloo group can abort the process in its background threads ("terminate called without an active
    exception"), turning a finished run into a non-zero exit code."""
    if is_initialized():
        barrier("the end of the run")
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the summed gradients.

    Every rank's loss may depend on every rank's features, so the gradient of a local feature is the
    sum over ranks of the gradients of its gathered copies: reduce-scatter where the backend has it
    (NCCL), all-reduce + slice otherwise (gloo).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world * b, ...] (rank-major), differentiable."""
    if not is_initialized() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_objects(obj) -> List:
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t)
    return t


class Ring:
    """Neighbour exchange around the ranks: send tensors to rank + 1, receive same-shaped ones from rank - 1.

    ``start`` posts the sends and receives (batched, so NCCL pairs them and two ranks never deadlock on each
    other's send) and returns at once, so the caller can compute while the blocks travel; ``finish`` waits
    (bounded by the process group's timeout) and returns the received tensors. One process: world 1, no
    messages. The ring losses take any object with this interface (the benchmark passes a simulated ring)."""

    def __init__(self):
        self.rank, self.world = (rank(), world_size()) if is_initialized() else (0, 1)

    def start(self, tensors: List[torch.Tensor]):
        if self.world == 1:  # the ring of one: what is sent comes straight back
            return [], list(tensors), None
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        sent = [t.contiguous() for t in tensors]  # held until finish: a send reads its buffer asynchronously
        bufs = [torch.empty_like(t) for t in sent]
        ops = ([dist.P2POp(dist.isend, t, nxt, tag=i) for i, t in enumerate(sent)]
               + [dist.P2POp(dist.irecv, b, prev, tag=i) for i, b in enumerate(bufs)])
        return dist.batch_isend_irecv(ops), bufs, sent

    def finish(self, pending) -> List[torch.Tensor]:
        works, bufs, _sent = pending
        for w in works:
            w.wait()
        return bufs
