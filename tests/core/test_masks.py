"""Masks against brute-force definitions written straight from LLaDA2.0 Eq. 3-4, over random documents and blocks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from blockdiff.masks import (
    COMPILE_BLOCK_MASKS_FROM,
    bdlm_block_mask,
    bdlm_mask,
    block_causal_mask,
    check_doc_ids,
    document_positions,
    mdlm_block_mask,
    mdlm_mask,
)


@st.composite
def packed_rows(draw, max_blocks=6):
    """(doc_ids [batch, L], block_size): rows of equal length L = blocks * block_size, split into documents."""
    block = draw(st.sampled_from([1, 2, 3, 4, 8]))
    length = block * draw(st.integers(1, max_blocks))
    batch = draw(st.integers(1, 3))
    rows = []
    for _ in range(batch):
        cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=3))) if length > 1 else []
        doc, row = 0, []
        for i in range(length):
            if i in cuts:
                doc += 1
            row.append(doc)
        rows.append(row)
    return torch.tensor(rows), block


def brute_force_bdlm(doc_ids: torch.Tensor, block: int) -> torch.Tensor:
    batch, length = doc_ids.shape
    out = torch.zeros(batch, 2 * length, 2 * length, dtype=torch.bool)
    for b in range(batch):
        row = doc_ids[b].tolist()
        start = {}
        for i, d in enumerate(row):
            start.setdefault(d, i)
        for q in range(2 * length):
            for k in range(2 * length):
                iq, ik = q % length, k % length
                if row[iq] != row[ik]:
                    continue
                bq, bk = (iq - start[row[iq]]) // block, (ik - start[row[ik]]) // block
                q_clean, k_clean = q >= length, k >= length
                if not q_clean and not k_clean:
                    out[b, q, k] = bq == bk  # M_BD
                elif not q_clean and k_clean:
                    out[b, q, k] = bk < bq  # M_OBC
                elif q_clean and k_clean:
                    out[b, q, k] = bk <= bq  # M_BC
    return out


@given(packed_rows())
def test_bdlm_dense_matches_equations(case):
    doc_ids, block = case
    assert torch.equal(bdlm_mask(doc_ids, block), brute_force_bdlm(doc_ids, block))


@given(packed_rows(max_blocks=4))
def test_bdlm_block_mask_matches_equations(case):
    doc_ids, block = case
    bm = bdlm_block_mask(doc_ids, block, tile=4)
    n = 2 * doc_ids.shape[1]
    dense = create_mask(bm.mask_mod, doc_ids.shape[0], 1, n, n)[:, 0]
    assert torch.equal(dense, brute_force_bdlm(doc_ids, block))


@given(packed_rows())
def test_mdlm_masks_match_equation_4(case):
    doc_ids, _ = case
    expect = torch.tensor([[[a == b for b in row] for a in row] for row in doc_ids.tolist()])
    assert torch.equal(mdlm_mask(doc_ids), expect)
    n = doc_ids.shape[1]
    assert torch.equal(create_mask(mdlm_block_mask(doc_ids, tile=4).mask_mod, doc_ids.shape[0], 1, n, n)[:, 0], expect)


def test_flex_attention_with_block_mask_equals_sdpa_with_dense_mask():
    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 40 + [1] * 56, [0] * 96])
    q, k, v = (torch.randn(2, 2, 192, 16) for _ in range(3))
    dense = bdlm_mask(doc_ids, 8)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = flex_attention(q, k, v, block_mask=bdlm_block_mask(doc_ids, 8, tile=32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_compiled_block_mask_at_training_length_equals_the_eager_one():
    """From COMPILE_BLOCK_MASKS_FROM on, the BlockMask is built by a compiled create_block_mask: same tiles, same
    attention."""
    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 200 + [1] * 184 + [2] * 128])
    assert 2 * doc_ids.shape[1] >= COMPILE_BLOCK_MASKS_FROM
    compiled = bdlm_block_mask(doc_ids, 32)
    eager = create_block_mask(compiled.mask_mod, 1, None, 1024, 1024, BLOCK_SIZE=128)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bdlm_mask(doc_ids, 32)[:, None])
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=compiled), ref, atol=1e-5, rtol=1e-5)


def test_block_mask_skips_fully_masked_tiles():
    """The point of the BlockMask: clean-to-noisy tiles are never computed."""
    doc_ids = torch.zeros(1, 256, dtype=torch.long)
    bm = bdlm_block_mask(doc_ids, 32, tile=64)
    assert bm.sparsity() > 40.0  # the clean->noisy quadrant alone is 25%; block structure removes more


def test_document_positions_restart_per_document():
    assert document_positions(torch.tensor([[0, 0, 0, 1, 1, 2]])).tolist() == [[0, 1, 2, 0, 1, 0]]


def test_block_causal_mask():
    m = block_causal_mask(5, 2)
    assert m.tolist() == [[True, True, False, False, False], [True, True, False, False, False],
                          [True, True, True, True, False], [True, True, True, True, False],
                          [True, True, True, True, True]]


@pytest.mark.parametrize("bad", [torch.tensor([[0, 1, 0]]), torch.tensor([0, 0, 1]), torch.tensor([[0.0, 1.0]])])
def test_bad_doc_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="doc_ids"):
        check_doc_ids(bad)


def test_length_not_divisible_by_block_is_rejected():
    with pytest.raises(ValueError, match="not divisible by block_size 4"):
        bdlm_mask(torch.zeros(1, 6, dtype=torch.long), 4)
