"""LLaDA2.0's MoE architecture (`LLaDA2MoeModelLM`) on megatron-core's MoE layers (`nemo_dllm.llada2_moe`): the
public weight names in and out bit for bit, logits equal to the core's model on the block-diffusion, causal and full
masks, the checkpoint's routing (expert choice per token, weights), no token dropped, and the expert bias updated from
the experts' load."""

import pytest
import torch

from blockdiff.models import build_model, init_weights, tiny_llada2_config
from blockdiff.objectives import ReferenceForward, diffusion_logits, pretrain_loss
from conformance.runners.training import fixed_batch
from nemo_dllm import megatron_model
from nemo_dllm.llada2_moe import expert_load
from nemo_dllm.megatron_model import DiffusionForward

VOCAB, MASK, EOS = 64, 63, 62
# 8 experts in 4 groups, 2 groups kept, top-2: megatron-core's own group scoring (best topk // group_topk = 1 expert
# of a group) differs from the checkpoint's (best 2) here
CONFIG = tiny_llada2_config(VOCAB, MASK, EOS)


def _models(cfg: dict):
    ref = init_weights(build_model(cfg), 0, std=0.25).eval()
    with torch.no_grad():  # a trained checkpoint's expert bias is not zero; it must steer the choice on both sides
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.expert_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(7)) * 0.05)
    gpt = megatron_model.build_gpt_model(cfg)
    megatron_model.load_hf_weights(gpt, ref.state_dict(), cfg, 0, 1)
    return ref, gpt.eval()


@pytest.fixture(scope="module")
def models(megatron_single_process):
    return _models(CONFIG)


def test_import_then_export_is_bit_identical_under_the_public_names(models):
    ref, gpt = models
    back = megatron_model.megatron_to_hf([megatron_model.megatron_state(gpt)], CONFIG)
    want = ref.state_dict()
    assert back.keys() == want.keys()
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in back and "model.layers.0.mlp.gate_proj.weight" in back
    for name, tensor in want.items():
        assert torch.equal(back[name], tensor), name


def test_megatron_is_built_from_its_moe_layers_with_a_dense_first_layer(models):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    _, gpt = models
    kinds = [type(layer.mlp).__name__ for layer in gpt.decoder.layers]
    assert kinds == ["MLP", "MoELayer", "MoELayer"]
    moe = gpt.decoder.layers[1].mlp
    assert isinstance(moe, MoELayer) and isinstance(moe.experts, SequentialMLP) and moe.shared_experts is not None


