"""Building blocks shared by the reference model implementations: RMSNorm, the SwiGLU MLP, rotary embedding,
attention with an explicit mask over an optional slot-addressed KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """The SwiGLU feed-forward of Qwen3, Llama and LLaDA2 (its dense layers, experts and shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [batch, seq, rotary_dim] for the half-split (rotate_half) RoPE layout of Llama/Qwen."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [batch, heads, seq, head_dim]; rotates the first cos.shape[-1] dims (partial RoPE leaves the rest)."""
    rot, keep = x[..., : cos.shape[-1]], x[..., cos.shape[-1]:]
    half = rot.shape[-1] // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([rot * cos + rotated * sin, keep], dim=-1)


class KVCache:
    """Keys and values of every layer for a set of sequences ("rows"), addressed by absolute position ("slot").

    A forward writes its tokens' keys and values at slots = their positions, then attends over slots [0, kv_len).
    Decoding relies on this: a denoising step writes the current block's scratch KV at its own slots (each step
    overwrites the last), and the block's commit forward writes the final KV there for good. What a query may see is
    decided by the caller's mask alone."""

    def __init__(self, num_layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def update(self, layer: int, rows: Tensor, positions: Tensor, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        """Write k/v [batch, kv_heads, seq, head_dim] of `rows` at `positions` [batch, seq]; return the rows'
        keys/values over slots [0, kv_len)."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache's {self.max_len} slots")
        r = rows[:, None].expand_as(positions)
        self.k[layer][r, :, positions] = k.transpose(1, 2)
        self.v[layer][r, :, positions] = v.transpose(1, 2)
        return self.k[layer][rows, :, :kv_len], self.v[layer][rows, :, :kv_len]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask) -> Tensor:
    """q [b, heads, sq, d], k/v [b, kv_heads, sk, d]; mask is bool [b, 1 or heads, sq, sk] (True = attend) or a
    FlexAttention BlockMask. Every query row must see at least one key."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class DecoderShell(nn.Module):
    """What the reference decoders share around their layers: `model.layers`, `model.norm`, `lm_head`, the cache and
    the forward. Subclasses build `self.model` (with its embedding) and say which parameter embeds tokens."""


    def _init_head(self, embedding: nn.Embedding) -> None:
        self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = embedding.weight

    @property
    def num_kv_heads(self) -> int:
        return self.cfg.num_key_value_heads

    def new_cache(self, rows: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(self.cfg.num_hidden_layers, rows, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim,
                       dtype, self.lm_head.weight.device)

    def embed(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, input_ids: Tensor | None, positions: Tensor, mask: Tensor | BlockMask,
                cache: KVCache | None = None, rows: Tensor | None = None, kv_len: int | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """Logits [batch, seq, vocab] for `input_ids` (or `inputs_embeds`) at `positions` [batch, seq].

        Without a cache the keys are this forward's own tokens. With a cache, the tokens' KV is written at slots =
        positions in cache rows `rows`, and keys are slots [0, kv_len) of those rows; `mask` is [batch, 1, seq, kv_len].
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(positions, self.cfg.rotary_dim, self.cfg.rope_theta, x.dtype)
        if isinstance(mask, Tensor) and mask.dim() == 3:
            mask = mask[:, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, positions, cache, rows, kv_len)
        return self.lm_head(self.model.norm(x))
