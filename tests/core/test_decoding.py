"""The reference decoder against ../shared/DECODING.md: rule by rule, and the cached batched decoder token for token
against the no-cache oracle."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blockdiff.decoding import (
    BlockState,
    DecodeParams,
    ReferenceDecoder,
    greedy_ar_decode,
    oracle_decode,
    propose,
    select_commits,
)
from blockdiff.masks import block_causal_mask
from blockdiff.models import build_model, init_weights, tiny_dense_config

VOCAB, MASK = 64, 63
NO_EOS = (62,)  # a token the prompts never contain; see `eos_inside_a_block` for a real EOS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a large init spreads confidences over (0, 1) so thresholds, fallbacks and ties all occur
    return init_weights(build_model(tiny_dense_config(vocab_size=VOCAB, num_hidden_layers=2)), 0, std=0.25).eval()


def prompts_strategy(max_len=40):
    return st.lists(st.integers(0, 61), min_size=1, max_size=max_len)


params_strategy = st.builds(DecodeParams, max_tokens=st.integers(1, 40), block_size=st.sampled_from([1, 2, 4, 8, 32]),
                            threshold=st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.95, 1.0]),
                            fallback_k=st.sampled_from([1, 2, 3]))


def same(a, b):
    return (a.tokens, a.finish_reason, a.denoise_forwards) == (b.tokens, b.finish_reason, b.denoise_forwards)


@given(prompt=prompts_strategy(), params=params_strategy)
def test_cached_decoder_equals_oracle(model, prompt, params):
    got = ReferenceDecoder(model, MASK, NO_EOS).generate([prompt], params)[0]
    want = oracle_decode(model, prompt, params, MASK, NO_EOS)
    assert same(got, want)


@given(prompts=st.lists(prompts_strategy(), min_size=2, max_size=6), params=params_strategy)
def test_batched_decoder_equals_single_requests_and_oracle(model, prompts, params):
    decoder = ReferenceDecoder(model, MASK, NO_EOS)
    batched = decoder.generate(prompts, params)
    for prompt, got in zip(prompts, batched):
        assert same(got, decoder.generate([prompt], params)[0])
        assert same(got, oracle_decode(model, prompt, params, MASK, NO_EOS))


def test_batch_with_mixed_max_tokens_and_thresholds(model):
    decoder = ReferenceDecoder(model, MASK, NO_EOS)
    prompts = [[1, 2, 3], list(range(20)), [7] * 33]
    params = [DecodeParams(5, 8, 0.9), DecodeParams(30, 8, 0.1), DecodeParams(17, 8, 0.5, fallback_k=2)]
    for prompt, p, got in zip(prompts, params, decoder.generate(prompts, params)):
        assert same(got, oracle_decode(model, prompt, p, MASK, NO_EOS))
        assert len(got.tokens) == p.max_tokens and got.finish_reason == "length"


@pytest.mark.parametrize("block", [4, 8])
def test_eos_inside_a_block_ends_the_output_there(model, block):
    prompt = [5, 9, 11, 3, 17]
    params = DecodeParams(max_tokens=24, block_size=block, threshold=0.3)
    free = ReferenceDecoder(model, MASK, NO_EOS).generate([prompt], params)[0]
    # make a token that the model really emits mid-block the EOS: output must stop right after its first occurrence
    cut = next(i for i, t in enumerate(free.tokens) if i >= block and (i + len(prompt)) % block not in (0, block - 1))
    eos = free.tokens[cut]
    first = free.tokens.index(eos)
    got = ReferenceDecoder(model, MASK, (eos,)).generate([prompt], params)[0]
    assert got.tokens == free.tokens[: first + 1] and got.finish_reason == "stop"
    assert same(got, oracle_decode(model, prompt, params, MASK, (eos,)))
    assert got.denoise_forwards < free.denoise_forwards  # the rest of the output was never decoded


def blocks_decoded(prompt_len: int, output_len: int, block: int) -> int:
    """The blocks a request denoised: from the one holding the prompt's tail to the one holding its last token."""
    return (prompt_len + output_len - 1) // block - prompt_len // block + 1


