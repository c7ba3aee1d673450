"""A Hugging Face decoder (dense Qwen3 / Llama, or LLaDA2.0's MoE: `nemo_dllm.llada2_moe`) as a megatron-core
GPTModel, weights in and out by name mapping, and the forward that block-diffusion training needs.

GPTModel's own forward numbers RoPE positions 0..S-1 over the input, but the `[x_noisy, x_clean]` input reuses
positions 0..L-1 for both halves and packed documents restart them. So `forward` runs GPTModel's own submodules
(embedding, decoder, output layer) with rotary embeddings computed from explicit position ids, and the core's mask
in the core's attention (`nemo_dllm.attention`). Under context parallelism each rank runs its share of the sequence,
balanced by attention work (`parallel.context_parallel_shares`), and the logits are gathered back into sequence
order, so the objective sees the whole sequence on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from blockdiff.models import DenseConfig, LLaDA2MoeConfig
from nemo_dllm import llada2_moe, parallel
from nemo_dllm.attention import BlockDiffusionAttention


def model_config(hf_config: dict[str, Any]) -> DenseConfig | LLaDA2MoeConfig:
    """The core's reading of the checkpoint's config.json (the fields both architectures share name the same)."""
    return (LLaDA2MoeConfig if llada2_moe.is_llada2(hf_config) else DenseConfig).from_hf(hf_config)


def transformer_config(hf_config: dict[str, Any], tp_size: int = 1):
    """megatron-core's TransformerConfig for an HF decoder: fp32, local (non-TE) layers, no fusions; LLaDA2.0's MoE
    layers as `llada2_moe.moe_fields`. The parallel sizes are NeMo's strategy's to set
    (`set_model_parallel_attributes`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = model_config(hf_config)
    moe = llada2_moe.moe_fields(cfg) if isinstance(cfg, LLaDA2MoeConfig) else {}
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim, ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, qk_layernorm=cfg.qk_norm,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        # pipeline parallel: [x_noisy, x_clean] (2L), MDLM (L) and SFT rows (their batch's widest) differ in length, so
        # stages send shapes first; on gloo, sends and receives go one by one (batched ones are matched out of order)
        variable_seq_lengths=True, pipeline_dtype=torch.float32, batch_p2p_comm=torch.cuda.is_available(),
        batch_p2p_sync=torch.cuda.is_available(),
        moe_token_dispatcher_type="alltoall",  # megatron-core refuses the default with variable lengths
        **moe,
    )


