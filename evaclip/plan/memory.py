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
    gradients: int  # held at the end of backward, with the activations (the usual peak)
    optimizer: int
    step_gradients: int = 0  # built by the optimizer step only, when the activations are gone


def model_states(trainable: int, frozen: int, engine: str, precision: str, zero: int, ranks: int,
                 held_grads: int = 0) -> ModelStates:
    """Weights, gradients and optimizer states per GPU (LAMB and AdamW both keep two fp32 moments per parameter).

    ZeRO (Rajbhandari et al. 2020, Fig. 1): stage 1 partitions the optimizer states over N ranks, stage 2 the
    gradients too, stage 3 the weights too. What DeepSpeed holds (read from its optimizers after a backward,
    tests/test_plan.py): 16-bit runs keep the model in 16 bit and an fp32 master copy (ZeRO 1-2 keep their fp32
    partition in fp32 runs too); at stages 1-2 a rank holds, at the end of backward, the whole gradients of the
    parameters that overlap its partition of each parameter group (``held_grads`` elements: the engine's
    ``zero_held_grad_elements``; about P / N for a large model) and builds its fp32 gradient partition only in the
    step (DeepSpeed's estimator counts that one too: 2 + 18 / N bytes per parameter at stage 2). The plain engine
    keeps fp32 weights and gradients whatever the precision (bf16 is autocast) and has no partitions.
    """
    p, f, n = trainable, frozen, max(1, ranks)
    if engine == "torch":
        return ModelStates(weights=4 * (p + f), gradients=4 * p, optimizer=8 * p)
    w = 2 if precision in ("bf16", "fp16") else 4
    if zero == 0:
        return ModelStates(weights=w * (p + f), gradients=w * p, optimizer=(4 if w == 2 else 0) * p + 8 * p)
    part = -(-p // n)  # each rank's share of the flat parameters, rounded up
    if zero in (1, 2):
        return ModelStates(weights=w * (p + f), gradients=w * (held_grads or part), optimizer=12 * part,
                           step_gradients=4 * part)
    return ModelStates(weights=w * -(-(p + f) // n), gradients=(w + 4) * part, optimizer=12 * part)


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


def total(parts: Dict[str, int], step_only: int = 0) -> int:
    """The peak per GPU: the larger of the backward's parts and the step's (model states and what the step
    builds, the activations gone), plus the fragmentation margin, plus the CUDA context."""
    states = sum(parts.get(k, 0) for k in ("weights", "gradients", "optimizer states"))
    peak = max(sum(parts.values()), states + step_only)
    return int(peak * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES
