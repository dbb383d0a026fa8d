"""Attention kernels behind one function, so towers can switch backend without branching elsewhere.

Backends:
  ``sdpa``        torch ``scaled_dot_product_attention``, torch picks flash / mem-efficient / math.
  ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_math``, ``sdpa_cudnn``
                  the same call pinned to one SDPA kernel (errors if that kernel cannot run the inputs; fp32
                  inputs on CUDA, which flash and cuDNN never run, go to SDPA's own choice instead).
  ``flash_attn``  the ``flash-attn`` package (optional extra; CUDA + fp16/bf16 only; fp32 inputs as above).
  ``math``        an explicit softmax(QK^T)V written out here: the float reference the others are tested against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa_cudnn", "flash_attn", "math")
HALF_ONLY = ("sdpa_flash", "sdpa_cudnn", "flash_attn")  # their CUDA kernels take fp16 / bf16 inputs only


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_math": SDPBackend.MATH,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_attn_impl(impl: str) -> None:
    """Raise a clear error for an unknown or unavailable backend (called once at model build)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    if impl == "flash_attn" and not flash_attn_available():
        raise ValueError(
            "attn_impl='flash_attn' needs the flash-attn package and a CUDA GPU "
            "(pip install 'evaclip[flash]' on a GPU machine); use attn_impl='sdpa' otherwise"
        )


class _FusedOnMeta(torch.autograd.Function):
    """A fused kernel's memory on the meta device (the planner's trace, evaclip/plan): it keeps q, k, v, the
    output and one fp32 log-sum-exp per row for backward, never the [N, N] probabilities (FlashAttention-2, Dao
    2023, Alg. 1-2; torch's flash and memory-efficient SDPA kernels keep the same). Shapes only: no numbers."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # [B, H, N]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attention(
    q: torch.Tensor,  # [B, H, N, D]
    k: torch.Tensor,  # [B, H, N, D]
    v: torch.Tensor,  # [B, H, N, D]
    impl: str = "sdpa",
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, N, D]
    if q.device.type == "meta" and impl not in ("math", "sdpa_math"):  # on a GPU every other impl runs fused
        return _FusedOnMeta.apply(q, k, v)
    if impl == "sdpa" or (impl in HALF_ONLY and q.is_cuda and q.dtype == torch.float32):
        # fp32 inputs reach a kernel that takes fp16 / bf16 only when a model runs outside autocast (evaluating
        # fp32 weights): SDPA's own choice runs them, where the pinned kernel would fail ("No available kernel")
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
    if impl.startswith("sdpa_"):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_sdpa_backends()[impl]]):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
    if impl == "flash_attn":
        from flash_attn import flash_attn_func

        # flash-attn wants [B, N, H, D]
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=is_causal)
        return out.transpose(1, 2)
    if impl == "math":
        scale = 1.0 / math.sqrt(q.shape[-1])
        attn = (q * scale) @ k.transpose(-2, -1)
        if is_causal:
            n = q.shape[-2]
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            attn = attn.masked_fill(mask, float("-inf"))
        attn = attn.softmax(dim=-1)
        if dropout_p:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v
    raise ValueError(f"unknown attention impl {impl!r}")

