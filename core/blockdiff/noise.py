"""The forward (masking) process: linear schedule, mask-ratio bands, complementary pairs, embedding noise.

Linear schedule: alpha_t = 1 - t, so each maskable token is masked with probability t and the ELBO weight
alpha'_t / (1 - alpha_t) has magnitude 1/t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskBand:
    """Mask ratios are drawn uniformly from [t_min, t_max]; pretraining uses (eps, 1), SFT a narrower band."""

    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"mask band needs 0 < t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return (self.t_min + (self.t_max - self.t_min) * u).float()


def elbo_weight(t: Tensor) -> Tensor:
    """|alpha'_t / (1 - alpha_t)| for the linear schedule."""
    return 1.0 / t


def per_token_t(t: Tensor, length: int, block_size: int | None = None) -> Tensor:
    """Expand t to one value per token. t is [batch] (one ratio per sequence) or [batch, L / block_size] (one per
    block)."""
    if t.dim() == 1:
        return t[:, None].expand(-1, length)
    if block_size is None or t.shape[1] * block_size != length:
        raise ValueError(f"per-block t of shape {tuple(t.shape)} does not tile length {length} with block {block_size}")
    return t.repeat_interleave(block_size, dim=1)


def draw_mask(t_tok: Tensor, maskable: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mask each maskable token independently with its probability t. Never masks a non-maskable token (prompt,
    padding). Returns bool [batch, L]."""
    u = torch.rand(t_tok.shape, generator=generator, dtype=torch.float64)
    return (u < t_tok.double()) & maskable


def complementary_mask(masked: Tensor, maskable: Tensor) -> Tensor:
    """The other half of a complementary pair: every maskable token is masked in exactly one of the two."""
    return maskable & ~masked


def apply_mask(input_ids: Tensor, masked: Tensor, mask_token_id: int) -> Tensor:
    return torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)


def pad_to_block_multiple(ids: list[int], block_size: int, pad_id: int) -> list[int]:
    """Right-pad a token list to a multiple of the block size (SFT samples are padded with EOS, which the model must
    learn to emit)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return ids + [pad_id] * (-len(ids) % block_size)


def add_embedding_noise(embeddings: Tensor, masked: Tensor, std: float, step: int, until_step: int,
                        generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise on the embeddings of masked tokens during the first `until_step` steps of a conversion run.

    The mask token's embedding is untrained in an AR checkpoint; noising it early keeps the first updates from
    collapsing onto one vector (LLaDA2.0 section 4)."""
    if std < 0:
        raise ValueError(f"embedding noise std must be >= 0, got {std}")
    if step >= until_step or std == 0:
        return embeddings
    noise = torch.randn(embeddings.shape, generator=generator, dtype=embeddings.dtype, device=embeddings.device)
    return embeddings + noise * std * masked[..., None].to(embeddings.dtype)
