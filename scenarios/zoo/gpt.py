"""GPT-style decoder-only transformer (Radford et al. 2019), in the manner of nanoGPT.

Token and position embeddings, ``blocks`` (an ``nn.ModuleList`` of pre-LayerNorm blocks with
causal self-attention and a GELU MLP), a final LayerNorm and an ``lm_head`` whose weight is tied
to the token embedding. The defaults are GPT-2 small (124M parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"gpt n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x``: [B, T, C]; ``attn_mask``: bool [B, 1, T, T], True where a query may attend."""
        batch, steps, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, steps, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # [B, nh, T, hs]
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
        )
        y = y.transpose(1, 2).contiguous().view(batch, steps, channels)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear to 4x width, GELU, linear back, dropout."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


def causal_mask(attention_mask: Tensor) -> Tensor:
    """Padding mask [B, T] (True or 1 = real token) -> bool [B, 1, T, T] for attention.

    A query attends to earlier real tokens and always to itself, so that no row is fully masked.
    """
    steps = attention_mask.shape[1]
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    causal = torch.ones(steps, steps, dtype=torch.bool, device=attention_mask.device).tril()
    diagonal = torch.eye(steps, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | diagonal


class GPT(nn.Module):
    """Token ids [B, T] (T <= ``block_size``) -> next-token logits [B, T, vocab_size]."""

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float, bias: bool
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``idx``: token ids [B, T]; ``attention_mask``: optional [B, T], True or 1 for real tokens."""
        steps = idx.shape[1]
        if steps > self.block_size:
            raise ValueError(f"sequence length {steps} exceeds the block size {self.block_size}")
        pos = torch.arange(steps, device=idx.device)  # [T]
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, C]
        attn_mask = None if attention_mask is None else causal_mask(attention_mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.lm_head(self.ln_f(x))  # [B, T, V]


def gpt(
    vocab_size: int = 50257,
    block_size: int = 1024,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    dropout: float = 0.0,
    bias: bool = True,
) -> GPT:
    """GPT with ``n_layer`` blocks of width ``n_embd`` and ``n_head`` heads, context ``block_size`` tokens."""
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)
