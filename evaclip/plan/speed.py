"""Step time of a training run: compute at an assumed MFU, plus the communication the ZeRO stage and the loss
impl add, over a stated interconnect bandwidth (not overlapped: an upper bound on the step)."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Dict, Optional

from evaclip.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch.cuda.mem_get_info reports as total (a little under the marketing figure)
    peak_tflops: float  # dense bf16 / fp16 tensor-core peak (the vendors' data sheets, no sparsity)
    mfu: float  # model FLOPs utilisation assumed for a CLIP step (evaclip's measurement where one exists)
    node_gbps: float  # inter-node bandwidth per GPU, GB/s (one 400 Gb/s NIC per GPU: 50 GB/s)


# MFU: ~0.3 is what large CLIP runs report on A100s (open_clip's scaling runs; EVA-CLIP's 2023 report), the
# default where this project has no measurement of its own; bench/results/gpu-*.md rows replace it (measured_mfu).
GPUS = {
    "a100-40gb": GPU("a100-40gb", 39.4, 312.0, 0.30, 25.0),
    "a100-80gb": GPU("a100-80gb", 79.2, 312.0, 0.30, 25.0),
    "h100-80gb": GPU("h100-80gb", 79.1, 989.0, 0.30, 50.0),
    "h200": GPU("h200", 139.8, 989.0, 0.30, 50.0),
}
INTRA_NODE_GBPS = 150.0  # NVLink, per GPU and direction, what NCCL's all-reduce reaches (A100 / H100 class)


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ConfigError(f"--gpu {name!r}: choose one of {', '.join(GPUS)}")
    return GPUS[name]


_MFU_ROW = re.compile(r"^\|\s*([0-9.]+)\s*\|\s*(on|off)\s*\|.*\|\s*([0-9.]+)%\s*\|\s*$")


def bench_results_dir() -> str:
    """bench/results of a source checkout (the project's GPU measurements), or "" in an installed package."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench",
                        "results")
    return here if os.path.isdir(here) else ""


def measured_mfu(results_dir: str, device: str, patch_dropout: float, compiled: bool) -> Optional[float]:
    """The MFU this project measured (bench/gpu_mfu.py's table in the newest ``gpu-*.md`` naming ``device``) at the
    nearest token-drop rate with the same compile setting, or None."""
    want = device.split("-")[0].upper()
    for path in sorted(glob.glob(os.path.join(results_dir, "gpu-*.md")), reverse=True):
        text = open(path).read()
        if want not in text.upper():
            continue
        rows = [m.groups() for m in map(_MFU_ROW.match, text.splitlines()) if m]
        rows = [(float(d), c == "on", float(u) / 100) for d, c, u in rows if (c == "on") == compiled]
        if rows:
            return min(rows, key=lambda r: abs(r[0] - patch_dropout))[2]
    return None


def comm_bytes(zero: int, engine: str, precision: str, trainable: int, global_batch: int, dim: int,
               ranks: int) -> int:
    """Bytes one GPU sends per optimizer step. Gradients: a ring all-reduce (stages 0-1) or reduce-scatter (2-3)
    moves 2 (N-1)/N or (N-1)/N of the gradient bytes (Patarasuk & Yuan 2009); stages 1-2 all-gather the updated
    weights ((N-1)/N), stage 3 gathers them in forward and again in backward (ZeRO paper, Sec. 7: 1.5x stage 2's
    volume). Loss: the image and text features of the global batch (fp32) are all-gathered in forward and their
    gradients reduced in backward (naive / local / tiled), or passed around the ring once each way (ring): the
    same volume either way (the ring saves memory, not bytes)."""
    n = max(1, ranks)
    if n == 1:
        return 0
    share = (n - 1) / n
    width = 2 if precision in ("bf16", "fp16") and engine == "deepspeed" else 4
    grad = width * trainable
    if engine == "torch" or zero == 0:
        params = 2 * share * grad
    elif zero in (1, 2):  # reduce-scatter the gradients, all-gather the weights
        params = 2 * share * grad
    else:
        params = 3 * share * grad
    feats = 2 * 4 * global_batch * dim  # image + text features of the whole batch
    return int(params + 2 * share * feats)


def step_seconds(flops_per_sample: float, samples_per_gpu: int, g: GPU, mfu: float, comm: int, nodes: int) -> Dict:
    """Compute time at ``mfu`` of the GPU's peak, plus communication at the inter-node bandwidth (or NVLink on
    one node), not overlapped with compute."""
    compute = flops_per_sample * samples_per_gpu / (g.peak_tflops * 1e12 * mfu)
    bw = (g.node_gbps if nodes > 1 else INTRA_NODE_GBPS) * 1e9
    return {"compute_s": compute, "comm_s": comm / bw, "step_s": compute + comm / bw}
