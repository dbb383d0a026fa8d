"""Peak memory and time of the contrastive loss: naive / local / tiled / ring, one rank of a large job.

Each configuration runs in its own process (``python -m bench.loss_memory '{json}'``) so its peak RSS is
its own. A rank holds b = G / world rows (world = 128 by default, a 16-node x 8-GPU job).

* naive / local / tiled: the gathered features [G, D] (image and text) are the inputs; "above inputs" is
  what the loss forward + backward adds on top of them (it includes their [G, D] gradients, which the
  all-gather backward needs whatever the loss). naive builds G x G logits; it is only run where that fits.
* ring: the inputs are the rank's own rows [b, D]; the other ranks' blocks come from a simulated ring
  (``SimulatedRing``: generated locally, in the order a real ring delivers them, into freshly allocated
  receive buffers as a real receive would). At 1M the ring is truncated to its first ``hops`` hops: the
  memory does not grow with the hop count (one block in flight at a time), and the full-ring time is the
  measured per-hop time x world (stated as such in the results). ``real_ring`` runs a real 4-rank gloo ring
  at a smaller G to check the simulation's memory figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

DIM = 768


def naive_bytes(g: int) -> float:
    """Rough peak of the naive loss: logits, log-softmax both ways and their gradients (4 x G^2 floats)."""
    return 4.0 * g * g * 4


def gathered_bytes(g: int, dim: int) -> float:
    """local / tiled hold the gathered features and their gradients: 4 x G x D fp32."""
    return 4.0 * g * dim * 4


class SimulatedRing:
    """One rank (rank 0) of a ``world``-rank ring, the other ranks' blocks made locally.

    Hop k delivers the block of rank (0 - k) mod world, as a real ring does: each ``start`` allocates the
    receive buffers a real receive would and fills them at memory speed (as a receive writes them) from a
    small pool of other ranks' blocks made beforehand, and holds what it sends until ``finish`` (as
    ``evaclip.dist.Ring`` does: an asynchronous send reads its buffer). ``hops`` < world truncates the ring
    (the loss then covers hops x b columns; the memory and the time per hop are those of the full ring)."""

    def __init__(self, world: int, hops: int, pool):
        self.rank, self.world, self.hop, self.pool = 0, (hops or world), 0, pool

    def start(self, tensors):
        import torch

        self.hop += 1
        bufs = [torch.empty_like(t).copy_(self.pool[(self.hop + i) % len(self.pool)]) for i, t in enumerate(tensors)]
        return bufs, list(tensors)

    def finish(self, pending):
        return pending[0]


def child(args):
    import torch
    import torch.nn.functional as F

    from bench.common import peak_rss_mb, reset_peak_rss, rss_mb, timeit
    from evaclip.losses import clip_loss_local, clip_loss_naive, clip_loss_ring, clip_loss_tiled

    torch.manual_seed(0)
    torch.set_num_threads(args.get("threads", 2))
    g, world, impl, dim = args["global_batch"], args["world"], args["impl"], args.get("dim", DIM)
    b, tile = g // world, args.get("tile", 4096)
    if impl == "ring":
        img_loc = F.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
        txt_loc = F.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
        pool = [F.normalize(torch.randn(b, dim), dim=-1) for _ in range(3)]  # stands for the other ranks' rows
    else:
        img = F.normalize(torch.randn(g, dim), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(g, dim), dim=-1).requires_grad_()
        # A rank's own rows are separate leaves, as after a real all-gather-with-grad: slicing the gathered
        # leaf instead would make autograd add a second [G, D] gradient for the slice's backward.
        img_loc = img[:b].detach().clone().requires_grad_()
        txt_loc = txt[:b].detach().clone().requires_grad_()
    scale = torch.tensor([14.0], requires_grad=True)
    base = rss_mb()
    reset = reset_peak_rss()
    hops = args.get("hops", 0)

    def step():
        img_loc.grad = txt_loc.grad = scale.grad = None
        if impl == "ring":
            loss = clip_loss_ring(img_loc, txt_loc, scale, tile=tile, ring=SimulatedRing(world, hops, pool))
        else:
            img.grad = txt.grad = None
            if impl == "naive":
                loss = clip_loss_naive(img, txt, scale)
            elif impl == "local":
                loss = clip_loss_local(img_loc, txt_loc, img, txt, scale, 0)
            else:
                loss = clip_loss_tiled(img_loc, txt_loc, img, txt, scale, 0, tile=tile)
        loss.backward()

    t = timeit(step, reps=args.get("reps", 5), warmup=1)
    peak = peak_rss_mb()
    out = {"time": t, "peak_rss_mb": peak, "inputs_mb": base, "above_inputs_mb": peak - base, "peak_reset": reset}
    if impl == "ring" and hops:
        out["hops"] = hops
        out["full_ring_s"] = t["median"] / hops * world  # measured per hop x the hops of the full ring
    return out


def real_ring_child(args):
    """One rank of a real gloo ring (under torchrun): peak RSS above its own rows, forward + backward."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from bench.common import peak_rss_mb, reset_peak_rss, rss_mb, timeit
    from evaclip.losses import clip_loss_ring

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    g, dim, tile = args["global_batch"], args.get("dim", DIM), args.get("tile", 4096)
    world = dist.get_world_size()
    b = g // world
    gen = torch.Generator().manual_seed(dist.get_rank())
    img = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor([14.0], requires_grad=True)
    dist.barrier()
    base = rss_mb()
    reset_peak_rss()

    def step():
        img.grad = txt.grad = scale.grad = None
        clip_loss_ring(img, txt, scale, tile=tile).backward()

    t = timeit(step, reps=args.get("reps", 2), warmup=1)
    res = {"rank": dist.get_rank(), "time": t, "above_inputs_mb": peak_rss_mb() - base}
    out = [None] * world
    dist.all_gather_object(out, res)
    if dist.get_rank() == 0:
        print(json.dumps({"world": world, "global_batch": g, "dim": dim, "local_batch": b, "ranks": out}))
    dist.destroy_process_group()


