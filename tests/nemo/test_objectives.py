"""Megatron-side losses equal the core reference losses on a fixed batch with fixed masks (fp32, 1e-5): the same
weights in the core's reference model and in a megatron-core GPTModel, the same noised samples."""


import pytest
import torch

from blockdiff.models import tiny_dense_config
from conformance.runners.training import TOLERANCE, loss_pairs, model_pair  # shared with the conformance table
from nemo_dllm import megatron_model

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
