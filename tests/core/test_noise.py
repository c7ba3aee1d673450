import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blockdiff.batches import make_diffusion_batch
from blockdiff.noise import (
    MaskBand,
    add_embedding_noise,
    apply_mask,
    complementary_mask,
    draw_mask,
    elbo_weight,
    pad_to_block_multiple,
    per_token_t,
)


def test_band_samples_stay_inside_the_band():
    t = MaskBand(0.3, 0.8).sample((10000,), torch.Generator().manual_seed(0))
    assert 0.3 <= t.min() and t.max() <= 0.8
    assert abs(t.mean().item() - 0.55) < 0.01


@pytest.mark.parametrize("lo,hi", [(0.0, 0.5), (0.6, 0.5), (0.2, 1.5)])
def test_bad_band_is_rejected(lo, hi):
    with pytest.raises(ValueError, match="mask band"):
        MaskBand(lo, hi)


def test_linear_schedule_weight_is_one_over_t():
    t = torch.tensor([0.25, 0.5, 1.0])
    assert torch.equal(elbo_weight(t), torch.tensor([4.0, 2.0, 1.0]))


def test_mask_rate_follows_t_per_sequence_and_per_block():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([[0.1, 0.9]])
    t_tok = per_token_t(t, 20000, 10000)
    masked = draw_mask(t_tok, torch.ones(1, 20000, dtype=torch.bool), g)
    assert abs(masked[0, :10000].float().mean().item() - 0.1) < 0.01
    assert abs(masked[0, 10000:].float().mean().item() - 0.9) < 0.01


@given(st.integers(1, 64), st.floats(0.01, 1.0), st.integers(0, 2**31))
def test_complementary_pair_masks_every_maskable_token_exactly_once(length, t, seed):
    g = torch.Generator().manual_seed(seed)
    maskable = torch.rand(2, length, generator=g) < 0.7
    masked = draw_mask(torch.full((2, length), t), maskable, g)
    other = complementary_mask(masked, maskable)
    assert torch.equal(masked.int() + other.int(), maskable.int())
    assert not (masked & ~maskable).any()


def test_prompt_positions_are_never_masked():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (4, 32), generator=g)
    response = torch.zeros(4, 32, dtype=torch.bool)
    response[:, 12:] = True
    batch = make_diffusion_batch(ids, torch.zeros_like(ids), 8, "bdlm", 1, MaskBand(0.99, 1.0), g, maskable=response)
    assert not batch.masked[:, :12].any() and batch.masked[:, 12:].float().mean() > 0.9
    pair = batch.complement()
    assert not pair.masked[:, :12].any()
    assert torch.equal(batch.masked.int() + pair.masked.int(), response.int())
    assert torch.equal(pair.input_ids[:, 32:], ids)  # the clean half is untouched


def test_apply_mask():
    ids = torch.tensor([[5, 6, 7]])
    assert apply_mask(ids, torch.tensor([[False, True, False]]), 1).tolist() == [[5, 1, 7]]


@pytest.mark.parametrize("n,block,expect", [(5, 4, 8), (8, 4, 8), (1, 32, 32), (0, 4, 0)])
def test_pad_to_block_multiple(n, block, expect):
    out = pad_to_block_multiple(list(range(n)), block, pad_id=-1)
    assert len(out) == expect and out[:n] == list(range(n)) and set(out[n:]) <= {-1}


def test_embedding_noise_touches_only_masked_tokens_and_only_early():
    emb = torch.zeros(1, 4, 8)
    masked = torch.tensor([[True, False, True, False]])
    noisy = add_embedding_noise(emb, masked, 0.5, step=3, until_step=10, generator=torch.Generator().manual_seed(0))
    assert (noisy[0, [1, 3]] == 0).all() and (noisy[0, [0, 2]] != 0).all()
    assert torch.equal(add_embedding_noise(emb, masked, 0.5, step=10, until_step=10), emb)


def test_per_block_t_must_tile_the_sequence():
    with pytest.raises(ValueError, match="does not tile"):
        per_token_t(torch.ones(1, 3), 8, 4)
