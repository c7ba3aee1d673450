"""What a block-diffusion checkpoint tells a server, and what a server tells its client: the decoding settings read
from config.json, and the accounting every response carries (DECODING.md rule 7). One module for every stack, light
enough for any process (no models, no stack) to import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# LLaDA2.0-mini/flash model cards: the tokens a checkpoint without a `block_diffusion` section decodes with
LLADA2_MASK_TOKEN_ID = 156895
LLADA2_EOS_TOKEN_ID = 156892

ACCOUNTING_KEY = "block_diffusion"  # the response field that carries `accounting(...)` on every server


@dataclass(frozen=True)
class BlockDiffusionSettings:
    """Decoding defaults a block-diffusion checkpoint carries in config.json (`block_diffusion`); requests may
    override them."""

    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    block_size: int = 32
    threshold: float = 0.95
    fallback_k: int = 1

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_diffusion.block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"block_diffusion.threshold must be in [0, 1], got {self.threshold}")
        if self.fallback_k < 1:
            raise ValueError(f"block_diffusion.fallback_k must be >= 1, got {self.fallback_k}")
        if not self.eos_token_ids:
            raise ValueError("block_diffusion.eos_token_ids must name at least one token")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> BlockDiffusionSettings:
        section = cfg.get("block_diffusion")
        if section is None and (cfg.get("architectures") or [None])[0] == "LLaDA2MoeModelLM":
            # the public LLaDA2.0 checkpoints predate this section; their model cards give these
            return cls(mask_token_id=LLADA2_MASK_TOKEN_ID, eos_token_ids=(LLADA2_EOS_TOKEN_ID,))
        if section is None:
            raise ValueError("config.json has no `block_diffusion` section: this is not a block-diffusion checkpoint")
        return cls(**{**section, "eos_token_ids": tuple(section["eos_token_ids"])})

    def to_config(self) -> dict[str, Any]:
        return {**asdict(self), "eos_token_ids": list(self.eos_token_ids)}


def tokens_per_forward(output_tokens: int, denoise_forwards: int) -> float:
    """TPF: output tokens per denoising forward (0 before the first)."""
    return output_tokens / denoise_forwards if denoise_forwards else 0.0


def accounting(output_tokens: int, denoise_forwards: int, nfe: int) -> dict[str, int | float]:
    """A finished request's accounting as every server reports it under ACCOUNTING_KEY."""
    return {"denoise_forwards": denoise_forwards, "nfe": nfe,
            "tpf": tokens_per_forward(output_tokens, denoise_forwards)}