def test_accounting(model):
    """nfe = prefill chunk + denoising steps (each finished block's commit fused into the next block's first step),
    or, unfused, + one commit forward per finished block but the last; tpf from those."""
    params = DecodeParams(max_tokens=20, block_size=8, threshold=0.5)
    prompt = list(range(19))  # 2 full blocks prefilled, 3 tail tokens join the first generated block
    fused = ReferenceDecoder(model, MASK, NO_EOS).generate([prompt], params)[0]
    unfused = ReferenceDecoder(model, MASK, NO_EOS, fuse_commit=False).generate([prompt], params)[0]
    blocks = blocks_decoded(19, 20, 8)  # positions 16..38
    assert blocks == 3
    assert fused.nfe == 1 + fused.denoise_forwards
    assert unfused.nfe == 1 + unfused.denoise_forwards + (blocks - 1)
    assert fused.tpf == unfused.tpf == pytest.approx(20 / fused.denoise_forwards)
    assert blocks <= fused.denoise_forwards <= 21  # at most one step per masked position


@given(prompts=st.lists(prompts_strategy(), min_size=1, max_size=5), params=params_strategy,
       eos=st.sampled_from([NO_EOS, (5,), (9, 30)]))
def test_fused_commit_gives_the_unfused_outputs_with_one_forward_less_per_finished_block(model, prompts, params, eos):
    fused = ReferenceDecoder(model, MASK, eos).generate(prompts, params)
    unfused = ReferenceDecoder(model, MASK, eos, fuse_commit=False).generate(prompts, params)
    for prompt, f, u in zip(prompts, fused, unfused):
        assert same(f, u)
        assert u.nfe - f.nfe == blocks_decoded(len(prompt), len(f.tokens), params.block_size) - 1


def test_threshold_zero_fills_a_block_per_step_and_threshold_one_uses_fallback(model):
    prompt = [4, 4, 4, 4]
    all_at_once = ReferenceDecoder(model, MASK, NO_EOS).generate([prompt], DecodeParams(12, 4, 0.0))[0]
    assert all_at_once.denoise_forwards == 3  # the prompt fills block 0; each of 3 blocks takes one step
    k2 = ReferenceDecoder(model, MASK, NO_EOS).generate([prompt], DecodeParams(12, 4, 1.0, fallback_k=2))[0]
    assert k2.denoise_forwards == 6  # two tokens a step


def test_sampling_is_reproducible_by_seed_and_batch_invariant(model):
    decoder = ReferenceDecoder(model, MASK, NO_EOS)
    p = [DecodeParams(16, 4, 0.9, temperature=1.0, seed=s) for s in (1, 1, 2)]
    out = decoder.generate([[3, 4, 5]] * 3, p)
    assert out[0].tokens == out[1].tokens != out[2].tokens
    assert decoder.generate([[3, 4, 5]], p[2])[0].tokens == out[2].tokens


def test_select_commits_is_strictly_above_threshold():
    conf = torch.tensor([0.95, 0.96, 0.2])
    assert select_commits(conf, 0.95, 1).tolist() == [False, True, False]


def test_fallback_takes_the_k_most_confident_ties_to_lowest_position():
    conf = torch.tensor([0.3, 0.5, 0.5, 0.1, 0.5])
    assert select_commits(conf, 0.9, 1).tolist() == [False, True, False, False, False]
    assert select_commits(conf, 0.9, 2).tolist() == [False, True, True, False, False]
    assert select_commits(conf, 0.9, 9).tolist() == [True] * 5


def test_propose_breaks_ties_to_the_lowest_id_and_never_proposes_the_mask():
    logits = torch.tensor([[1.0, 3.0, 3.0, 9.0]])
    cand, conf = propose(logits, mask_token_id=3, temperature=0.0, generator=None)
    assert cand.tolist() == [1]
    assert conf.item() == pytest.approx(torch.e ** 3 / (torch.e + 2 * torch.e ** 3), rel=1e-6)


