"""LLaDA2.0's MoE decoder (`LLaDA2MoeModelLM`, the layout of LLaDA2.0-mini/flash) as a megatron-core GPTModel built
from megatron-core's own MoE layers, weights in and out by the public checkpoints' names.

megatron-core has every piece but one: its group-limited routing scores a group by the sum of its best
`topk // group_topk` experts, the LLaDA2 code by its best two (the same only when topk = 2 x group_topk, as in
LLaDA2.0-mini/flash). `LLaDA2Router` is megatron-core's router with the checkpoint's routing
(`blockdiff.models.llada2_moe.route`, the rule the core's router calls), so every config accepted here routes as the
checkpoint does; the router's expert-bias bookkeeping (`local_tokens_per_expert`, read by Megatron's bias update)
is Megatron's.

Choices that differ from megatron-core's defaults, and why:
- the expert bias is updated from expert load after every step (aux-loss-free balancing, what the architecture is
  built for: Megatron's `moe_router_bias_update_rate`, 1e-3, in `finalize_model_grads`); auxiliary losses are off;
- no token is ever dropped: no expert capacity (`moe_expert_capacity_factor` None), so routing is the checkpoint's;
- experts are `SequentialMLP` (plain torch); grouped GEMM needs a GPU kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from blockdiff.models import LLaDA2MoeConfig
from blockdiff.models.llada2_moe import route

ARCHITECTURE = "LLaDA2MoeModelLM"


def is_llada2(hf_config: dict[str, Any]) -> bool:
    return (hf_config.get("architectures") or [None])[0] == ARCHITECTURE


def moe_fields(cfg: LLaDA2MoeConfig) -> dict[str, Any]:
    """megatron-core TransformerConfig fields for the checkpoint's MoE layers (LLaDA2.0's dense first layers as
    `moe_layer_freq`)."""
    return dict(
        num_moe_experts=cfg.num_experts, moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.num_shared_experts,
        moe_layer_freq=[int(i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)],
        moe_router_topk=cfg.num_experts_per_tok, moe_router_score_function="sigmoid",
        moe_router_num_groups=cfg.n_group, moe_router_group_topk=cfg.topk_group,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor, moe_router_dtype="fp32",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3,  # Megatron's default rate, said here
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
    )


def check_training_config(config) -> None:
    """Refuse what would make the Megatron model route differently from the checkpoint's code: dropped tokens,
    auxiliary-loss terms on the routing weights, jitter, another score function or a fused (TE) router."""
    wrong = {name: getattr(config, name) for name, ok in (
        ("moe_expert_capacity_factor", None), ("moe_router_load_balancing_type", "none"),
        ("moe_z_loss_coeff", None), ("moe_input_jitter_eps", None), ("moe_router_score_function", "sigmoid"),
        ("moe_router_fusion", False), ("moe_router_pre_softmax", False)) if getattr(config, name) != ok}
    if wrong:
        raise ValueError(f"LLaDA2MoeModelLM routes without token dropping, auxiliary losses or jitter; "
                         f"config sets {wrong}")


def router_class():
    """megatron-core's TopKRouter routing as `blockdiff.models.llada2_moe.route` (imported late: megatron), and
    counting each expert's tokens in training forwards for the step's log (`expert_load`; Megatron's own count,
    `local_tokens_per_expert`, is spent and reset by the bias update before the step ends)."""
    from megatron.core.transformer.moe.router import TopKRouter

    class LLaDA2Router(TopKRouter):
        def __init__(self, config, pg_collection=None) -> None:
            super().__init__(config=config, pg_collection=pg_collection)
            self.register_buffer("step_load", torch.zeros(config.num_moe_experts), persistent=False)

        def routing(self, logits: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
            c = self.config
            logits = logits.view(-1, c.num_moe_experts)
            experts, weights = route(torch.sigmoid(logits.float()), self.expert_bias, c.moe_router_num_groups,
                                     c.moe_router_group_topk, c.moe_router_topk, c.moe_router_topk_scaling_factor)
            probs = torch.zeros_like(logits).scatter(1, experts, weights.type_as(logits))
            routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, experts, True)
            self._apply_expert_bias(routing_map, padding_mask=None if padding_mask is None
                                    else padding_mask.reshape(-1))
            if self.training and torch.is_grad_enabled():
                self.step_load += routing_map.sum(dim=0)
            return probs, routing_map

    return LLaDA2Router


def expert_load(model) -> dict[str, list[int]]:
    """Tokens each expert of each MoE layer received in training forwards since the last call, summed over the
    tensor-, context- and data-parallel ranks (each routes its own tokens) and gathered from every pipeline stage:
    {layer index: [tokens per expert]}; empty for a dense model. Resets the counts. Every rank calls it."""
    from megatron.core import parallel_state

    if not model.config.num_moe_experts:  # a dense model: no collective on every step
        return {}
    loads = {}
    for layer in model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is None:
            continue
        counts = router.step_load.clone()
        router.step_load.zero_()
        dist.all_reduce(counts, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
        loads[str(layer.layer_number - 1)] = [int(n) for n in counts.tolist()]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, loads, group=parallel_state.get_pipeline_model_parallel_group())
        loads = {layer: load for stage in stages for layer, load in stage.items()}
    return loads


def layer_names(cfg: LLaDA2MoeConfig, layer: int, experts: list[tuple[int, int]]
                ) -> tuple[dict[str, str], dict[str, str]]:
    """One layer's tensors besides the fused QKV as `megatron_model.layer_names` gives them (Megatron name -> HF
    name; gated MLPs by prefix): a dense MLP below `first_k_dense_replace`, else the router, the shared expert and
    the experts `experts` ((Megatron index, checkpoint index) pairs: an expert-parallel rank numbers its share
    from 0)."""
    tensors = {"self_attention.linear_proj.weight": "attention.dense.weight",
               "self_attention.q_layernorm.weight": "attention.query_layernorm.weight",
               "self_attention.k_layernorm.weight": "attention.key_layernorm.weight",
               "input_layernorm.weight": "input_layernorm.weight",
               "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
    if layer < cfg.first_k_dense_replace:
        return tensors, {"mlp.": "mlp."}
    tensors |= {"mlp.router.weight": "mlp.gate.weight", "mlp.router.expert_bias": "mlp.gate.expert_bias"}
    return tensors, {"mlp.shared_experts.": "mlp.shared_experts.",
                     **{f"mlp.experts.local_experts.{m}.": f"mlp.experts.{h}." for m, h in experts}}
