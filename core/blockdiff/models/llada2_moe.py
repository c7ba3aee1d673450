"""LLaDA2.0's MoE decoder (`LLaDA2MoeModelLM`, the layout of LLaDA2.0-mini/flash), with the public checkpoints'
weight names.

Layout: fused QKV, RMSNorm on q and k per head before a partial RoPE (the first `partial_rotary_factor` of each head,
half-split layout), the first `first_k_dense_replace` layers dense, the rest a sigmoid router with an expert bias used
for selection only, group-limited top-k (a group's score is the sum of its two best biased scores), top-k weights
renormalised when k > 1 (as the public training code does; a config whose `norm_topk_prob` says otherwise is refused)
and scaled by `routed_scaling_factor`, plus an always-on shared expert; untied head. The forward takes an
explicit attention mask like the dense reference, so the same decoders and oracle run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from blockdiff.models.layers import MLP, DecoderShell, KVCache, RMSNorm, apply_rope, attention


@dataclass(frozen=True)
class LLaDA2MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    moe_intermediate_size: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 600000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts {self.num_experts} is not divisible by n_group {self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.num_experts_per_tok > self.topk_group * self.num_experts // self.n_group:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts of "
                             f"{self.topk_group} groups")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError(f"a group is scored by its two best experts: {self.num_experts} experts in "
                             f"{self.n_group} groups leaves fewer than two per group")
        # LLaDA2's training code renormalises the routed weights exactly when top_k > 1 and does not read
        # norm_topk_prob; a config on which the two readings differ would be trained and served differently
        has_moe = self.first_k_dense_replace < self.num_hidden_layers
        if has_moe and self.norm_topk_prob != (self.num_experts_per_tok > 1):
            raise ValueError(f"norm_topk_prob={self.norm_topk_prob} with num_experts_per_tok="
                             f"{self.num_experts_per_tok}: LLaDA2 renormalises the routed weights exactly when "
                             f"more than one expert is chosen; set norm_topk_prob={self.num_experts_per_tok > 1}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_norm(self) -> bool:  # RMSNorm on q and k per head, always (as `DenseConfig.qk_norm` says for Qwen3)
        return True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "LLaDA2MoeConfig":
        for key, wanted in (("score_function", "sigmoid"), ("hidden_act", "silu")):
            if cfg.get(key, wanted) != wanted:
                raise ValueError(f"LLaDA2MoeModelLM needs {key}={wanted!r}, config has {cfg[key]!r}")
        for key in ("use_bias", "use_qkv_bias"):
            if cfg.get(key):
                raise ValueError(f"LLaDA2MoeModelLM reference has no biases, config sets {key}=true")
        rope = cfg.get("rope_parameters") or {}
        names = [f.name for f in cls.__dataclass_fields__.values()]
        values = {k: cfg[k] for k in names if k in cfg}
        values["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 600000.0))
        values.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        return cls(**values)


class Attention(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d = cfg.head_dim
        self.sizes = [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
        self.query_key_value = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=False)
        self.query_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.dense = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask, positions: Tensor,
                cache: KVCache | None, rows: Tensor | None, kv_len: int) -> Tensor:
        b, s, _ = x.shape
        d = self.cfg.head_dim
        q, k, v = self.query_key_value(x).split(self.sizes, dim=-1)
        q = apply_rope(self.query_layernorm(q.view(b, s, -1, d)).transpose(1, 2), cos, sin)
        k = apply_rope(self.key_layernorm(k.view(b, s, -1, d)).transpose(1, 2), cos, sin)
        v = v.view(b, s, -1, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, rows, positions, k, v, kv_len)
        out = attention(q, k, v, mask)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


def route(scores: Tensor, expert_bias: Tensor, n_group: int, topk_group: int, top_k: int, scaling: float
          ) -> tuple[Tensor, Tensor]:
    """LLaDA2's routing, from sigmoid scores [tokens, experts] (fp32): the `topk_group` groups with the highest sum of
    their two best biased scores, the `top_k` best biased experts inside them; their weights are the unbiased scores,
    renormalised when more than one is chosen, times `scaling`. Returns (expert ids, weights), each [tokens, top_k].
    The one routing rule: the core's router and the Megatron model's (`nemo_dllm.llada2_moe`) both call it."""
    biased = scores + expert_bias.float()
    tokens = len(scores)
    best_groups = biased.view(tokens, n_group, -1).topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    keep = torch.zeros(tokens, n_group, dtype=torch.bool, device=scores.device)
    keep[torch.arange(tokens, device=scores.device)[:, None], best_groups] = True
    biased = biased.masked_fill(~keep.repeat_interleave(scores.shape[1] // n_group, dim=1), float("-inf"))
    experts = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return experts, weights * scaling


class Router(nn.Module):
    """`mlp.gate`: sigmoid scores; the expert bias steers which experts are chosen but not their weights."""

    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [tokens, hidden] -> (expert ids [tokens, k], weights [tokens, k])."""
        cfg = self.cfg
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        return route(scores, self.expert_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                     cfg.routed_scaling_factor)


