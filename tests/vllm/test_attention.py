"""The block split behind the plugin's block-causal attention, against the mask it stands for."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from blockdiff.masks import block_causal_mask
from vllm_blockdiff.attention import split_at_blocks


@given(spans=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), st.integers(1, 70)), min_size=1, max_size=5),
       block=st.sampled_from([1, 4, 8, 32]))
def test_split_pieces_see_exactly_the_block_causal_keys(spans, block):
    # each request: computed tokens (a whole number of blocks, as the scheduler guarantees) and a scheduled span
    computed = [c * block for c, _, _ in spans]
    lengths = [n for _, _, n in spans]
    qsl = [0]
    for n in lengths:
        qsl.append(qsl[-1] + n)
    seq_lens = [c + n for c, n in zip(computed, lengths)]
    starts, lens, owner = split_at_blocks(qsl, seq_lens, block)
    for req, (c, n) in enumerate(zip(computed, lengths)):
        mask = block_causal_mask(c + n, block)[c:]  # what the span's queries may see
        pieces = [i for i, o in enumerate(owner) if o == req]
        assert starts[pieces[0]] == qsl[req] and starts[pieces[-1] + 1] == qsl[req + 1]
        for i in pieces:  # a piece: non-causal queries over keys [0, lens[i])
            for q in range(starts[i] - qsl[req], starts[i + 1] - qsl[req]):
                assert torch.equal(mask[q], torch.arange(c + n) < lens[i])
