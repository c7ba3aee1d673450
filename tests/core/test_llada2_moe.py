"""The pure-PyTorch LLaDA2MoeModelLM: the public weight names, the router against a brute-force reading of its rule,
the MoE layer against a per-token loop, and the cached decoder against the no-cache oracle on it. (Its logits against
vLLM's implementation of the same weights: tests/vllm/test_decoding.py, every denoising step.)"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdiff.decoding import DecodeParams, ReferenceDecoder, oracle_decode
from blockdiff.masks import block_causal_mask
from blockdiff.models import (
    BlockDiffusionSettings,
    build_model,
    init_weights,
    load_model,
    save_model,
    save_weights,
    tiny_dense_config,
    tiny_llada2_config,
)
from blockdiff.models.layers import apply_rope, rope_cos_sin
from blockdiff.models.llada2_moe import LLaDA2MoeConfig, dense_qwen3_as_llada2

VOCAB, MASK, EOS = 64, 63, 62


@pytest.fixture(scope="module")
def model():
    cfg = tiny_llada2_config(VOCAB, MASK, EOS)
    return init_weights(build_model(cfg), 0, std=0.25).eval()


def test_weight_names_are_the_public_checkpoint_layout(model):
    names = set(model.state_dict())
    for name in ["model.word_embeddings.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.attention.query_key_value.weight", "model.layers.0.attention.dense.weight",
                 "model.layers.0.attention.query_layernorm.weight", "model.layers.0.attention.key_layernorm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias",
                 "model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight"]:
        assert name in names, name
    assert "model.layers.0.mlp.gate.weight" not in names  # first_k_dense_replace = 1


def brute_force_route(scores: torch.Tensor, bias: torch.Tensor, cfg: LLaDA2MoeConfig) -> tuple[set, torch.Tensor]:
    """One token: best `topk_group` groups by the sum of their two best biased scores, then the best experts inside
    them by biased score; weights are the unbiased scores, renormalised and scaled."""
    per_group = cfg.num_experts // cfg.n_group
    biased = (scores + bias).tolist()
    group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(cfg.n_group)]
    groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
    allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
    experts = sorted(allowed, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
    w = scores[experts]
    return set(experts), dict(zip(experts, (w / w.sum() * cfg.routed_scaling_factor).tolist()))


def test_router_matches_its_rule(model):
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(50, gate.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    experts, weights = gate(x)
    scores = torch.sigmoid(x @ gate.weight.T)
    for t in range(len(x)):
        want_experts, want_weights = brute_force_route(scores[t], gate.expert_bias.detach(), gate.cfg)
        assert set(experts[t].tolist()) == want_experts
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            assert w == pytest.approx(want_weights[e], abs=1e-6)


def test_expert_bias_changes_the_choice_not_the_weights(model):
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(20, gate.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    before = gate(x)
    with torch.no_grad():
        saved = gate.expert_bias.clone()
        gate.expert_bias.zero_()
        gate.expert_bias[0] = 100.0  # expert 0 now always chosen, with its unbiased weight
        experts, weights = gate(x)
        gate.expert_bias.copy_(saved)
    assert (experts == 0).any(-1).all()
    assert not torch.equal(before[0], experts)
    assert (weights < gate.cfg.routed_scaling_factor).all()


def test_moe_layer_equals_a_per_token_loop(model):
    moe = model.model.layers[1].mlp
    x = torch.randn(2, 7, moe.gate.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    got = moe(x)
    flat = x.reshape(-1, x.shape[-1])
    experts, weights = moe.gate(flat)
    want = torch.stack([
        moe.shared_experts(flat[t]) + sum(weights[t, j] * moe.experts[e](flat[t])
                                          for j, e in enumerate(experts[t].tolist()))
        for t in range(len(flat))])
    torch.testing.assert_close(got.reshape(-1, x.shape[-1]), want, atol=1e-5, rtol=1e-5)


def test_partial_rope_leaves_the_second_half_of_each_head_unrotated(model):
    attn = model.model.layers[0].attention
    x = torch.randn(1, 5, attn.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    _, k, _ = attn.query_key_value(x).split(attn.sizes, dim=-1)
    k = attn.key_layernorm(k.view(1, 5, -1, attn.cfg.head_dim))
    # positions shifted: only the rotary half of k may change
    rot = attn.cfg.rotary_dim
    a = apply_rope(k.transpose(1, 2), *rope_cos_sin(torch.arange(5)[None], rot, attn.cfg.rope_theta, x.dtype))
    b = apply_rope(k.transpose(1, 2), *rope_cos_sin(torch.arange(5)[None] + 9, rot, attn.cfg.rope_theta, x.dtype))
    assert torch.equal(a[..., rot:], b[..., rot:]) and not torch.allclose(a[..., :rot], b[..., :rot])


@settings(max_examples=15, deadline=None)
@given(prompt=st.lists(st.integers(0, 61), min_size=1, max_size=40), block=st.sampled_from([4, 8, 32]),
       threshold=st.sampled_from([0.3, 0.95]))
def test_cached_decoder_equals_oracle_on_llada2(model, prompt, block, threshold):
    params = DecodeParams(max_tokens=24, block_size=block, threshold=threshold)
    got = ReferenceDecoder(model, MASK, (EOS,)).generate([prompt], params)[0]
    want = oracle_decode(model, prompt, params, MASK, (EOS,))
    assert (got.tokens, got.finish_reason, got.denoise_forwards) == (want.tokens, want.finish_reason,
                                                                     want.denoise_forwards)


def test_directory_round_trip_and_settings(tmp_path, model):
    cfg = tiny_llada2_config(VOCAB, MASK, EOS)
    save_model(model, cfg, tmp_path)
    loaded, cfg2 = load_model(tmp_path)
    ids = torch.arange(10)[None]
    mask = torch.ones(1, 10, 10, dtype=torch.bool)
    torch.testing.assert_close(loaded(ids, torch.arange(10)[None], mask), model(ids, torch.arange(10)[None], mask))
    assert BlockDiffusionSettings.from_config(cfg2).mask_token_id == MASK
    public = {k: v for k, v in cfg.items() if k != "block_diffusion"}
    assert BlockDiffusionSettings.from_config(public) == BlockDiffusionSettings(156895, (156892,))


@pytest.mark.parametrize("key,value,match", [("n_group", 3, "divisible"), ("topk_group", 5, "topk_group"),
                                             ("num_experts_per_tok", 5, "exceeds"),
                                             ("score_function", "softmax", "sigmoid"), ("use_bias", True, "biases")])
def test_bad_configs_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model({**tiny_llada2_config(VOCAB, MASK, EOS), key: value})


def test_group_limit_is_exercised(model):
    """With 8 experts in 4 groups and 2 groups kept, some tokens' 2 best experts overall lie outside the kept groups;
    otherwise the router test above could not tell group-limited from plain top-k."""
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(200, gate.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    experts, _ = gate(x)
    plain = (torch.sigmoid(x @ gate.weight.T) + gate.expert_bias).topk(2, dim=-1).indices
    differs = [set(a) != set(b) for a, b in zip(experts.tolist(), plain.tolist())]
    assert any(differs)


def test_transformers_reads_the_llada2_config_and_its_settings(tmp_path, model):
    from transformers import AutoConfig

    from blockdiff.models.hf_config import LLaDA2MoeHFConfig, block_diffusion_settings, is_block_diffusion

    AutoConfig.register(LLaDA2MoeHFConfig.model_type, LLaDA2MoeHFConfig, exist_ok=True)
    save_model(model, tiny_llada2_config(VOCAB, MASK, EOS), tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, LLaDA2MoeHFConfig) and hf.num_experts == 8 and hf.rope_parameters["rope_theta"] == 600000
    assert is_block_diffusion(hf) and block_diffusion_settings(hf).mask_token_id == MASK
    assert block_diffusion_settings(LLaDA2MoeHFConfig(architectures=["LLaDA2MoeModelLM"])).mask_token_id == 156895


def test_a_dense_qwen3_written_as_llada2_gives_the_same_logits(tmp_path):
    """`dense_qwen3_as_llada2` (what benchmarks.peer_engines serves on SGLang's LLaDA2 path): renamed weights and a
    fused QKV only, so the logits are bit-identical; and an HF directory that loads back as LLaDA2MoeModelLM."""
    cfg = tiny_dense_config(vocab_size=VOCAB, num_hidden_layers=2)
    qwen3 = init_weights(build_model(cfg), 0, std=0.2).eval()
    save_weights(*dense_qwen3_as_llada2(qwen3.state_dict(), cfg), tmp_path)
    llada2, written = load_model(tmp_path)
    assert written["architectures"] == ["LLaDA2MoeModelLM"] and written["first_k_dense_replace"] == 2
    ids = torch.randint(0, VOCAB - 1, (2, 40), generator=torch.Generator().manual_seed(0))
    positions, mask = torch.arange(40).expand(2, -1), block_causal_mask(40, 8)[None].expand(2, -1, -1)
    with torch.no_grad():
        assert torch.equal(qwen3(ids, positions, mask), llada2.eval()(ids, positions, mask))
    with pytest.raises(ValueError, match="model_type='llama'"):
        dense_qwen3_as_llada2(qwen3.state_dict(), {**cfg, "model_type": "llama"})
