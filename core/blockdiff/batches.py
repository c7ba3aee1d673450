"""Assembling a block-diffusion training batch from clean token rows: noise, inputs, positions, attention mask.

BDLM input is `cat([x_noisy, x_clean])` (2L tokens) with positions `cat([pos, pos])`; MDLM (a block as long as the
sequence, the Stable phase) drops the clean half. The loss is taken on the noisy half only, against the clean token at
the same position. Every stack's trainer builds its batches here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from blockdiff.masks import bdlm_block_mask, bdlm_mask, check_doc_ids, document_positions, mdlm_block_mask, mdlm_mask
from blockdiff.noise import MaskBand, apply_mask, complementary_mask, draw_mask, per_token_t


@dataclass(frozen=True)
class DiffusionBatch:
    input_ids: Tensor  # [b, 2L] for bdlm, [b, L] for mdlm
    positions: Tensor  # same shape as input_ids
    doc_ids: Tensor  # [b, L]
    targets: Tensor  # [b, L]: the clean tokens
    masked: Tensor  # [b, L] bool: which noisy-half tokens are the mask token
    maskable: Tensor  # [b, L] bool: tokens that may be masked (not prompt, not outside the loss)
    t_tok: Tensor  # [b, L]: mask ratio of each token's sequence or block
    block_size: int
    objective: str  # "bdlm" or "mdlm"
    mask_token_id: int

    @property
    def noisy_len(self) -> int:
        return self.targets.shape[1]

    @property
    def masked_inputs(self) -> Tensor:
        """[b, input length] bool: which input positions hold the mask token (only ever in the noisy half)."""
        out = torch.zeros_like(self.input_ids, dtype=torch.bool)
        out[:, : self.noisy_len] = self.masked
        return out

    def attention_mask(self, flex: bool = False) -> Tensor | BlockMask:
        if self.objective == "mdlm":
            return mdlm_block_mask(self.doc_ids) if flex else mdlm_mask(self.doc_ids)
        return bdlm_block_mask(self.doc_ids, self.block_size) if flex else bdlm_mask(self.doc_ids, self.block_size)

    def to(self, device: torch.device | str) -> "DiffusionBatch":
        return replace(self, **{f: getattr(self, f).to(device) for f in
                                ("input_ids", "positions", "doc_ids", "targets", "masked", "maskable", "t_tok")})

    def with_noise(self, masked: Tensor, t_tok: Tensor) -> "DiffusionBatch":
        """The same clean tokens under another mask: a complementary pair, or noise broadcast from another rank."""
        noisy = apply_mask(self.targets, masked, self.mask_token_id)
        input_ids = noisy if self.objective == "mdlm" else torch.cat([noisy, self.targets], dim=1)
        return replace(self, input_ids=input_ids, masked=masked, t_tok=t_tok)

    def complement(self) -> "DiffusionBatch":
        """The complementary sample (LLaDA2.0 SFT): every maskable token masked in exactly one of the pair; the
        complement's ratio is 1 - t (floored so a fully masked original leaves a finite, unused weight)."""
        return self.with_noise(complementary_mask(self.masked, self.maskable), (1.0 - self.t_tok).clamp(min=1e-3))


def cat_batches(batches: list[DiffusionBatch]) -> DiffusionBatch:
    """Several batches as one (rows stacked), for one forward over a complementary pair or a chosen/rejected pair.
    They must share the block size, objective, mask token and width."""
    first = batches[0]
    for b in batches[1:]:
        if (b.block_size, b.objective, b.mask_token_id) != (first.block_size, first.objective, first.mask_token_id):
            raise ValueError(f"cannot stack batches of block size / objective / mask id {b.block_size}/{b.objective}/"
                             f"{b.mask_token_id} and {first.block_size}/{first.objective}/{first.mask_token_id}")
        if b.input_ids.shape[1] != first.input_ids.shape[1]:
            raise ValueError(f"cannot stack batches of widths {b.input_ids.shape[1]} and {first.input_ids.shape[1]}")
    return replace(first, **{f: torch.cat([getattr(b, f) for b in batches]) for f in
                             ("input_ids", "positions", "doc_ids", "targets", "masked", "maskable", "t_tok")})


def make_diffusion_batch(input_ids: Tensor, doc_ids: Tensor, block_size: int, objective: str, mask_token_id: int,
                         band: MaskBand, generator: torch.Generator | None = None, maskable: Tensor | None = None,
                         per_block_t: bool = False) -> DiffusionBatch:
    """Noise clean rows `input_ids` [b, L]. `maskable` defaults to every token (pretraining); SFT passes the response
    positions so the prompt is never masked. `per_block_t` draws one ratio per block instead of per sequence."""
    if objective not in ("bdlm", "mdlm"):
        raise ValueError(f"objective must be 'bdlm' or 'mdlm', got {objective!r}")
    if input_ids.shape != doc_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and doc_ids {tuple(doc_ids.shape)} differ in shape")
    check_doc_ids(doc_ids)
    b, length = input_ids.shape
    if block_size < 1 or length % block_size:
        raise ValueError(f"sequence length {length} is not divisible by block_size {block_size}")
    if (input_ids == mask_token_id).any():
        raise ValueError(f"clean input contains the mask token id {mask_token_id}")
    maskable = torch.ones_like(input_ids, dtype=torch.bool) if maskable is None else maskable
    t = band.sample((b, length // block_size) if per_block_t else (b,), generator)
    t_tok = per_token_t(t, length, block_size)
    masked = draw_mask(t_tok, maskable, generator)
    noisy = apply_mask(input_ids, masked, mask_token_id)
    pos = document_positions(doc_ids)
    if objective == "mdlm":
        ids, positions = noisy, pos
    else:
        ids, positions = torch.cat([noisy, input_ids], dim=1), torch.cat([pos, pos], dim=1)
    return DiffusionBatch(ids, positions, doc_ids, input_ids, masked, maskable, t_tok, block_size, objective,
                          mask_token_id)