class MoE(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.gate(x)
        out = self.shared_experts(x)
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            out = out.index_add(0, token, self.experts[e](x[token]) * weights[token, slot, None].to(x.dtype))
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        dense = layer < cfg.first_k_dense_replace
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg)

    def forward(self, x: Tensor, *attn_args) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2MoeDecoder(DecoderShell):
    """`model.*` and `lm_head` as in the LLaDA2.0 safetensors; same call signature as `DenseDecoder`."""

    config_class = LLaDA2MoeConfig

    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self._init_head(self.model.word_embeddings)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.word_embeddings(input_ids)


def tiny_llada2_config(vocab_size: int, mask_token_id: int, eos_token_id: int, hidden_size: int = 64,
                       num_hidden_layers: int = 3, num_experts: int = 8, n_group: int = 4, topk_group: int = 2,
                       num_experts_per_tok: int = 2) -> dict[str, Any]:
    """A config.json for a tiny `LLaDA2MoeModelLM`, with the public checkpoints' keys (LLaDA2.0-mini's shape,
    scaled down)."""
    return {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok, "num_shared_experts": 1,
        "moe_intermediate_size": hidden_size // 2, "n_group": n_group, "topk_group": topk_group,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "router_dtype": "fp32", "use_qk_norm": True, "use_rmsnorm": True,
        "partial_rotary_factor": 0.5, "rope_theta": 600000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "use_bias": False, "use_qkv_bias": False, "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "embedding_dropout": 0.0, "output_dropout": 0.0, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
        "block_diffusion": {"mask_token_id": mask_token_id, "eos_token_ids": [eos_token_id], "block_size": 32,
                            "threshold": 0.95, "fallback_k": 1},
    }


def dense_qwen3_as_llada2(state: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A Qwen3 checkpoint (QK-norm, no attention biases) as a `LLaDA2MoeModelLM` with every layer dense
    (`first_k_dense_replace` = all layers) and RoPE over the whole head: the same function under LLaDA2's weight
    names, q/k/v concatenated into `query_key_value`, so a model trained here runs on the engines' LLaDA2 paths. The
    MoE fields are set to a valid tiny router that no layer uses. Returns the state dict and config.json."""
    if cfg.get("model_type") != "qwen3" or cfg.get("attention_bias"):
        raise ValueError(f"needs a Qwen3 config without attention biases, got model_type={cfg.get('model_type')!r}")
    renames = {"model.embed_tokens.": "model.word_embeddings.", ".self_attn.o_proj.": ".attention.dense.",
               ".self_attn.q_norm.": ".attention.query_layernorm.", ".self_attn.k_norm.": ".attention.key_layernorm."}
    out = {}
    for name, tensor in state.items():
        if any(f".self_attn.{p}_proj." in name for p in "qkv"):
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    for i in range(cfg["num_hidden_layers"]):
        qkv = [state[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        out[f"model.layers.{i}.attention.query_key_value.weight"] = torch.cat(qkv)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
            "eos_token_id", "pad_token_id", "block_diffusion", "rope_parameters", "rope_theta")
    llada2 = {k: cfg[k] for k in keep if k in cfg}
    llada2.update({"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "dtype": "float32",
                   "first_k_dense_replace": cfg["num_hidden_layers"], "partial_rotary_factor": 1.0,
                   "num_experts": 2, "num_experts_per_tok": 1, "num_shared_experts": 1,
                   "moe_intermediate_size": cfg["intermediate_size"], "n_group": 1, "topk_group": 1,
                   "routed_scaling_factor": 1.0, "norm_topk_prob": True, "score_function": "sigmoid",
                   "moe_router_enable_expert_bias": True, "router_dtype": "fp32", "use_qk_norm": True,
                   "use_rmsnorm": True, "use_bias": False, "use_qkv_bias": False, "hidden_act": "silu",
                   "embedding_dropout": 0.0, "output_dropout": 0.0})
    if "rope_theta" not in llada2:
        llada2["rope_theta"] = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return out, llada2
