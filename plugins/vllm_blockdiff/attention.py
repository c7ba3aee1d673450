"""Block-causal attention for vLLM's CPU backend (run here) and FlashAttention backend (GPU; reviewed only).

A block-diffusion query sees every key before the end of its own block: earlier blocks from the paged cache, its own
block in both directions. vLLM's CPU kernel already runs non-causal attention of a query span against keys
[0, seq_len); so each request's scheduled span is cut at block boundaries into sub-sequences, each attending
non-causally to keys up to its own end, over the same block table. The scheduler only ever starts a span at a block
boundary (`vllm_blockdiff.scheduler`), so every piece is a whole block or a block's start. The FlashAttention
varlen kernel has the same interface (query start locations, per-sequence key lengths, block table, causal flag).

For models without a `block_diffusion` architecture the builder is vLLM's, unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadataBuilder
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionMetadataBuilder
from vllm.v1.kv_cache_interface import CrossAttentionSpec, EncoderOnlyAttentionSpec

from blockdiff.models.hf_config import block_diffusion_settings, is_block_diffusion


def split_at_blocks(query_start_loc: list[int], seq_lens: list[int], block_size: int
                    ) -> tuple[list[int], list[int], list[int]]:
    """Cut each request's query span at block boundaries. Returns the new query start locations, the new sequence
    lengths (each piece sees keys up to its own end) and, per piece, the request it came from."""
    starts, lens, owner = [0], [], []
    for req, (q0, q1, seq_len) in enumerate(zip(query_start_loc, query_start_loc[1:], seq_lens)):
        pos = seq_len - (q1 - q0)  # absolute position of the span's first query
        while pos < seq_len:
            end = min((pos // block_size + 1) * block_size, seq_len)
            starts.append(starts[-1] + end - pos)
            lens.append(end)
            owner.append(req)
            pos = end
    return starts, lens, owner


def block_causal_metadata(m: CommonAttentionMetadata, block_size: int) -> CommonAttentionMetadata:
    """The same batch with every request's span split at block boundaries into non-causal sub-sequences."""
    n = m.num_reqs
    seq_lens = m.seq_lens if m.seq_lens_cpu_upper_bound is None else m.seq_lens_cpu_upper_bound  # exact: no async
    starts, lens, owner = split_at_blocks(m.query_start_loc_cpu[: n + 1].tolist(), seq_lens[:n].tolist(), block_size)
    rows = torch.tensor(owner, dtype=torch.long)
    return replace(
        m,
        query_start_loc=torch.tensor(starts, dtype=m.query_start_loc.dtype, device=m.query_start_loc.device),
        query_start_loc_cpu=torch.tensor(starts, dtype=m.query_start_loc_cpu.dtype),
        seq_lens=torch.tensor(lens, dtype=m.seq_lens.dtype, device=m.seq_lens.device),
        num_reqs=len(lens),
        max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
        block_table_tensor=m.block_table_tensor[rows.to(m.block_table_tensor.device)],
        causal=False,
        seq_lens_cpu_upper_bound=None if m.seq_lens_cpu_upper_bound is None else torch.tensor(lens),
        is_prefilling=None if m.is_prefilling is None else m.is_prefilling[rows.to(m.is_prefilling.device)],
        req_idx=None if m.req_idx is None else m.req_idx[owner],
    )


class BlockCausalBuilderMixin:
    """Wraps an attention backend's metadata builder: block-diffusion models get `block_causal_metadata` (and no
    cascade prefix, which would assume causal attention); every other model the builder unchanged."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        hf_config = vllm_config.model_config.hf_config
        decoder = not isinstance(kv_cache_spec, (CrossAttentionSpec, EncoderOnlyAttentionSpec))
        self.diffusion_block = (block_diffusion_settings(hf_config).block_size
                                if decoder and is_block_diffusion(hf_config) else 0)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        if self.diffusion_block:
            common_prefix_len, common_attn_metadata = 0, block_causal_metadata(common_attn_metadata,
                                                                               self.diffusion_block)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class BlockCausalCPUAttentionMetadataBuilder(BlockCausalBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class BlockCausalCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        return BlockCausalCPUAttentionMetadataBuilder


class BlockCausalFlashAttentionMetadataBuilder(BlockCausalBuilderMixin, FlashAttentionMetadataBuilder):
    """GPU (reviewed, not run here: no GPU): FlashAttention's varlen kernel with causal=False attends each
    sub-sequence's queries to its keys [0, seq_len) through the block table, as the CPU kernel does."""


class BlockCausalFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[FlashAttentionMetadataBuilder]:
        return BlockCausalFlashAttentionMetadataBuilder
