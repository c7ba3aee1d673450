"""Per-request block-diffusion options. They travel in vLLM's `SamplingParams.extra_args` (the OpenAI server's
`vllm_xargs`): `threshold` and `fallback_k` override the checkpoint's defaults; `block_size` may only restate the
served one, because the KV layout, the scheduler's alignment and the attention split are per server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockdiff.models import BlockDiffusionSettings


@dataclass(frozen=True)
class DecodeOptions:
    threshold: float
    fallback_k: int


def request_decode_options(extra_args: dict[str, Any] | None, settings: BlockDiffusionSettings) -> DecodeOptions:
    extra = extra_args or {}
    threshold = extra.get("threshold", settings.threshold)
    fallback_k = extra.get("fallback_k", settings.fallback_k)
    block_size = extra.get("block_size", settings.block_size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if isinstance(fallback_k, bool) or not isinstance(fallback_k, int) or fallback_k < 1:
        raise ValueError(f"fallback_k must be an integer >= 1, got {fallback_k!r}")
    if block_size != settings.block_size:
        raise ValueError(f"block_size {block_size!r} differs from the served block size {settings.block_size}; "
                         "start the server with --hf-overrides '{\"block_diffusion\": {...}}' to change it")
    return DecodeOptions(float(threshold), fallback_k)
