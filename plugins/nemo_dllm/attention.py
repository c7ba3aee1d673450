"""Megatron's core-attention slot filled with the core's attention (`blockdiff.models.layers.attention`), so the
Megatron model attends exactly as the reference does: the mask is the core's (True = may attend), either dense
[b, 1, sq, sk] or a FlexAttention BlockMask, and under context parallelism this rank's queries attend to every rank's
keys and values, gathered in Megatron's context-parallel group.

megatron-core's own attentions do neither: its local `DotProductAttention` refuses context parallelism (only
Transformer Engine's attention has it) and takes no block mask. The zig-zag split of the sequence and the order of the
gathered keys are `megatron_model.forward`'s business: it hands in the mask with its rows for this rank's queries and
its columns in gathered order.

FlexAttention has no backward on the CPU (torch 2.13 raises), so there a forward that needs gradients runs the same
mask densely (logged once); on a GPU, and in any forward without gradients, the block mask is used as it is.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_mask

from blockdiff.models.layers import attention
from nemo_dllm import parallel

log = logging.getLogger(__name__)
_said_dense_backward = False


def _dense(mask: BlockMask, queries: int, keys: int, device: torch.device) -> Tensor:
    global _said_dense_backward
    if not _said_dense_backward:
        log.warning("FlexAttention has no CPU backward: the block mask runs densely where gradients are needed")
        _said_dense_backward = True
    return create_mask(mask.mask_mod, mask.shape[0], 1, queries, keys, device)


class BlockDiffusionAttention(MegatronModule):
    """Takes Megatron's [s, b, heads, head_dim] query/key/value, returns [s, b, heads x head_dim]."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, cp_comm_type=None,
                 softmax_scale: float | None = None, pg_collection=None, attention_dropout: float | None = None
                 ) -> None:
        super().__init__(config=config)
        if softmax_scale is not None:
            raise ValueError(f"softmax_scale {softmax_scale}: the core's attention scales by 1/sqrt(head_dim) only")
        if attention_dropout or config.attention_dropout:
            raise ValueError(f"attention_dropout {attention_dropout or config.attention_dropout}: not supported")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | BlockMask,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("attention bias and packed-sequence parameters are not supported: packed documents are "
                             "in the mask")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
        if parallel.cp_rank_and_size()[1] > 1:
            from megatron.core import parallel_state

            group = parallel_state.get_context_parallel_group()
            k, v = (parallel.gather(t, 2, group, sum_grads=True) for t in (k, v))
        mask = attention_mask
        if isinstance(mask, BlockMask) and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            mask = _dense(mask, q.shape[2], k.shape[2], q.device)
        out = attention(q, k, v, mask)  # [b, heads, sq, head_dim]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
