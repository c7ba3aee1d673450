"""Megatron-side losses equal the core reference losses on a fixed batch with fixed masks (fp32, 1e-5): the same
weights in the core's reference model and in a megatron-core GPTModel, the same noised samples."""

import pytest
import torch

from blockdiff.batches import make_diffusion_batch
from blockdiff.losses import cap_loss, diffusion_loss, dpo_loss, sft_loss, weighted_masked_nll
from blockdiff.models import build_model, init_weights, tiny_dense_config
from blockdiff.noise import MaskBand
from blockdiff.train import diffusion_logits
from nemo_dllm import megatron_model, objectives

VOCAB = 120


def _pair(seed, vocab=VOCAB):
    cfg = tiny_dense_config(vocab_size=vocab, num_hidden_layers=2)
    ref = init_weights(build_model(cfg), seed, std=0.1)
    gpt = megatron_model.build_gpt_model(cfg)
    megatron_model.load_hf_weights(gpt, ref.state_dict(), cfg, 0, 1)
    return ref, gpt


@pytest.fixture(scope="module")
def models(megatron_single_process):
    return _pair(0)


def _batch(objective, block, maskable=None, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (3, 32), generator=g)
    doc_ids = torch.tensor([[0] * 32, [0] * 12 + [1] * 20, [0] * 5 + [1] * 27])
    return make_diffusion_batch(ids, doc_ids, block, objective, vocab - 1, MaskBand(0.2, 0.9), g, maskable=maskable)


@pytest.mark.parametrize("objective,block", [("bdlm", 1), ("bdlm", 4), ("bdlm", 8), ("mdlm", 32)])
def test_pretraining_losses_match_the_core(models, objective, block):
    ref, gpt = models
    batch = _batch(objective, block)
    want = diffusion_loss(diffusion_logits(ref, batch), batch.targets, batch.masked, batch.t_tok, batch.maskable.sum())
    got = objectives.pretrain_loss(gpt, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _sft_batch(vocab=VOCAB, seed=1):
    response = torch.zeros(3, 32, dtype=torch.bool)
    response[:, 10:] = True
    return _batch("bdlm", 8, maskable=response, seed=seed, vocab=vocab)


def test_sft_and_cap_losses_match_the_core(megatron_single_process):
    ref, gpt = _pair(3, vocab=5)  # a 4-token vocabulary: many masked positions are predicted right
    batch = _sft_batch(vocab=5)
    logits = diffusion_logits(ref, batch)
    want_sft = sft_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable)
    want_cap = cap_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable, 2.0)
    torch.testing.assert_close(objectives.sft_objective(gpt, batch), want_sft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(objectives.sft_objective(gpt, batch, confidence_weight=2.0), want_cap, atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(want_sft, want_cap)  # the confidence term is really in there


def test_dpo_loss_matches_the_core(megatron_single_process):
    policy_ref, policy = _pair(1)
    reference_ref, reference = _pair(2)
    chosen, rejected = _sft_batch(), _sft_batch(seed=5)

    def nll(model, batch):
        return weighted_masked_nll(diffusion_logits(model, batch), batch.targets, batch.masked, batch.t_tok)

    want = dpo_loss(nll(policy_ref, chosen), nll(policy_ref, rejected), nll(reference_ref, chosen),
                    nll(reference_ref, rejected), beta=0.1)
    got = objectives.dpo_objective(policy, reference, chosen, rejected, beta=0.1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert abs(want.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # policy and reference really differ


def test_weights_round_trip_through_megatron(models):
    ref, gpt = models
    back = megatron_model.megatron_to_hf([megatron_model.megatron_state(gpt)], tiny_dense_config(vocab_size=VOCAB,
                                                                                              num_hidden_layers=2))
    for name, w in ref.state_dict().items():
        assert torch.equal(back[name], w), name