def real_ring(global_batch: int = 16384, world: int = 4, dim: int = DIM, reps: int = 2) -> dict:
    """A real ``world``-rank gloo ring at ``global_batch`` and the simulated ring at the same b and G."""
    from bench.common import REPO, run_child

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(_free_port()), "-m", "bench.loss_memory", "--real-ring",
           json.dumps({"global_batch": global_batch, "dim": dim, "reps": reps})]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-1500:]}
    real = json.loads(r.stdout.strip().splitlines()[-1])
    sim = run_child("loss_memory", {"global_batch": global_batch, "world": world, "impl": "ring", "dim": dim,
                                    "reps": reps, "threads": 1})
    return {"real": real, "simulated": sim}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(reps: int = 5, sizes=(16384, 65536, 131072), world: int = 128, mem_limit_gb: float = 12.0,
        large=((131072, 1024, 0), (1048576, 768, 2), (1048576, 1024, 2)), real=(8192, 4)):
    """The naive / local / tiled / ring table at D = 768, then ring against tiled at the large sizes
    (``large``: (G, D, hops of the simulated ring; 0 = the full ring)), then the real-ring check."""
    from bench.common import run_child

    rows = []

    def one(g, impl, dim, hops=0, r=reps):
        need = naive_bytes(g) if impl == "naive" else gathered_bytes(g, dim) if impl in ("local", "tiled") else 0
        if need / 2 ** 30 >= mem_limit_gb:
            what = "G x G logits" if impl == "naive" else "the gathered features and their gradients"
            rows.append({"global_batch": g, "dim": dim, "impl": impl, "skipped": f"needs >= {need / 2 ** 30:.0f} GiB ({what})"})
            return
        args = {"global_batch": g, "world": world, "impl": impl, "reps": r, "dim": dim, "hops": hops}
        rows.append({"global_batch": g, "dim": dim, "impl": impl, "world": world, "local_batch": g // world,
                     **run_child("loss_memory", args, timeout=7200)})

    for g in sizes:
        for impl in ("naive", "local", "tiled", "ring"):
            one(g, impl, DIM)
    for g, dim, hops in large:
        for impl in ("tiled", "ring"):
            if (g, dim) == (sizes[-1], DIM) and impl == "tiled":
                continue  # measured above
            one(g, impl, dim, hops, r=min(reps, 3) if hops == 0 else min(reps, 2))
    return {"rows": rows, "real_ring": real_ring(*real, reps=2) if real else None}


if __name__ == "__main__":
    if sys.argv[1] == "--real-ring":
        real_ring_child(json.loads(sys.argv[2]))
    else:
        print(json.dumps(child(json.loads(sys.argv[1]))))