@pytest.mark.parametrize("mask", ["full", "causal"])
def test_logits_equal_the_core_model(models, mask):
    ref, gpt = models
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40)[None].expand(2, -1)
    allowed = torch.ones(40, 40, dtype=torch.bool)
    allowed = (allowed.tril() if mask == "causal" else allowed)[None].expand(2, -1, -1)
    with torch.no_grad():
        want, got = ref(ids, positions, allowed), megatron_model.forward(gpt, ids, positions, allowed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective, block", [("bdlm", 4), ("mdlm", 32)])
def test_block_diffusion_logits_and_loss_equal_the_core_model(models, objective, block):
    """`[x_noisy, x_clean]` with the document-level block-diffusion mask, positions restarting per half and per
    packed document (BDLM), and the full mask over one half (MDLM)."""
    ref, gpt = models
    batch = fixed_batch(objective, block, VOCAB)
    with torch.no_grad():
        want = diffusion_logits(ReferenceForward(ref), batch)
        got = diffusion_logits(DiffusionForward(gpt), batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pretrain_loss(DiffusionForward(gpt), batch),
                                   pretrain_loss(ReferenceForward(ref), batch), atol=1e-5, rtol=1e-5)


def test_the_router_chooses_the_checkpoints_experts_with_its_weights(models):
    """Same hidden states into the core's router and Megatron's: the same experts for every token, the same weights.
    megatron-core's stock router, which scores a group by its best topk // group_topk experts, chooses differently
    for some of these tokens: the test tells the two rules apart."""
    from megatron.core.transformer.moe.router import TopKRouter

    ref, gpt = models
    core, router = ref.model.layers[1].mlp.gate, gpt.decoder.layers[1].mlp.router
    x = torch.randn(400, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        experts, weights = core(x)
        probs, routing_map = router(x[:, None])  # Megatron's [sequence, batch, hidden]
        stock_probs, stock_map = TopKRouter.routing(router, router.gating(x[:, None]))
    want_map = torch.zeros(400, 8, dtype=torch.bool).scatter(1, experts, True)
    assert torch.equal(routing_map, want_map)
    torch.testing.assert_close(probs, torch.zeros(400, 8).scatter(1, experts, weights), atol=1e-6, rtol=1e-6)
    assert not torch.equal(stock_map, want_map)


@pytest.mark.parametrize("top_k, norm_topk_prob", [(2, False), (1, True)])
def test_a_config_where_norm_topk_prob_and_the_training_code_disagree_is_refused(top_k, norm_topk_prob):
    """LLaDA2's training code renormalises the routed weights exactly when top_k > 1, whatever norm_topk_prob says."""
    cfg = {**CONFIG, "num_experts_per_tok": top_k, "norm_topk_prob": norm_topk_prob}
    with pytest.raises(ValueError, match=f"norm_topk_prob={norm_topk_prob} with num_experts_per_tok={top_k}"):
        megatron_model.transformer_config(cfg)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        build_model(cfg)


def test_no_token_is_dropped_when_every_token_wants_one_expert(megatron_single_process):
    """An expert bias that sends every token to expert 0: with any expert capacity most of them would be dropped
    (their routed output lost); here the outputs still equal the core's, which has no capacity."""
    ref, gpt = _models(CONFIG)
    with torch.no_grad():
        for core_layer, layer in zip(ref.model.layers[1:], gpt.decoder.layers[1:]):
            core_layer.mlp.gate.expert_bias[0] = 100.0
            layer.mlp.router.expert_bias[0] = 100.0
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    positions, allowed = torch.arange(40)[None].expand(2, -1), torch.ones(2, 40, 40, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(megatron_model.forward(gpt, ids, positions, allowed), ref(ids, positions, allowed),
                                   atol=1e-5, rtol=1e-5)
        _, routing_map = gpt.decoder.layers[1].mlp.router(torch.randn(80, 1, CONFIG["hidden_size"]))
    assert routing_map[:, 0].all()


@pytest.mark.parametrize("key, value", [("moe_expert_capacity_factor", 1.0), ("moe_z_loss_coeff", 1e-3),
                                        ("moe_router_load_balancing_type", "aux_loss")])
def test_settings_that_would_drop_tokens_or_change_the_routing_are_refused(megatron_single_process, key, value):
    config = megatron_model.transformer_config(CONFIG)
    setattr(config, key, value)
    with pytest.raises(ValueError, match=key):
        megatron_model.build_gpt_model(CONFIG, config=config)


def test_the_expert_bias_follows_the_experts_load(megatron_single_process):
    """Aux-loss-free balancing, as the architecture is built for: a training forward counts each expert's tokens, and
    Megatron's update after the step (`finalize_model_grads`) moves every bias by the rate toward the mean load:
    up for experts under it, down for those over it."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    _, gpt = _models(CONFIG)
    gpt.train()
    batch = fixed_batch("bdlm", 4, VOCAB)
    pretrain_loss(DiffusionForward(gpt), batch).backward()
    routers = [layer.mlp.router for layer in gpt.decoder.layers[1:]]
    loads = [r.local_tokens_per_expert.clone() for r in routers]
    before = [r.expert_bias.clone() for r in routers]
    assert all(load.sum() == 2 * batch.input_ids.numel() for load in loads)  # every token (both halves), twice
    _update_router_expert_bias([gpt], gpt.config)
    for router, load, bias in zip(routers, loads, before):
        torch.testing.assert_close(router.expert_bias - bias, 1e-3 * torch.sign(load.mean() - load))
    assert gpt.config.moe_router_bias_update_rate == 1e-3 and gpt.config.moe_aux_loss_coeff == 0.0
    # what the step's log records per layer (`MetricsLog`): the same counts, read once
    assert expert_load(gpt) == {"1": loads[0].long().tolist(), "2": loads[1].long().tolist()}
    assert all(sum(load) == 0 for load in expert_load(gpt).values())


def test_layouts_a_moe_model_cannot_run_are_refused_naming_the_key(megatron_single_process, monkeypatch):
    from blockdiff.models import tiny_dense_config
    from nemo_dllm.training import TrainerConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="trainer.expert_parallel 4 does not divide"):
        TrainerConfig(expert_parallel=4).data_parallel()
    with pytest.raises(ValueError, match=r"trainer.sequence_parallel .* needs trainer.tensor_parallel > 1"):
        TrainerConfig(sequence_parallel=True)
    config = megatron_model.transformer_config(CONFIG)
    config.tensor_model_parallel_size = 2
    with pytest.raises(ValueError, match="trainer.tensor_parallel 2 on a MoE model needs trainer.sequence_parallel"):
        megatron_model.build_gpt_model(CONFIG, config=config)
    dense = tiny_dense_config(vocab_size=VOCAB, num_hidden_layers=1)
    for cfg, experts in ((dense, "no"), (CONFIG, 8)):
        config = megatron_model.transformer_config(cfg)
        config.expert_model_parallel_size = 3
        with pytest.raises(ValueError, match=f"trainer.expert_parallel 3 needs a MoE model.*has {experts} experts"):
            megatron_model.build_gpt_model(cfg, config=config)
