"""Attention masks for block-diffusion training (LLaDA2.0 Eq. 3-4), dense and as FlexAttention block masks.

Convention everywhere in this package: True = the query may attend to the key (SDPA's boolean convention). Megatron
wants the opposite (True = masked out); its adapter inverts.

Packed sequences carry per-token document ids. Blocks are counted from each document's own start, and positions
restart at 0 in each document, so a packed document is trained exactly as it is later decoded: its block 0 starts at
its position 0 (DECODING.md rule 1).

The training input is `cat([x_noisy, x_clean])` of length 2L. Between a query token q and key token k:
    noisy -> noisy   same block                      (block-diagonal, M_BD)
    noisy -> clean   key's block strictly earlier    (offset block-causal, M_OBC)
    clean -> clean   key's block not later           (block-causal, M_BC)
    clean -> noisy   never
each only within the same document.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

# Eager create_block_mask evaluates mask_mod on every (q, k) pair at once, materializing [n, n] intermediates (640 MB
# and 3.7 s at n = 8192 on CPU); compiled it works tile by tile (0.4 s, nothing materialized), but compiling costs
# seconds per new shape, which only pays off at training lengths (benchmarks/training_attention.py).
_compiled_create_block_mask = torch.compile(create_block_mask)
COMPILE_BLOCK_MASKS_FROM = 1024


def _create_block_mask(mask_mod, batch: int, n: int, device: torch.device, tile: int) -> BlockMask:
    create = _compiled_create_block_mask if n >= COMPILE_BLOCK_MASKS_FROM else create_block_mask
    return create(mask_mod, batch, None, n, n, device=device, BLOCK_SIZE=tile)


def check_doc_ids(doc_ids: Tensor) -> None:
    """Document ids must be [batch, L] integers forming contiguous runs (a document never resumes after another)."""
    if doc_ids.dim() != 2 or doc_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"doc_ids must be an integer tensor [batch, L], got {tuple(doc_ids.shape)} {doc_ids.dtype}")
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    runs_per_row = starts.sum(dim=1)
    distinct_per_row = torch.tensor([row.unique().numel() for row in doc_ids])
    if not torch.equal(runs_per_row, distinct_per_row):
        raise ValueError("doc_ids must form contiguous runs: a document id reappears after another document")


def document_positions(doc_ids: Tensor) -> Tensor:
    """Position of each token inside its own document: [batch, L] -> [batch, L], restarting at 0 per document."""
    length = doc_ids.shape[1]
    index = torch.arange(length, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def single_document(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(batch, length, dtype=torch.long, device=device)


def _check_block_size(length: int, block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if length % block_size:
        raise ValueError(f"sequence length {length} is not divisible by block_size {block_size}")


def _bdlm_tables(doc_ids: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per token of the 2L sequence: document id, block index within its document, and whether it is clean."""
    block = document_positions(doc_ids) // block_size
    is_clean = torch.zeros(doc_ids.shape[0], 2 * doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device)
    is_clean[:, doc_ids.shape[1]:] = True
    return doc_ids.repeat(1, 2), block.repeat(1, 2), is_clean


def _bdlm_rule(doc_q, doc_k, block_q, block_k, clean_q, clean_k):
    same_doc = doc_q == doc_k
    noisy_noisy = ~clean_q & ~clean_k & (block_q == block_k)
    noisy_clean = ~clean_q & clean_k & (block_k < block_q)
    clean_clean = clean_q & clean_k & (block_k <= block_q)
    return same_doc & (noisy_noisy | noisy_clean | clean_clean)


def bdlm_mask(doc_ids: Tensor, block_size: int) -> Tensor:
    """Dense block-diffusion mask over `[x_noisy, x_clean]`: doc_ids [batch, L] -> bool [batch, 2L, 2L]."""
    check_doc_ids(doc_ids)
    _check_block_size(doc_ids.shape[1], block_size)
    doc, block, clean = _bdlm_tables(doc_ids, block_size)
    return _bdlm_rule(doc[:, :, None], doc[:, None, :], block[:, :, None], block[:, None, :],
                      clean[:, :, None], clean[:, None, :])


def bdlm_block_mask(doc_ids: Tensor, block_size: int, tile: int = 128) -> BlockMask:
    """The same mask as `bdlm_mask`, as a FlexAttention BlockMask (tiles that are fully masked are skipped)."""
    check_doc_ids(doc_ids)
    _check_block_size(doc_ids.shape[1], block_size)
    doc, block, clean = _bdlm_tables(doc_ids, block_size)

    def mask_mod(b, h, q, k):
        return _bdlm_rule(doc[b, q], doc[b, k], block[b, q], block[b, k], clean[b, q], clean[b, k])

    n = 2 * doc_ids.shape[1]
    return _create_block_mask(mask_mod, doc_ids.shape[0], n, doc_ids.device, tile)


def mdlm_mask(doc_ids: Tensor) -> Tensor:
    """Dense MDLM document mask (Eq. 4): full attention inside each document. doc_ids [batch, L] -> [batch, L, L]."""
    check_doc_ids(doc_ids)
    return doc_ids[:, :, None] == doc_ids[:, None, :]


def mdlm_block_mask(doc_ids: Tensor, tile: int = 128) -> BlockMask:
    check_doc_ids(doc_ids)

    def mask_mod(b, h, q, k):
        return doc_ids[b, q] == doc_ids[b, k]

    n = doc_ids.shape[1]
    return _create_block_mask(mask_mod, doc_ids.shape[0], n, doc_ids.device, tile)


def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Decoding-time mask over one clean sequence: bidirectional inside a block, causal across blocks. [L, L].
    Blocks are aligned to absolute position 0; the last block may be partial."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]
