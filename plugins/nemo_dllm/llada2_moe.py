"""LLaDA2.0's MoE decoder (`LLaDA2MoeModelLM`, the layout of LLaDA2.0-mini/flash) as a megatron-core GPTModel built
from megatron-core's own MoE layers, weights in and out by the public checkpoints' names.

megatron-core has every piece but one: its group-limited routing scores a group by the sum of its best
`topk // group_topk` experts, the LLaDA2 code by its best two (the same only when topk = 2 x group_topk, as in
LLaDA2.0-mini/flash). `LLaDA2Router` is megatron-core's router with the checkpoint's routing
(`blockdiff.models.llada2_moe.route`, the rule the core's router calls), so every config accepted here routes as the checkpoint
does; the router's expert-bias bookkeeping (`local_tokens_per_expert`, read by Megatron's bias update) is Megatron's.

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


def hf_to_megatron(hf: dict[str, Tensor], cfg: LLaDA2MoeConfig, layer: int, rows, cols, qkv_rows,
                   ep_rank: int, ep_size: int) -> dict[str, Tensor]:
    """One layer's MLP and attention from the HF names (`model.layers.{layer}.`) to Megatron's, this rank's shard:
    `rows`/`cols` split a weight for tensor parallelism, `qkv_rows` builds the fused QKV, experts are this
    expert-parallel rank's share, numbered locally."""
    src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    d = cfg.head_dim
    q, k, v = hf[src + "attention.query_key_value.weight"].split(
        [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d])
    out = {dst + "self_attention.linear_qkv.weight": qkv_rows(q, k, v),
           dst + "self_attention.linear_proj.weight": cols(hf[src + "attention.dense.weight"]),
           dst + "self_attention.q_layernorm.weight": hf[src + "attention.query_layernorm.weight"].clone(),
           dst + "self_attention.k_layernorm.weight": hf[src + "attention.key_layernorm.weight"].clone(),
           dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"].clone(),
           dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"].clone()}

    def gated(mlp: str, into: str) -> None:  # each rank holds [its gate rows; its up rows]
        out[into + "linear_fc1.weight"] = torch.cat([rows(hf[mlp + "gate_proj.weight"]),
                                                     rows(hf[mlp + "up_proj.weight"])])
        out[into + "linear_fc2.weight"] = cols(hf[mlp + "down_proj.weight"])

    if layer < cfg.first_k_dense_replace:
        gated(src + "mlp.", dst + "mlp.")
        return out
    out[dst + "mlp.router.weight"] = hf[src + "mlp.gate.weight"].clone()
    out[dst + "mlp.router.expert_bias"] = hf[src + "mlp.gate.expert_bias"].clone()
    gated(src + "mlp.shared_experts.", dst + "mlp.shared_experts.")
    local = cfg.num_experts // ep_size
    for j in range(local):
        gated(f"{src}mlp.experts.{ep_rank * local + j}.", f"{dst}mlp.experts.local_experts.{j}.")
    return out


def megatron_to_hf(first: dict[str, Tensor], cfg: LLaDA2MoeConfig, layer: int, rows, cols, gated_halves
                   ) -> dict[str, Tensor]:
    """The inverse of `hf_to_megatron` for one layer, from every tensor-parallel rank's tensors under whole-model
    names (experts numbered globally, `megatron_state`): `rows`/`cols` concatenate a weight's shards, `gated_halves`
    splits fused gate/up rows back."""
    src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    hf = {dst + "attention.dense.weight": cols(src + "self_attention.linear_proj.weight"),
          dst + "attention.query_layernorm.weight": first[src + "self_attention.q_layernorm.weight"],
          dst + "attention.key_layernorm.weight": first[src + "self_attention.k_layernorm.weight"],
          dst + "input_layernorm.weight": first[src + "input_layernorm.weight"],
          dst + "post_attention_layernorm.weight": first[src + "pre_mlp_layernorm.weight"]}

    def gated(mlp: str, into: str) -> None:
        hf[into + "gate_proj.weight"], hf[into + "up_proj.weight"] = gated_halves(mlp + "linear_fc1.weight")
        hf[into + "down_proj.weight"] = cols(mlp + "linear_fc2.weight")

    if layer < cfg.first_k_dense_replace:
        gated(src + "mlp.", dst + "mlp.")
        return hf
    hf[dst + "mlp.gate.weight"] = first[src + "mlp.router.weight"]
    hf[dst + "mlp.gate.expert_bias"] = first[src + "mlp.router.expert_bias"]
    gated(src + "mlp.shared_experts.", dst + "mlp.shared_experts.")
    for e in range(cfg.num_experts):
        gated(f"{src}mlp.experts.local_experts.{e}.", f"{dst}mlp.experts.{e}.")
    return hf
