"""Megatron-side losses equal the core reference losses on a fixed batch with fixed masks (fp32, 1e-5): the same
weights in the core's reference model and in a megatron-core GPTModel, the same noised samples. FlexAttention with the
core's block mask in Megatron's attention equals the dense mask."""


import pytest
import torch

from blockdiff.models import tiny_dense_config
from blockdiff.objectives import diffusion_logits, pretrain_loss
from conformance.runners.training import TOLERANCE, fixed_batch, loss_pairs, model_pair  # shared with conformance
from nemo_dllm import attention, megatron_model
from nemo_dllm.megatron_model import DiffusionForward

VOCAB = 120


@pytest.fixture(scope="module")
def models(megatron_single_process):
    return model_pair(0, VOCAB)


@pytest.fixture(scope="module")
def pairs(megatron_single_process):
    return loss_pairs()


@pytest.mark.parametrize("objective", ["bdlm block 1", "bdlm block 4", "bdlm block 8", "mdlm block 32", "sft",
                                       "cap (lambda 2)", "dpo (beta 0.1)"])
def test_megatron_losses_match_the_core(pairs, objective):
    core, megatron = pairs[objective]
    torch.testing.assert_close(megatron, core, atol=TOLERANCE, rtol=TOLERANCE)


def test_the_fixed_batches_exercise_each_objective(pairs):
    assert not torch.allclose(pairs["sft"][0], pairs["cap (lambda 2)"][0])  # the confidence term is really in there
    assert abs(pairs["dpo (beta 0.1)"][0].item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # policy != reference


def test_weights_round_trip_through_megatron(models):
    ref, gpt = models
    back = megatron_model.megatron_to_hf([megatron_model.megatron_state(gpt)], tiny_dense_config(vocab_size=VOCAB,
                                                                                              num_hidden_layers=2))
    for name, w in ref.state_dict().items():
        assert torch.equal(back[name], w), name


@pytest.mark.parametrize("objective, block", [("bdlm", 4), ("mdlm", 32)])
def test_flex_attention_equals_dense_and_trains_densely_on_the_cpu(models, objective, block, monkeypatch, caplog):
    _, gpt = models
    batch = fixed_batch(objective, block, VOCAB)
    masks = []
    core_attention = attention.attention
    monkeypatch.setattr(attention, "attention", lambda q, k, v, mask: masks.append(type(mask).__name__) or
                        core_attention(q, k, v, mask))
    with torch.no_grad():
        dense = diffusion_logits(DiffusionForward(gpt), batch)
        flex = diffusion_logits(DiffusionForward(gpt, flex_attention=True), batch)
    assert masks == ["Tensor"] * 2 + ["BlockMask"] * 2  # two layers each: the flex forward really ran flex
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(attention, "_said_dense_backward", False)
    grads = []
    for flex_attention in (False, True):
        gpt.zero_grad()
        pretrain_loss(DiffusionForward(gpt, flex_attention), batch).backward()
        grads.append([p.grad.clone() for p in gpt.parameters()])
    assert "FlexAttention has no CPU backward" in caplog.text
    for dense_grad, flex_grad in zip(*grads):
        torch.testing.assert_close(flex_grad, dense_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab, tp_size, padded", [(121, 1, 128), (121, 2, 128), (49153, 2, 49280), (121, 3, 384)])
def test_a_vocabulary_is_padded_to_split_and_the_padding_never_leaves_megatron(vocab, tp_size, padded):
    """Zero rows at the end, as many as the unit of 128 and the tensor-parallel split need; HF weights come back
    without them. (That `forward` cuts the padding's logits off is what the loss tests above check: VOCAB is not a
    multiple of 128, and a padded logit in the softmax would change every loss.)"""
    cfg = tiny_dense_config(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=6,
                            num_key_value_heads=3, head_dim=4, intermediate_size=12)
    # as SmolLM2: no QK-norm, tied embeddings
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True)
    hf = {name: torch.randn(shape) for name, shape in {
        "model.embed_tokens.weight": (vocab, 8), "model.norm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (24, 8), "model.layers.0.self_attn.k_proj.weight": (12, 8),
        "model.layers.0.self_attn.v_proj.weight": (12, 8), "model.layers.0.self_attn.o_proj.weight": (8, 24),
        "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.mlp.gate_proj.weight": (12, 8), "model.layers.0.mlp.up_proj.weight": (12, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 12)}.items()}
    assert megatron_model.padded_vocab_size(vocab, tp_size) == padded
    shards = [megatron_model.hf_to_megatron(hf, cfg, rank, tp_size) for rank in range(tp_size)]
    embedding = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    assert [s["embedding.word_embeddings.weight"].shape[0] for s in shards] == [padded // tp_size] * tp_size
    assert torch.equal(embedding[:vocab], hf["model.embed_tokens.weight"]) and not embedding[vocab:].any()
    back = megatron_model.megatron_to_hf(shards, cfg)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
