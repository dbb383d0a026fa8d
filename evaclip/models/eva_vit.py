"""EVA / EVA-02 image towers (plain nn.Modules; parameter names and layouts identical to timm's ``Eva``).

Papers: EVA (arXiv 2211.07636), EVA-02 (arXiv 2303.11331), EVA-CLIP (arXiv 2303.15389), FLIP (2212.00794).

What each family uses:
  EVA-02 (B/L): 2D RoPE on q/k of patch tokens, SwiGLU MLP, sub-LN (LayerNorm inside the MLP, ``mlp.norm``,
                and inside attention before ``proj``, ``attn.norm``), separate q/k/v projections, no k bias.
  EVA-02-E:     post-norm blocks (norm after each branch), plain GELU MLP, fused qkv with q/v bias.
  EVA01-g:      pre-norm blocks, plain GELU MLP, fused qkv with q/v bias, no RoPE.

What differs from timm: the attention kernel is selectable (``attention.py``: SDPA kernels, flash-attn,
math) and patch dropout's rate can change during training (the unmasked tuning phase). Because the state
dict is a timm state dict, a trained tower loads with ``timm.create_model(<timm name>)`` unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from evaclip.models.attention import attention, check_attn_impl


def LayerNorm(dim: int) -> nn.LayerNorm:
    """EVA towers use eps=1e-6 everywhere (as timm's LayerNorm default)."""
    return nn.LayerNorm(dim, eps=1e-6)


def _pair(x) -> Tuple[int, int]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided conv: [B, 3, H, W] -> [B, N, D]."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"image tower expects {self.img_size} inputs, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class RotaryEmbedding2D(nn.Module):
    """EVA-02's axial 2D RoPE ("VisionRotaryEmbeddingFast"), as sin/cos tables over the patch grid.

    Each head dim is split in two halves: the first rotates with the row index, the second with the
    column index; within a half, frequencies 1/theta^(2i/d') are repeated for interleaved pairs
    (x0, x1), (x2, x3), ... Positions are rescaled to the pretraining grid (``ref_grid``, 16x16 for EVA-02)
    so a model fine-tuned at another resolution keeps the frequencies it was trained with.
    The tables are buffers (not saved in state dicts, like timm).
    """

    def __init__(self, head_dim: int, grid: Tuple[int, int], ref_grid: Optional[Tuple[int, int]] = None,
                 theta: float = 10000.0):
        super().__init__()
        assert head_dim % 4 == 0, "2D RoPE needs a head dim divisible by 4"
        n_freq = head_dim // 4
        freqs = 1.0 / theta ** (torch.arange(n_freq, dtype=torch.float64) / n_freq)  # [head_dim/4]
        ref = ref_grid or grid
        t_h = torch.arange(grid[0], dtype=torch.float64) / grid[0] * ref[0]
        t_w = torch.arange(grid[1], dtype=torch.float64) / grid[1] * ref[1]
        ang_h = torch.outer(t_h, freqs).repeat_interleave(2, -1)  # [H, head_dim/2]
        ang_w = torch.outer(t_w, freqs).repeat_interleave(2, -1)  # [W, head_dim/2]
        ang = torch.cat([ang_h[:, None, :].expand(-1, grid[1], -1), ang_w[None, :, :].expand(grid[0], -1, -1)], -1)
        ang = ang.reshape(grid[0] * grid[1], head_dim)  # [N, head_dim]
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        self.register_buffer("cos", ang.cos().float(), persistent=False)

    def tables(self, keep: Optional[torch.Tensor] = None):
        """sin/cos [N, D], or [B, 1, K, D] gathered at the kept patch indices [B, K]."""
        if keep is None:
            return self.sin, self.cos
        return self.sin[keep].unsqueeze(1), self.cos[keep].unsqueeze(1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return (x * cos + rot * sin).to(x.dtype)


class PatchDropout(nn.Module):
    """FLIP-style random token dropping: keep floor(N * (1 - rate)) patch tokens per image, prefix kept.

    Returns the kept indices so RoPE tables are gathered at the same positions (EVA's original code
    dropped tokens without re-indexing RoPE, which crashes or silently mis-rotates). ``rate`` is a plain
    attribute so the trainer can anneal it to 0 for the unmasked tuning phase.
    """

    def __init__(self, rate: float = 0.0, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"patch dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.num_prefix_tokens = num_prefix_tokens

    def num_keep(self, n: int) -> int:
        return max(1, math.floor(n * (1.0 - self.rate) + 1e-9))

    def forward(self, x, noise: Optional[torch.Tensor] = None):  # x: [B, P + N, D]
        """``noise`` [B, N]: the per-patch scores that decide what is kept (the lowest), e.g. drawn per sample
        from (seed, step, key) by the trainer so a sample's mask does not depend on its batch; default: rand."""
        if not self.training or self.rate == 0.0:
            return x, None
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        b, n, d = patches.shape
        if noise is None:
            noise = torch.rand(b, n, device=x.device)
        keep = torch.argsort(noise.to(x.device), dim=-1)[:, : self.num_keep(n)]  # [B, K]
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([prefix, patches], dim=1), keep


class EvaAttention(nn.Module):
    """Multi-head attention with RoPE on patch tokens; q/k/v either fused (``qkv`` + q/v bias) or separate."""

    def __init__(self, dim: int, num_heads: int, qkv_fused: bool = True, qkv_bias: bool = True,
                 scale_norm: bool = False, num_prefix_tokens: int = 1, attn_impl: str = "sdpa"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_impl = attn_impl
        if qkv_fused:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=False)  # EVA: no key bias (it cancels in softmax)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.qkv_fused = qkv_fused
        self.norm = LayerNorm(dim) if scale_norm else nn.Identity()  # sub-LN before the out proj
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        b, n, c = x.shape
        if self.qkv_fused:
            bias = None
            if self.q_bias is not None:
                bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, self.head_dim)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def forward(self, x, rope=None):
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        if rope is not None:
            sin, cos = rope
            p = self.num_prefix_tokens
            q = torch.cat([q[:, :, :p], apply_rope(q[:, :, p:], sin, cos)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :p], apply_rope(k[:, :, p:], sin, cos)], dim=2).type_as(v)
        x = attention(q, k, v, impl=self.attn_impl)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(self.norm(x))


class SwiGLU(nn.Module):
    """SwiGLU MLP with separate gate/value projections and an optional sub-LN (EVA-02 CLIP towers)."""

    def __init__(self, dim: int, hidden: int, scale_norm: bool):
        super().__init__()
        self.fc1_g, self.fc1_x = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.norm = LayerNorm(hidden) if scale_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class GluMlp(nn.Module):
    """SwiGLU with a packed fc1 ([gate; value]); the layout of EVA-02 MIM towers without sub-LN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden * 2), nn.Linear(hidden, dim)
        self.norm = nn.Identity()

    def forward(self, x):
        g, v = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(F.silu(g) * v))


class Mlp(nn.Module):
    """Plain GELU MLP (EVA01, EVA-02-E)."""

    def __init__(self, dim: int, hidden: int, scale_norm: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = LayerNorm(hidden) if scale_norm else nn.Identity()

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class EvaBlock(nn.Module):
    """Transformer block; pre-norm (EVA01, EVA-02 B/L) or post-norm (EVA-02-E), optional layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_fused: bool, swiglu_mlp: bool,
                 scale_mlp: bool, scale_attn_inner: bool, post_norm: bool = False,
                 init_values: Optional[float] = None, num_prefix_tokens: int = 1, attn_impl: str = "sdpa"):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = LayerNorm(dim)
        self.attn = EvaAttention(dim, num_heads, qkv_fused=qkv_fused, scale_norm=scale_attn_inner,
                                 num_prefix_tokens=num_prefix_tokens, attn_impl=attn_impl)
        self.norm2 = LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        if swiglu_mlp:
            self.mlp = SwiGLU(dim, hidden, scale_mlp) if scale_mlp else GluMlp(dim, hidden)
        else:
            self.mlp = Mlp(dim, hidden, scale_norm=scale_mlp)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values)) if init_values and not post_norm else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values)) if init_values and not post_norm else None

    def forward(self, x, rope=None):
        if self.post_norm:
            x = x + self.norm1(self.attn(x, rope=rope))
            return x + self.norm2(self.mlp(x))
        a = self.attn(self.norm1(x), rope=rope)
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class Eva(nn.Module):
    """EVA ViT image tower. ``forward(images [B,3,H,W]) -> [B, num_classes]`` (the CLIP projection is ``head``)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 512,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        qkv_fused: bool = True,
        mlp_ratio: float = 4.0,
        swiglu_mlp: bool = False,
        scale_mlp: bool = False,
        scale_attn_inner: bool = False,
        use_rot_pos_emb: bool = False,
        ref_feat_shape: Optional[Tuple[int, int]] = None,
        use_post_norm: bool = False,
        init_values: Optional[float] = None,
        patch_drop_rate: float = 0.0,
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        check_attn_impl(attn_impl)
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.embed_dim = self.num_features = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=1)
        self.rope = (RotaryEmbedding2D(embed_dim // num_heads, self.patch_embed.grid_size,
                                       _pair(ref_feat_shape) if ref_feat_shape else None)
                     if use_rot_pos_emb else None)
        self.blocks = nn.ModuleList([
            EvaBlock(embed_dim, num_heads, mlp_ratio, qkv_fused, swiglu_mlp, scale_mlp, scale_attn_inner,
                     post_norm=use_post_norm, init_values=init_values, attn_impl=attn_impl)
            for _ in range(depth)
        ])
        use_fc_norm = global_pool == "avg"  # timm's rule: avg pooling normalises after pooling, token before
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- init and hooks ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):  # BEiT/EVA depth rescale of residual branch outputs
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, final norm/head depth + 1."""
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def set_attn_impl(self, impl: str):
        check_attn_impl(impl)
        for blk in self.blocks:
            blk.attn.attn_impl = impl

    def set_patch_dropout(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"patch dropout rate must be in [0, 1), got {rate}")
        self.patch_drop.rate = rate

    # -- forward ----------------------------------------------------------------------------------------
    def forward_features(self, x, mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None,
                         layer: int = -1, drop_noise: Optional[torch.Tensor] = None):  # [B, 3, H, W] -> [B, 1 + K, D]
        """Tokens after the final norm. ``mask`` [B, N] (bool, True = masked) with ``mask_token`` [1, 1, D]:
        masked patch embeddings are replaced by the token before the position embedding is added (BEiT / EVA
        MIM: every position is still seen, RoPE positions unchanged). ``layer`` >= 0 stops after that block
        (its output goes through the final norm too). ``drop_noise``: see ``PatchDropout``."""
        x = self.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x, keep = self.patch_drop(x, drop_noise)
        rope = self.rope.tables(keep) if self.rope is not None else None
        last = len(self.blocks) - 1 if layer < 0 else layer
        for blk in self.blocks[:last + 1]:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope=rope)
        return self.norm(x)

    def forward_head(self, x):
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return self.head(self.fc_norm(x))

    def forward(self, x, drop_noise: Optional[torch.Tensor] = None):
        return self.forward_head(self.forward_features(x, drop_noise=drop_noise))
