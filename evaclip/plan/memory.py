"""Per-GPU memory of a training run, by part. Every formula here, with its source; the activations come from the
meta-device trace (plan/trace.py), not from a formula.

Notation: P = trainable parameters, F = frozen ones (a locked tower), N = data-parallel ranks, b = micro-batch per
rank, G = global batch, D = embedding width, t = loss tile. Bytes per element: 4 (fp32), 2 (bf16 / fp16).
"""
from __future__ import annotations

import dataclasses
from typing import Dict

GiB = 1024 ** 3
CUDA_CONTEXT_BYTES = int(1.0 * GiB)  # the CUDA context, cuBLAS / cuDNN workspaces: a stated constant, not measured
FRAGMENTATION = 0.10  # the caching allocator's fragmentation margin over the tensors' sum: a stated constant


@dataclasses.dataclass
class ModelStates:
    weights: int
    gradients: int
    optimizer: int


def model_states(trainable: int, frozen: int, engine: str, precision: str, zero: int, ranks: int) -> ModelStates:
    """Weights, gradients and optimizer states per GPU (LAMB and AdamW both keep two fp32 moments per parameter).

    ZeRO (Rajbhandari et al. 2020, Fig. 1; DeepSpeed's ``estimate_zero2/3_model_states_mem_needs``): stage 1
    partitions the optimizer states over N ranks, stage 2 the gradients too, stage 3 the weights too. Under
    DeepSpeed a 16-bit run keeps the model in 16 bit and, per parameter, an fp32 master copy and an fp32 gradient
    next to the 16-bit one (DeepSpeed's estimator: 2 + 18/N bytes per parameter at stage 2). ZeRO 1-2 keep an fp32
    copy of their partition even in fp32 (the optimizer steps on it). The plain engine keeps fp32 weights and
    gradients whatever the precision (bf16 is autocast) and has no partitions.
    """
    half = precision in ("bf16", "fp16")
    p, f, n = trainable, frozen, max(1, ranks)
    if engine == "torch":
        return ModelStates(weights=4 * (p + f), gradients=4 * p, optimizer=8 * p)
    w = 2 if half else 4
    weights = w * (p + f) // (n if zero == 3 else 1)
    if half:  # 16-bit gradients and their fp32 counterpart (partitioned from stage 2 on)
        grads = (2 * p + 4 * p) // n if zero >= 2 else 2 * p + (4 * p // n if zero == 1 else 4 * p)
    else:
        grads = 4 * p // (n if zero >= 2 else 1)
    master = 4 * p if half or zero >= 1 else 0  # fp32 weights the optimizer updates
    optimizer = (master + 8 * p) // (n if zero >= 1 else 1)
    return ModelStates(weights=weights, gradients=grads, optimizer=optimizer)


def loss_buffers(impl: str, global_batch: int, micro_batch: int, dim: int, tile: int) -> int:
    """The contrastive loss's own memory per rank, fp32, forward and backward (as bench/loss_memory.py measures):
    naive and local gather both feature sets of the whole batch and keep their gradients (4 x G x D); naive
    builds G x G logits, local b x G per direction, tiled one t x t tile at a time (log-softmax and its gradient:
    4 such blocks); ring gathers nothing: its rows, one block in flight and its reply (4 x b x D each way)."""
    g, b, t = global_batch, micro_batch, min(tile, global_batch)
    gathered = 4 * g * dim * 4
    if impl == "naive":
        return gathered + 4 * g * g * 4
    if impl == "local":
        return gathered + 4 * b * g * 4
    if impl == "tiled":
        return gathered + 4 * t * t * 4
    return 3 * 4 * b * dim * 4 + 4 * b * min(t, b) * 4  # ring


def buckets(precision: str, trainable: int, elements: int) -> int:
    """DeepSpeed's communication buckets alive at the peak (the engine's ``bucket_elements``), in the gradients'
    dtype; a bucket never holds more than the model."""
    width = 2 if precision in ("bf16", "fp16") else 4
    return width * min(elements, trainable)


def total(parts: Dict[str, int]) -> int:
    """The peak per GPU: the parts' sum plus the fragmentation margin, plus the CUDA context."""
    return int(sum(parts.values()) * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES
