"""Each loss against a slow, obviously-correct loop; and the [x_noisy, x_clean] trick against explicit per-block
recomputation on a real model."""

import math

import pytest
import torch

from blockdiff.batches import make_diffusion_batch
from blockdiff.losses import cap_loss, confidence_loss, diffusion_loss, dpo_loss, sft_loss, weighted_masked_nll
from blockdiff.masks import block_causal_mask
from blockdiff.models import build_model, init_weights, tiny_dense_config
from blockdiff.noise import MaskBand
from blockdiff.objectives import ReferenceForward, noisy_logits


def _case(seed=0, b=3, length=16, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (b, length), generator=g)
    masked = torch.rand(b, length, generator=g) < 0.5
    t_tok = torch.rand(b, 1, generator=g).clamp(min=0.1).expand(b, length).contiguous()
    response = torch.zeros(b, length, dtype=torch.bool)
    response[:, 4:] = True
    return logits, targets, masked & response, t_tok, response


def slow_logp(logits_row, target):
    z = [math.exp(x) for x in logits_row.tolist()]
    return math.log(z[target] / sum(z))


def slow_weighted_nll(logits, targets, masked, t_tok):
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for i in range(logits.shape[1]):
            if masked[b, i]:
                total += -slow_logp(logits[b, i], int(targets[b, i])) / float(t_tok[b, i])
        out.append(total)
    return out


def test_weighted_masked_nll_and_diffusion_loss():
    logits, targets, masked, t_tok, _ = _case()
    slow = slow_weighted_nll(logits, targets, masked, t_tok)
    torch.testing.assert_close(weighted_masked_nll(logits, targets, masked, t_tok), torch.tensor(slow), atol=1e-4,
                               rtol=1e-5)
    n = 37
    torch.testing.assert_close(diffusion_loss(logits, targets, masked, t_tok, n), torch.tensor(sum(slow) / n),
                               atol=1e-5, rtol=1e-5)


def test_sft_loss_normalises_by_response_length():
    logits, targets, masked, t_tok, response = _case(1)
    slow = slow_weighted_nll(logits, targets, masked, t_tok)
    expect = sum(s / int(response[b].sum()) for b, s in enumerate(slow)) / len(slow)
    torch.testing.assert_close(sft_loss(logits, targets, masked, t_tok, response), torch.tensor(expect), atol=1e-5,
                               rtol=1e-5)


def test_cap_adds_the_entropy_of_correct_masked_predictions():
    logits, targets, masked, t_tok, response = _case(2, vocab=3)  # small vocab: many argmax hits
    entropies = []
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            row = logits[b, i].tolist()
            if masked[b, i] and max(range(3), key=lambda j: row[j]) == int(targets[b, i]):
                p = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
                entropies.append(-sum(q * math.log(q) for q in p))
    assert entropies, "the case must contain correct predictions"
    conf = sum(entropies) / len(entropies)
    torch.testing.assert_close(confidence_loss(logits, targets, masked), torch.tensor(conf), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap_loss(logits, targets, masked, t_tok, response, 2.0),
                               sft_loss(logits, targets, masked, t_tok, response) + 2.0 * conf, atol=1e-5, rtol=1e-5)


def test_confidence_loss_is_zero_without_correct_predictions():
    logits = torch.tensor([[[5.0, 0.0]]])
    assert confidence_loss(logits, torch.tensor([[1]]), torch.tensor([[True]])).item() == 0.0


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = (torch.tensor(x) for x in ([3.0, 1.0], [2.0, 4.0], [3.5, 1.2], [1.0, 3.0]))
    beta = 0.1
    expect = []
    for i in range(2):
        margin = beta * ((-pc[i] + rc[i]) - (-pr[i] + rr[i]))  # ELBO = -NLL
        expect.append(-math.log(1 / (1 + math.exp(-float(margin)))))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta), torch.tensor(sum(expect) / 2), atol=1e-6, rtol=1e-6)
    # identical policy and reference: log(2), whatever the samples
    assert dpo_loss(pc, pr, pc, pr).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_dpo_gradient_prefers_the_chosen_answer():
    policy_chosen = torch.tensor([2.0], requires_grad=True)
    loss = dpo_loss(policy_chosen, torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([2.0]))
    loss.backward()
    assert policy_chosen.grad.item() > 0  # descending lowers the chosen answer's NLL


def test_two_half_input_equals_explicit_per_block_recomputation():
    """The point of `[x_noisy, x_clean]`: the logits of noisy block k equal a forward over the clean blocks before k
    followed by noisy block k alone, under an ordinary block-causal mask. Checked per document of a packed row."""
    torch.manual_seed(0)
    cfg = tiny_dense_config(vocab_size=50, num_hidden_layers=2)
    model = init_weights(build_model(cfg), 0, std=0.2).double().eval()
    block, mask_id = 4, 49
    ids = torch.randint(0, 48, (1, 24))
    doc_ids = torch.tensor([[0] * 8 + [1] * 16])
    batch = make_diffusion_batch(ids, doc_ids, block, "bdlm", mask_id, MaskBand(0.5, 0.5),
                                 torch.Generator().manual_seed(1))
    got = noisy_logits(ReferenceForward(model), batch)[0]
    noisy = batch.input_ids[0, :24]
    for start, length in [(0, 8), (8, 16)]:
        doc_clean, doc_noisy = ids[0, start:start + length], noisy[start:start + length]
        for k in range(length // block):
            seq = torch.cat([doc_clean[: k * block], doc_noisy[k * block:(k + 1) * block]])
            mask = block_causal_mask(len(seq), block)[None]
            ref = model(seq[None], torch.arange(len(seq))[None], mask)[0, -block:]
            torch.testing.assert_close(got[start + k * block: start + (k + 1) * block], ref, atol=1e-9, rtol=1e-9)


def test_mdlm_batch_drops_the_clean_half():
    ids = torch.randint(0, 40, (2, 16))
    batch = make_diffusion_batch(ids, torch.zeros_like(ids), 16, "mdlm", 45, MaskBand())
    assert batch.input_ids.shape == (2, 16) and batch.attention_mask().shape == (2, 16, 16)
    assert batch.attention_mask().all()


def test_clean_input_with_mask_token_is_rejected():
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="mask token id 3"):
        make_diffusion_batch(ids, torch.zeros_like(ids), 2, "bdlm", 3, MaskBand())
