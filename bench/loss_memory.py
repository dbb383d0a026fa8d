"""Peak memory and time of the CLIP loss: naive vs local vs tiled, one process simulating a world size.

Each configuration runs in its own process (``python -m bench.loss_memory '{json}'``) so its peak RSS is
its own. The gathered features [G, 768] (image and text) are the inputs; "above inputs" is the peak the
loss forward + backward adds on top of them. A rank holds b = G / world rows (world = 128 by default, a
16-node x 8-GPU job). naive builds G x G logits; it is only run where that fits in memory.
"""
from __future__ import annotations

import json
import sys

DIM = 768


def naive_bytes(g: int) -> float:
    """Rough peak of the naive loss: logits, log-softmax both ways and their gradients (4 x G^2 floats)."""
    return 4.0 * g * g * 4


def child(args):
    import torch
    import torch.nn.functional as F

    from bench.common import peak_rss_mb, reset_peak_rss, rss_mb, timeit
    from evaclip.losses import clip_loss_local, clip_loss_naive, clip_loss_tiled

    torch.manual_seed(0)
    torch.set_num_threads(args.get("threads", 2))
    g, world, impl = args["global_batch"], args["world"], args["impl"]
    b = g // world
    img = F.normalize(torch.randn(g, DIM), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(g, DIM), dim=-1).requires_grad_()
    # A rank's own rows are separate leaves, as after a real all-gather-with-grad: slicing the gathered
    # leaf instead would make autograd add a second [G, D] gradient for the slice's backward.
    img_loc = img[:b].detach().clone().requires_grad_()
    txt_loc = txt[:b].detach().clone().requires_grad_()
    scale = torch.tensor([14.0], requires_grad=True)
    base = rss_mb()
    reset = reset_peak_rss()

    def step():
        img.grad = txt.grad = img_loc.grad = txt_loc.grad = scale.grad = None
        if impl == "naive":
            loss = clip_loss_naive(img, txt, scale)
        elif impl == "local":
            loss = clip_loss_local(img_loc, txt_loc, img, txt, scale, 0)
        else:
            loss = clip_loss_tiled(img_loc, txt_loc, img, txt, scale, 0, tile=args.get("tile", 4096))
        loss.backward()

    t = timeit(step, reps=args.get("reps", 5), warmup=1)
    peak = peak_rss_mb()
    return {"time": t, "peak_rss_mb": peak, "inputs_mb": base, "above_inputs_mb": peak - base, "peak_reset": reset}


def run(reps: int = 5, sizes=(16384, 65536, 131072), world: int = 128, mem_limit_gb: float = 12.0):
    from bench.common import run_child

    rows = []
    for g in sizes:
        for impl in ("naive", "local", "tiled"):
            if impl == "naive" and naive_bytes(g) / 2 ** 30 > mem_limit_gb:
                rows.append({"global_batch": g, "impl": impl, "skipped":
                             f"needs ~{naive_bytes(g) / 2 ** 30:.0f} GiB (G x G logits)"})
                continue
            res = run_child("loss_memory", {"global_batch": g, "world": world, "impl": impl, "reps": reps})
            rows.append({"global_batch": g, "impl": impl, "world": world, "local_batch": g // world, **res})
    return rows


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