class RMSNorm(torch.nn.RMSNorm):
    """megatron-core's torch RMSNorm (`WrappedTorchNorm`, the same module), which also runs under sequence parallelism:
    each tensor-parallel rank then normalises its own slice of the sequence, so the weight's gradient is summed over
    the ranks, which Megatron's `finalize_model_grads` does for parameters marked `sequence_parallel`
    (WrappedTorchNorm refuses sequence parallelism instead of marking its weight)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


# Megatron's (and NeMo's `make_vocab_size_divisible_by`) default unit of vocabulary padding
VOCAB_PADDING_UNIT = 128


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary Megatron holds: tensor parallelism splits the embedding and output rows evenly, so a vocabulary
    is padded with zero rows at the end (a real tokenizer plus an added mask token: 49,153 -> 49,280), to a multiple of
    128 and of the tensor-parallel size. With a power-of-two tensor-parallel size that is the same padding at every
    size, so a distributed checkpoint resumes at another one (the same rule per tensor-parallel size, as Megatron's,
    would not)."""
    return -(-vocab_size // math.lcm(VOCAB_PADDING_UNIT, tp_size)) * math.lcm(VOCAB_PADDING_UNIT, tp_size)


def build_gpt_model(hf_config: dict[str, Any], tp_size: int = 1, config=None, pre_process: bool = True,
                    post_process: bool = True):
    """An fp32 GPTModel with megatron-core's local (non-Transformer-Engine) layers and the core's attention; with
    pipeline parallelism, this rank's stage (`pre_process`: it embeds, `post_process`: it has the output layer).
    Parallel state must be initialised."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.enums import AttnMaskType

    cfg = model_config(hf_config)
    config = config or transformer_config(hf_config, tp_size)
    ep_size = config.expert_model_parallel_size
    if ep_size > 1 and (not config.num_moe_experts or config.num_moe_experts % ep_size):
        raise ValueError(f"trainer.expert_parallel {ep_size} needs a MoE model whose experts it divides; "
                         f"{hf_config['architectures'][0]} has {config.num_moe_experts or 'no'} experts")
    if config.num_moe_experts and config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
        raise ValueError(f"trainer.tensor_parallel {config.tensor_model_parallel_size} on a MoE model needs "
                         "trainer.sequence_parallel: true (megatron-core runs MoE layers under tensor parallelism "
                         "only with sequence parallelism)")
    if isinstance(cfg, LLaDA2MoeConfig):
        llada2_moe.check_training_config(config)
    # this pipeline stage's layers (dense, or dense and MoE as `config.moe_layer_freq` says), local (non-TE) modules
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    spec.layer_norm = RMSNorm
    for layer in spec.layer_specs:
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNorm
        attention = layer.submodules.self_attention
        attention.params["attn_mask_type"] = AttnMaskType.arbitrary
        attention.submodules.core_attention = BlockDiffusionAttention
        if cfg.qk_norm:
            attention.submodules.q_layernorm = attention.submodules.k_layernorm = RMSNorm
        if config.num_moe_experts and hasattr(layer.submodules.mlp.submodules, "router"):
            layer.submodules.mlp.submodules.router = llada2_moe.router_class()
    model = GPTModel(config, spec, vocab_size=padded_vocab_size(cfg.vocab_size, config.tensor_model_parallel_size),
                     max_sequence_length=hf_config.get("max_position_embeddings", 4096),
                     parallel_output=True, share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                     position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
                     rotary_percent=cfg.rotary_dim / cfg.head_dim, pre_process=pre_process,
                     scatter_embedding_sequence_parallel=False,  # `forward` slices it: the objective needs it whole
                     post_process=post_process)
    model.checkpoint_vocab_size = cfg.vocab_size  # `forward` returns logits over these tokens only
    return model


def _rope(model, position_ids: Tensor) -> Tensor:
    """Rotary angles [s, b, 1, head_dim] for explicit position ids [b, s] (rotate-half layout, as HF and Megatron)."""
    inv_freq = model.rotary_pos_emb.inv_freq.to(position_ids.device)
    freqs = position_ids.transpose(0, 1).float()[..., None] * inv_freq
    return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]


def embed(model, input_ids: Tensor) -> Tensor:
    """Token embeddings [s, b, h] (Megatron's sequence-first layout)."""
    return model.embedding(input_ids=input_ids, position_ids=None)


@dataclass(frozen=True)
class DiffusionForward:
    """A GPTModel as the core's objectives take a model (`blockdiff.objectives.DiffusionForward`): batch-first in and
    out, so the core decides where embedding noise goes and which half is scored. On a pipeline stage, the input of a
    stage after the first arrives from the previous stage (its `embed` is a placeholder the decoder ignores), and a
    stage before the last returns its activations [b, s, hidden] instead of logits."""

    model: Any
    flex_attention: bool = False

    def embed(self, input_ids: Tensor) -> Tensor:
        if not self.model.pre_process:
            return torch.zeros(*input_ids.shape, 1, device=input_ids.device)
        return embed(self.model, input_ids).transpose(0, 1)

    def __call__(self, embeddings: Tensor, positions: Tensor, allowed: Tensor) -> Tensor:
        return forward(self.model, None, positions, allowed, embeddings=embeddings.transpose(0, 1))


def forward(model, input_ids: Tensor | None, position_ids: Tensor, allowed: Tensor | BlockMask,
            embeddings: Tensor | None = None) -> Tensor:
    """Logits [b, s, vocab], full vocabulary and whole sequence on every tensor- and context-parallel rank (on a
    pipeline stage before the last: its activations [b, s_rank, hidden], this rank's share of the sequence).
    `allowed` is the core's mask, True = may attend: bool [b, s, s] or a FlexAttention BlockMask."""
    from megatron.core import parallel_state

    hidden = embed(model, input_ids) if embeddings is None else embeddings
    cp_rank, cp_size = parallel.cp_rank_and_size()
    if cp_size > 1:
        if isinstance(allowed, BlockMask):
            raise ValueError("FlexAttention block masks do not run under context parallelism: use dense attention")
        shares = parallel.context_parallel_shares(allowed.sum(dim=(0, 2)), cp_size)
        rows, gathered = shares[cp_rank], torch.cat(shares)
        hidden, position_ids = hidden[rows], position_ids[:, rows]
        allowed = allowed[:, rows][:, :, gathered]  # keys arrive gathered in rank order (`nemo_dllm.attention`)
    if model.config.sequence_parallel:
        hidden = _sequence_parallel_input(hidden if model.pre_process else None, position_ids.shape[1], allowed)
    mask = allowed if isinstance(allowed, BlockMask) else allowed[:, None]
    # a stage after the first reads its input from the previous stage (set by the schedule), whatever is passed
    hidden = model.decoder(hidden_states=hidden if model.pre_process else None, attention_mask=mask,
                           rotary_pos_emb=_rope(model, position_ids))
    if not model.post_process:
        return hidden.transpose(0, 1)
    logits, _ = model.output_layer(hidden, weight=model.shared_embedding_or_output_weight()
                                   if model.share_embeddings_and_output_weights else None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:  # every rank scores the same logits
        logits = parallel.gather(logits, -1, parallel_state.get_tensor_model_parallel_group(), sum_grads=False)
    if cp_size > 1:
        logits = parallel.gather(logits, 0, parallel_state.get_context_parallel_group(), sum_grads=False)
        logits = logits[torch.argsort(gathered)]
    # the padding rows' logits are cut off: never scored, never proposed
    return logits[..., : model.checkpoint_vocab_size].transpose(0, 1).float()


def _sequence_parallel_input(hidden: Tensor | None, length: int, allowed: Tensor | BlockMask) -> Tensor | None:
    """Megatron's sequence parallelism (required with MoE layers under tensor parallelism): each tensor-parallel rank
    runs its slice of the sequence between attention blocks, so the decoder's input is this rank's slice of the
    embedding, which stays whole until here (the objective adds its noise to it). Rows are a multiple of the block
    size (and `[x_noisy, x_clean]` twice that), so an even tensor-parallel split of them is the rule."""
    from megatron.core import parallel_state, tensor_parallel

    if isinstance(allowed, BlockMask):
        raise ValueError("FlexAttention block masks do not run under sequence parallelism: use dense attention")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if length % tp_size:
        raise ValueError(f"sequence parallelism splits each row over the {tp_size} tensor-parallel ranks: a row of "
                         f"{length} positions does not split evenly")
    # the first pipeline stage's whole embedding; later stages receive their slice from the previous stage
    return None if hidden is None else tensor_parallel.scatter_to_sequence_parallel_region(hidden)


def _qkv_rows(cfg: DenseConfig | LLaDA2MoeConfig, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Megatron's fused QKV weight: per query group, that group's query heads, then its key, then its value."""
    d, groups = cfg.head_dim, cfg.num_key_value_heads
    per_group = cfg.num_attention_heads // groups
    q = q.view(groups, per_group * d, -1)
    k, v = k.view(groups, d, -1), v.view(groups, d, -1)
    return torch.cat([q, k, v], dim=1)  # [groups, (per_group + 2) * d, hidden]


def _embedding_name(hf_config: dict[str, Any]) -> str:
    return "model.word_embeddings.weight" if llada2_moe.is_llada2(hf_config) else "model.embed_tokens.weight"


# The one tensor of a layer split under tensor parallelism among those `layer_names` lists: by input columns.
PROJECTION = "self_attention.linear_proj.weight"


def layer_names(cfg: DenseConfig | LLaDA2MoeConfig, layer: int, experts: list[tuple[int, int]]
                ) -> tuple[dict[str, str], dict[str, str]]:
    """One decoder layer's tensors besides the fused QKV: (Megatron name under `decoder.layers.{i}.` -> HF name under
    `model.layers.{i}.`, each copied whole but `PROJECTION`; gated MLPs, Megatron prefix -> HF prefix, `linear_fc1`
    = [gate_proj; up_proj] and `linear_fc2` = down_proj). Qwen3/Llama here, LLaDA2 in `llada2_moe.layer_names`
    (`experts`: its MoE layers' (Megatron index, checkpoint index) pairs)."""
    if isinstance(cfg, LLaDA2MoeConfig):
        return llada2_moe.layer_names(cfg, layer, experts)
    tensors = {PROJECTION: "self_attn.o_proj.weight", "input_layernorm.weight": "input_layernorm.weight",
               "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
    if cfg.qk_norm:
        tensors |= {"self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
                    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight"}
    return tensors, {"mlp.": "mlp."}


def _hf_q_k_v(cfg: DenseConfig | LLaDA2MoeConfig, hf: dict[str, Tensor], layer: str) -> tuple[Tensor, ...]:
    """A layer's query, key and value weights (LLaDA2 fuses them into one tensor, rows in that order)."""
    if isinstance(cfg, LLaDA2MoeConfig):
        d = cfg.head_dim
        return hf[layer + "attention.query_key_value.weight"].split(
            [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d])
    return tuple(hf[layer + f"self_attn.{p}_proj.weight"] for p in "qkv")


def _hf_qkv_names(cfg: DenseConfig | LLaDA2MoeConfig, layer: str, q: Tensor, k: Tensor, v: Tensor
                  ) -> dict[str, Tensor]:
    if isinstance(cfg, LLaDA2MoeConfig):
        return {layer + "attention.query_key_value.weight": torch.cat([q, k, v])}
    return {layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
            layer + "self_attn.v_proj.weight": v}


def hf_to_megatron(hf: dict[str, Tensor], hf_config: dict[str, Any], tp_rank: int = 0, tp_size: int = 1,
                   ep_rank: int = 0, ep_size: int = 1) -> dict[str, Tensor]:
    """This rank's shard of the Megatron state dict from HF weights (names as Qwen3/LlamaForCausalLM or
    LLaDA2MoeModelLM; a MoE layer's experts are this expert-parallel rank's share, numbered locally)."""
    cfg = model_config(hf_config)

    def rows(t: Tensor) -> Tensor:  # column-parallel: split the output dim
        return t.chunk(tp_size, dim=0)[tp_rank].clone()

    def cols(t: Tensor) -> Tensor:  # row-parallel: split the input dim
        return t.chunk(tp_size, dim=1)[tp_rank].clone()

    def vocab_rows(t: Tensor) -> Tensor:
        padding = padded_vocab_size(cfg.vocab_size, tp_size) - cfg.vocab_size
        return rows(F.pad(t, (0, 0, 0, padding)))

    out = {"embedding.word_embeddings.weight": vocab_rows(hf[_embedding_name(hf_config)]),
           "decoder.final_layernorm.weight": hf["model.norm.weight"].clone()}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = vocab_rows(hf["lm_head.weight"])
    local = cfg.num_experts // ep_size if isinstance(cfg, LLaDA2MoeConfig) else 0
    experts = [(j, ep_rank * local + j) for j in range(local)]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = _qkv_rows(cfg, *_hf_q_k_v(cfg, hf, src))
        out[dst + "self_attention.linear_qkv.weight"] = qkv.chunk(tp_size, dim=0)[tp_rank].reshape(
            -1, cfg.hidden_size).clone()
        tensors, gated_mlps = layer_names(cfg, i, experts)
        for name, hf_name in tensors.items():
            out[dst + name] = cols(hf[src + hf_name]) if name == PROJECTION else hf[src + hf_name].clone()
        for mlp, hf_mlp in gated_mlps.items():  # each rank holds [its gate rows; its up rows]
            out[dst + mlp + "linear_fc1.weight"] = torch.cat([rows(hf[src + hf_mlp + "gate_proj.weight"]),
                                                              rows(hf[src + hf_mlp + "up_proj.weight"])])
            out[dst + mlp + "linear_fc2.weight"] = cols(hf[src + hf_mlp + "down_proj.weight"])
    return out


def megatron_to_hf(shards: list[dict[str, Tensor]], hf_config: dict[str, Any]) -> dict[str, Tensor]:
    """HF weights from every tensor-parallel rank's Megatron state dict (rank order; experts numbered globally, as
    `megatron_state` names them)."""
    cfg = model_config(hf_config)
    first = shards[0]

    def rows(name: str) -> Tensor:
        return torch.cat([s[name] for s in shards], dim=0)

    def cols(name: str) -> Tensor:
        return torch.cat([s[name] for s in shards], dim=1)

    def gated_halves(name: str) -> tuple[Tensor, Tensor]:  # each rank's [gate rows; up rows], back to gate and up
        halves = [s[name].chunk(2, dim=0) for s in shards]
        return torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])

    hf = {_embedding_name(hf_config): rows("embedding.word_embeddings.weight")[: cfg.vocab_size],
          "model.norm.weight": first["decoder.final_layernorm.weight"]}
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = rows("output_layer.weight")[: cfg.vocab_size]
    d, groups = cfg.head_dim, cfg.num_key_value_heads
    per_group = cfg.num_attention_heads // groups
    experts = [(e, e) for e in range(cfg.num_experts)] if isinstance(cfg, LLaDA2MoeConfig) else []
    for i in range(cfg.num_hidden_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = rows(src + "self_attention.linear_qkv.weight").view(groups, (per_group + 2) * d, -1)
        q = qkv[:, : per_group * d].reshape(-1, cfg.hidden_size)
        k = qkv[:, per_group * d: (per_group + 1) * d].reshape(-1, cfg.hidden_size)
        v = qkv[:, (per_group + 1) * d:].reshape(-1, cfg.hidden_size)
        hf |= _hf_qkv_names(cfg, dst, q, k, v)
        tensors, gated_mlps = layer_names(cfg, i, experts)
        for name, hf_name in tensors.items():
            hf[dst + hf_name] = cols(src + name) if name == PROJECTION else first[src + name]
        for mlp, hf_mlp in gated_mlps.items():
            hf[dst + hf_mlp + "gate_proj.weight"], hf[dst + hf_mlp + "up_proj.weight"] = gated_halves(
                src + mlp + "linear_fc1.weight")
            hf[dst + hf_mlp + "down_proj.weight"] = cols(src + mlp + "linear_fc2.weight")
    return {k: v.contiguous() for k, v in hf.items()}


def _stage_layers(model) -> tuple[int, int]:
    """(index of this stage's first layer in the whole model, number of its layers)."""
    return model.decoder.layers[0].layer_number - 1, len(model.decoder.layers)


def stage_state(whole: dict[str, Tensor], model) -> dict[str, Tensor]:
    """This pipeline stage's part of a whole-model state dict (one tensor-parallel rank's): its layers renumbered
    from 0, the embedding on the first stage, the final norm and output layer on the last. With tied embeddings the
    last stage holds its own copy of the embedding as the output layer (Megatron keeps the two in step)."""
    first, count = _stage_layers(model)
    out = {}
    for name, tensor in whole.items():
        if name.startswith("decoder.layers."):
            index = int(name.split(".")[2])
            if first <= index < first + count:
                out[name.replace(f"decoder.layers.{index}.", f"decoder.layers.{index - first}.", 1)] = tensor
        elif model.pre_process if name.startswith("embedding.") else model.post_process:
            out[name] = tensor
    if model.share_embeddings_and_output_weights and model.post_process and not model.pre_process:
        out["output_layer.weight"] = whole["embedding.word_embeddings.weight"]
    return out


def whole_model_names(state: dict[str, Tensor], model) -> dict[str, Tensor]:
    """The inverse of `stage_state`: a stage's tensors under their whole-model names (the last stage's copy of a tied
    embedding left out)."""
    first, _ = _stage_layers(model)
    out = {}
    for name, tensor in state.items():
        if name.startswith("decoder.layers."):
            index = int(name.split(".")[2])
            name = name.replace(f"decoder.layers.{index}.", f"decoder.layers.{index + first}.", 1)
        elif name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            continue
        out[name] = tensor
    return out


def load_hf_weights(model, hf: dict[str, Tensor], hf_config: dict[str, Any], tp_rank: int, tp_size: int,
                    ep_rank: int = 0, ep_size: int = 1) -> None:
    """Load HF weights into this rank's GPTModel (its tensor-parallel shard of its pipeline stage, its
    expert-parallel share of the experts), strictly (Megatron's extra `_extra_state` entries aside)."""
    state = stage_state(hf_to_megatron(hf, hf_config, tp_rank, tp_size, ep_rank, ep_size), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"HF -> Megatron mapping does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _global_expert_names(state: dict[str, Tensor], model) -> dict[str, Tensor]:
    """Experts under their whole-model numbers: expert parallelism gives each rank a contiguous share, numbered
    from 0 on every rank."""
    config = model.config
    if not config.num_moe_experts:
        return state
    from megatron.core import parallel_state

    ep_size = config.expert_model_parallel_size
    offset = parallel_state.get_expert_model_parallel_rank() * (config.num_moe_experts // ep_size) if ep_size > 1 else 0
    out = {}
    for name, tensor in state.items():
        if ".local_experts." in name:
            head, tail = name.split(".local_experts.", 1)
            local, rest = tail.split(".", 1)
            name = f"{head}.local_experts.{int(local) + offset}.{rest}"
        out[name] = tensor
    return out


def megatron_state(model) -> dict[str, Tensor]:
    """This rank's tensors under their whole-model names (layers and experts numbered as in the whole model)."""
    return _global_expert_names(whole_model_names({k: v.detach().clone() for k, v in model.state_dict().items()
                                                   if not k.endswith("_extra_state")}, model), model)
