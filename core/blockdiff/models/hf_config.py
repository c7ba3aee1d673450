"""What a serving stack needs to know about a block-diffusion checkpoint from the transformers config it loaded:
its `block_diffusion` settings, and for LLaDA2.0 checkpoints a transformers config class, so stacks read
`model_type: llada2_moe` without `--trust-remote-code`. Imports transformers (every serving stack has it); the rest of
the core does not."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from blockdiff.models.checkpoints import ARCHITECTURES
from blockdiff.serving import BlockDiffusionSettings


def block_diffusion_settings(hf_config: PretrainedConfig) -> BlockDiffusionSettings:
    """The checkpoint's decoding settings; raises naming the model when it is not a block-diffusion checkpoint."""
    cfg = {"architectures": getattr(hf_config, "architectures", None) or [],
           "block_diffusion": getattr(hf_config, "block_diffusion", None)}
    if cfg["block_diffusion"] is None:
        cfg.pop("block_diffusion")
    return BlockDiffusionSettings.from_config(cfg)


def is_block_diffusion(hf_config: PretrainedConfig) -> bool:
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    return ARCHITECTURES.get(arch, (None, False))[1]


class LLaDA2MoeHFConfig(PretrainedConfig):
    """`model_type: llada2_moe`, with LLaDA2.0-mini's values as defaults; keys as in the public config.json, plus the
    transformers-5 `rope_parameters` the stacks' rotary layers read."""

    model_type = "llada2_moe"

    def __init__(self, vocab_size: int = 157184, hidden_size: int = 2048, intermediate_size: int = 5120,
                 num_hidden_layers: int = 20, num_attention_heads: int = 16, num_key_value_heads: int = 4,
                 head_dim: int = 128, hidden_act: str = "silu", use_qkv_bias: bool = False, use_bias: bool = False,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 600000.0, partial_rotary_factor: float = 0.5,
                 max_position_embeddings: int = 32768, tie_word_embeddings: bool = False, num_experts: int = 256,
                 num_shared_experts: int = 1, num_experts_per_tok: int = 8, n_group: int = 8, topk_group: int = 4,
                 moe_intermediate_size: int = 512, first_k_dense_replace: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 2.5, score_function: str = "sigmoid",
                 moe_router_enable_expert_bias: bool = True, router_dtype: str = "fp32", use_qk_norm: bool = True,
                 use_rmsnorm: bool = True, embedding_dropout: float = 0.0, output_dropout: float = 0.0,
                 **kwargs: Any) -> None:
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim, self.hidden_act = num_key_value_heads, head_dim, hidden_act
        self.use_qkv_bias, self.use_bias, self.rms_norm_eps = use_qkv_bias, use_bias, rms_norm_eps
        self.rope_theta, self.partial_rotary_factor = rope_theta, partial_rotary_factor
        self.max_position_embeddings = max_position_embeddings
        self.num_experts, self.num_shared_experts = num_experts, num_shared_experts
        self.num_experts_per_tok, self.n_group, self.topk_group = num_experts_per_tok, n_group, topk_group
        self.moe_intermediate_size, self.first_k_dense_replace = moe_intermediate_size, first_k_dense_replace
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.score_function, self.moe_router_enable_expert_bias = score_function, moe_router_enable_expert_bias
        self.router_dtype, self.use_qk_norm, self.use_rmsnorm = router_dtype, use_qk_norm, use_rmsnorm
        self.embedding_dropout, self.output_dropout = embedding_dropout, output_dropout
        kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
