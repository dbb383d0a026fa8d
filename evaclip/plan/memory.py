"""Per-GPU memory of a training run, by part. Every formula here, with its source; the activations come from the
meta-device trace (plan/trace.py), not from a formula.

Notation: P = trainable parameters, F = frozen ones (a locked tower), N = data-parallel ranks, b = micro-batch per
rank, G = global batch, D = embedding width, t = loss tile. Bytes per element: 4 (fp32), 2 (bf16 / fp16).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable

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
                 held_grads: int = 0, persistent: int = 0) -> ModelStates:
    """Weights, gradients and optimizer states per GPU (LAMB and AdamW both keep two fp32 moments per parameter).

    ZeRO (Rajbhandari et al. 2020, Fig. 1): stage 1 partitions the optimizer states over N ranks, stage 2 the
    gradients too, stage 3 the weights too. What DeepSpeed holds (read from its optimizers after a backward,
    tests/test_plan.py): 16-bit runs keep the model in 16 bit and an fp32 master copy (ZeRO 1-2 keep their fp32
    partition in fp32 runs too); at stages 1-2 a rank holds, at the end of backward, the whole gradients of the
    parameters that overlap its partition of each parameter group (``held_grads`` elements: the engine's
    ``zero_held_grad_elements``; about P / N for a large model) and builds its fp32 gradient partition only in the
    step (DeepSpeed's estimator counts that one too: 2 + 18 / N bytes per parameter at stage 2). The plain engine
    keeps fp32 weights and gradients whatever the precision (bf16 is autocast) and has no partitions. ZeRO-3
    partitions the 16-bit weights too, except ``persistent`` elements (small parameters, kept whole on every rank:
    the engine's ``zero3_persistent_elements``), keeps its 16-bit gradient partition for the run and, like stages
    1-2, builds the fp32 one in the step (DeepSpeed's estimator: 18 / N bytes per parameter besides the weights).
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
    whole = min(persistent, p + f)
    return ModelStates(weights=w * (whole + -(-(p + f - whole) // n)), gradients=w * part, optimizer=12 * part,
                       step_gradients=4 * part)


def loss_buffers(kind: str, impl: str, global_batch: int, rows: int, dim: int, tile: int) -> int:
    """The contrastive loss's memory per rank at its peak, fp32, forward and backward, as bench/loss_memory.py
    runs it: ``rows`` = b, this rank's rows of the global batch (with accumulation, every micro-batch's: the
    loss spans the cached step). Counted from the tensors the code keeps alive (evaclip/losses/), held against
    torch's MemTracker in tests/test_plan.py (within 10%):
      every impl    the rank's own rows [b, D] x 2 (image, text);
      naive, local  the gathered features [G, D] x 2 (SigLIP gathers the images too, unused) and, by the end of
                    backward, their gradients; naive adds 4 G x G (logits, log-softmax both ways, a gradient),
                    local 4 b x G (two saved log-softmaxes, a gradient and its log-softmax backward) or, later,
                    3 b x G with a third [G, D] (the first gathered gradient); SigLIP local: 5 b x G
                    (logits, labels, log-sigmoid and two gradients), only the texts' gradient;
      tiled         the gathered features and their gradients, the two row gradients [b, D], and a t x t'
                    tile (t = min(tile, b) rows, t' = min(tile, G) columns) four times (its logits, the
                    softmax and two temporaries) or one more [b, D] temporary, whichever is larger;
      ring          nothing gathered: 13 b x D for CLIP (row gradients 2, the block held and the next one 4,
                    column-gradient accumulators 2, those in flight and their replies 4, a temporary 1), 7 for
                    SigLIP (only the text blocks travel), and 3 t x t tiles (t = min(tile, b)) or a [b, D]."""
    g, b, d = global_batch, rows, dim
    own, gathered = 2 * b * d, 2 * g * d
    if impl == "ring":
        t = min(tile, b)
        elements = own + (13 if kind == "clip" else 7) * b * d + max(b * d, 3 * t * t)
    elif impl == "tiled":
        tiles = max(4 * min(tile, b) * min(tile, g), b * d)
        elements = own + (2 * gathered + 2 * b * d if kind == "clip" else gathered + g * d) + tiles
    elif kind == "siglip":  # naive and local build the same b x G logits for SigLIP
        elements = own + gathered + 5 * b * g
    elif impl == "naive":
        elements = own + 2 * gathered + 4 * g * g
    else:
        elements = own + max(gathered + 4 * b * g, gathered + g * d + 3 * b * g)
    return 4 * elements


def caption_loss_buffers(chunk: int, vocab: int, width: int, half: bool, half_weights: bool) -> int:
    """A CoCa's chunked caption cross-entropy (evaclip/losses/caption.py) at its peak, the backward's, beyond its
    input, the projection and their gradients. Per element of one chunk's logits [c, V], c = min(coca.ce_chunk,
    the micro-batch's predicted tokens): 12 bytes in fp32 (the logits, their softmax gradient and the copy the
    weight-gradient matmul makes of it), 14 with ``half`` logits; with ``half_weights`` (DeepSpeed in bf16 / fp16)
    2 W V bytes more (the fp32 accumulator of the projection's gradient beyond the half gradient). The constants
    are torch's MemTracker's measure (tests/test_plan.py holds the formula to it within 10%)."""
    return chunk * vocab * (14 if half else 12) + (2 * width * vocab if half_weights else 0)


def buckets(precision: str, trainable: int, elements) -> int:
    """DeepSpeed's communication buffers alive at the peak, in the gradients' dtype: ``elements`` = the engine's
    ``bucket_elements``, (allocated whole, prefetched parameters: never more than the model)."""
    width = 2 if precision in ("bf16", "fp16") else 4
    whole, prefetch = elements
    return width * (whole + min(prefetch, trainable))


def total(parts: Dict[str, int], step_only: int = 0, teacher_forward: int = 0,
          student: Iterable[str] = ()) -> int:
    """The peak per GPU, the largest of three phases, plus the fragmentation margin, plus the CUDA context: the end
    of backward (every part); the optimizer step (model states, a teacher's weights and what the step builds, the
    activations gone); a frozen teacher's forward (``teacher_forward``: it runs before the student's forward, so
    every part but the ``student`` ones, the names of what only the student's forward and backward hold, plus what
    that forward holds)."""
    states = sum(parts.get(k, 0) for k in ("weights", "gradients", "optimizer states", "teacher weights"))
    student = sum(parts.get(k, 0) for k in set(student))
    peak = max(sum(parts.values()), states + step_only,
               sum(parts.values()) - student + teacher_forward if teacher_forward else 0)
    return int(peak * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES
