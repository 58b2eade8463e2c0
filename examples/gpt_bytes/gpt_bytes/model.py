"""A GPT-style byte-level language model (after nanoGPT's ``model.py``).

Token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal
self-attention through ``torch.nn.functional.scaled_dot_product_attention``, then a 4x MLP
with GELU), a final LayerNorm and a linear head over the 256 byte values. Dropout after the
embeddings, on the attention weights and after each residual branch. The head is *not* tied
to the token embedding: with a vocabulary of 256 tying saves only 256 x n_embd parameters.

Parameters at the defaults (n_layer 6, n_embd 320, block_size 256):
each block 12 x 320^2 + 13 x 320 = 1,232,960, x 6 = 7,397,760; embeddings (256 + 256) x 320 =
163,840; head 320 x 256 + 256 = 82,176; final norm 640: 7,644,416 in all.

Initialisation as GPT-2's: normal(0, 0.02) weights, zero biases, and the residual output
projections scaled by 1/sqrt(2 n_layer).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256  # byte values


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
        )
        out: Tensor = self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(b, t, c)))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        out: Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPT(nn.Module):
    """Byte-level GPT: ``(B, T)`` int64 bytes -> ``(B, T, 256)`` next-byte logits.

    Args:
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``n_embd``).
        n_embd: width of the residual stream.
        block_size: longest context (learned positions).
        dropout: dropout probability everywhere dropout is used.
    """

    def __init__(
        self, n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(VOCAB, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, VOCAB)
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            # GPT-2: the residual projections' std shrinks with depth (two per block)
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} bytes is longer than block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.ln_f(x))
        return logits


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)


def n_parameters(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