def test_prompt_tail_is_kept_and_not_part_of_the_output(model):
    prompt = [1, 2, 3, 4, 5]
    s = BlockState(prompt, DecodeParams(3, 4), MASK, NO_EOS)
    assert s.committed == [1, 2, 3, 4] and s.block.tolist() == [5, MASK, MASK, MASK]
    r = ReferenceDecoder(model, MASK, NO_EOS).generate([prompt], DecodeParams(3, 4, 0.0))[0]
    assert len(r.tokens) == 3 and r.denoise_forwards == 1


@pytest.mark.parametrize("prompt,match", [([], "prompt is empty"),
                                          ([1, MASK, 2], f"mask token id {MASK} at position 1")])
def test_bad_prompts_are_rejected(prompt, match):
    with pytest.raises(ValueError, match=match):
        BlockState(prompt, DecodeParams(4), MASK, NO_EOS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(max_tokens=4, block_size=0), "block_size"),
    (dict(max_tokens=4, threshold=1.5), "threshold must be in \\[0, 1\\], got 1.5"),
    (dict(max_tokens=4, fallback_k=0), "fallback_k"),
    (dict(max_tokens=4, temperature=-1.0), "temperature")])
def test_bad_params_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeParams(**kwargs)


def test_request_params_take_overrides_and_name_bad_ones():
    from blockdiff.decoding import request_params
    from blockdiff.models import BlockDiffusionSettings

    settings = BlockDiffusionSettings(mask_token_id=1, eos_token_ids=(0,), block_size=32, threshold=0.9)
    p = request_params(settings, max_tokens=5, temperature=0.0, seed=0, overrides={"threshold": 0.5})
    assert (p.threshold, p.fallback_k, p.block_size) == (0.5, 1, 32)
    assert request_params(settings, max_tokens=5, temperature=0.0, seed=0, overrides=None).threshold == 0.9
    for bad, match in [({"threshold": 2}, "threshold must be"), ({"threshold": True}, "threshold must be"),
                       ({"fallback_k": 0}, "fallback_k must be"), ({"block_size": 64}, "block_size 64 differs"),
                       ({"treshold": 0.5}, "unknown key 'treshold'; block diffusion accepts threshold, fallback_k, "
                                           "block_size"),
                       ("0.5", "must be an object with keys from threshold"), ([1], "must be an object")]:
        with pytest.raises(ValueError, match=match):
            request_params(settings, max_tokens=5, temperature=0.0, seed=0, overrides=bad)


def uncached_greedy(model, prompt: list[int], max_tokens: int, eos: tuple[int, ...]) -> list[int]:
    ids = list(prompt)
    while len(ids) - len(prompt) < max_tokens and (len(ids) == len(prompt) or ids[-1] not in eos):
        n = len(ids)
        logits = model(torch.tensor([ids]), torch.arange(n)[None], block_causal_mask(n, 1)[None])
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_ar_decode_batched_with_a_cache_equals_the_uncached_loop(model):
    prompts = [[5, 9, 11], [3] * 13, [7, 1, 2, 8, 30, 4, 4]]
    free = greedy_ar_decode(model, prompts, 12, NO_EOS)
    assert [r.tokens for r in free] == [uncached_greedy(model, p, 12, NO_EOS) for p in prompts]
    assert all(r.finish_reason == "length" and r.tpf == 1.0 and len(r.tokens) == 12 for r in free)
    eos = (free[1].tokens[5],)  # a token the second request really emits mid-output ends it there
    stopped = greedy_ar_decode(model, prompts, 12, eos)
    assert [r.tokens for r in stopped] == [uncached_greedy(model, p, 12, eos) for p in prompts]
    assert stopped[1].finish_reason == "stop" and stopped[1].tokens[-1] == eos[0] and len(stopped[1].tokens) <= 6
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        greedy_ar_decode(model, prompts, 0, NO_EOS)
