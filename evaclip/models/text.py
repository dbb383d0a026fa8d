"""Text towers: the CLIP text transformer (open_clip parameter names) and a Hugging Face encoder tower.

The CLIP tower (Radford et al. 2021) is a causal pre-norm transformer pooled at the EOT token (the
highest id in each sequence). Names and layouts are open_clip's ``TextTransformer`` (``attn.in_proj_weight``
packs q, k, v like ``nn.MultiheadAttention``), so OpenAI / open_clip text weights load unchanged.
Attention runs through ``attention.py`` with ``is_causal=True`` (a causal kernel, no dense float mask).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from evaclip.models.attention import attention, check_attn_impl


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid GELU approximation (their text weights were trained with it)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Packed-qkv attention with ``nn.MultiheadAttention``'s parameter names."""

    def __init__(self, width: int, heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.heads, self.attn_impl = heads, attn_impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal: bool = True):  # x: [B, L, W]
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, hd]
        x = attention(q, k, v, impl=self.attn_impl, is_causal=causal)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, attn_impl: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, attn_impl)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x, causal: bool = True):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


@torch.no_grad()
def init_blocks(blocks, width: int) -> None:
    """open_clip / OpenAI CLIP init of residual attention blocks: std scaled by width, and by depth on the
    projections into the residual stream (every tensor set: the packed qkv projection starts empty)."""
    proj_std, attn_std, fc_std = width ** -0.5 * (2 * len(blocks)) ** -0.5, width ** -0.5, (2 * width) ** -0.5
    for blk in blocks:
        nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(blk.attn.in_proj_bias)
        nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(blk.attn.out_proj.bias)
        nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str, attn_impl: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act, attn_impl) for _ in range(layers)])

    def forward(self, x, causal: bool = True):
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, causal, use_reentrant=False)
            else:
                x = blk(x, causal=causal)
        return x


class TextTransformer(nn.Module):
    """CLIP text tower: tokens [B, L] -> features [B, output_dim]."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, output_dim: int = 512, act: str = "gelu",
                 attn_impl: str = "sdpa"):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"text act must be 'gelu' or 'quick_gelu', got {act!r}")
        check_attn_impl(attn_impl)
        self.context_length, self.vocab_size, self.output_dim = context_length, vocab_size, output_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act, attn_impl)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """open_clip / OpenAI CLIP init: std scaled by width and depth on the residual projections."""
        w = self.transformer.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_blocks(self.transformer.resblocks, w)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def no_weight_decay(self) -> set:
        return {"positional_embedding"}

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, ln_final/projection last."""
        if name.startswith(("token_embedding", "positional_embedding")):
            return 0
        if name.startswith("transformer.resblocks."):
            return int(name.split(".")[2]) + 1
        return self.transformer.layers + 1

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    def set_grad_checkpointing(self, enable: bool = True):
        self.transformer.grad_checkpointing = enable

    def set_attn_impl(self, impl: str):
        check_attn_impl(impl)
        for blk in self.transformer.resblocks:
            blk.attn.attn_impl = impl

    def forward_tokens(self, text):  # [B, L] int64 -> (features [B, E], token states [B, L, W])
        """The features and every position's final state (a CoCa decoder's input: causal, so state t has seen
        tokens <= t only)."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # EOT token
        return pooled @ self.text_projection, x

    def forward(self, text):  # [B, L] int64
        return self.forward_tokens(text)[0]


class HFTextEncoder(nn.Module):
    """A Hugging Face ``transformers`` encoder as the text tower, built from a local config/checkpoint.

    ``model_path`` is a local folder (config.json [+ weights]); nothing is downloaded. Pooling: ``cls``
    (first token), ``mean`` (masked mean) or ``eos``; then a linear projection to the CLIP embedding.
    """

    def __init__(self, model_path: str, output_dim: int, pooler: str = "mean", pretrained: bool = True,
                 pad_id: Optional[int] = None, context_length: int = 77):
        super().__init__()
        import transformers

        if pooler not in ("cls", "mean", "eos"):
            raise ValueError(f"hf pooler must be cls, mean or eos, got {pooler!r}")
        config = transformers.AutoConfig.from_pretrained(model_path, local_files_only=True)
        # we pool the hidden states ourselves: drop BERT-style pooler layers (they would get no gradient),
        # as open_clip's HF tower does
        def load(**kw):
            if pretrained:
                return transformers.AutoModel.from_pretrained(model_path, local_files_only=True, **kw)
            return transformers.AutoModel.from_config(config, **kw)

        try:
            self.transformer = load(add_pooling_layer=False)
        except TypeError:  # a model class without that option
            self.transformer = load()
        self.pooler, self.output_dim, self.context_length = pooler, output_dim, context_length
        self.pad_id = pad_id if pad_id is not None else (config.pad_token_id or 0)
        width = config.hidden_size
        self.proj = nn.Linear(width, output_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)
        self.vocab_size = config.vocab_size

    def no_weight_decay(self) -> set:
        return set()

    @property
    def num_layers(self) -> int:
        return self.transformer.config.num_hidden_layers

    def layer_id(self, name: str) -> int:
        parts = name.split(".")
        if "embeddings" in parts:
            return 0
        if "layer" in parts:
            i = parts.index("layer")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return int(parts[i + 1]) + 1
        return self.num_layers + 1

    def set_grad_checkpointing(self, enable: bool = True):
        if enable:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()

    def set_attn_impl(self, impl: str):
        pass  # the HF model picks its own attention implementation

    def forward(self, text):
        mask = (text != self.pad_id).long()
        out = self.transformer(input_ids=text, attention_mask=mask).last_hidden_state  # [B, L, W]
        if self.pooler == "cls":
            pooled = out[:, 0]
        elif self.pooler == "eos":
            last = mask.sum(1).clamp(min=1) - 1
            pooled = out[torch.arange(out.shape[0], device=out.device), last]
        else:
            m = mask.unsqueeze(-1).to(out.dtype)
            pooled = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.proj(pooled)
