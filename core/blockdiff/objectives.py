"""The training objectives, composed once from the core's batches, noise and losses over any stack's forward.

A stack hands in its model as a `DiffusionForward` (batch-first embeddings, and logits from embeddings); everything
else (where embedding noise goes, which half of the input is scored, how each loss is reduced) is decided here, so the
reference model, Megatron's GPTModel and the toy trainer train on the same objective by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from blockdiff.batches import DiffusionBatch, make_diffusion_batch
from blockdiff.losses import cap_loss, diffusion_loss, dpo_loss, masked_token_accuracy, sft_loss, weighted_masked_nll
from blockdiff.noise import MaskBand, add_embedding_noise


class DiffusionForward(Protocol):
    flex_attention: bool  # whether the model takes the mask as a FlexAttention BlockMask instead of a dense one

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings [b, L, H]."""

    def __call__(self, embeddings: Tensor, positions: Tensor, allowed: Tensor | BlockMask) -> Tensor:
        """Logits [b, L, V] over the full vocabulary; `allowed` ([b, L, L] or its BlockMask) is True where a query
        may attend."""


@dataclass(frozen=True)
class ReferenceForward:
    """The core's reference models (`blockdiff.models`) as a `DiffusionForward`."""

    model: torch.nn.Module
    flex_attention: bool = False

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed(input_ids)

    def __call__(self, embeddings: Tensor, positions: Tensor, allowed: Tensor | BlockMask) -> Tensor:
        return self.model(None, positions, allowed, inputs_embeds=embeddings)


@dataclass(frozen=True)
class EmbeddingNoise:
    """Gaussian noise on masked tokens' embeddings while `step < until_step` (`blockdiff.noise.add_embedding_noise`)."""

    std: float = 0.0
    step: int = 0
    until_step: int = 0
    generator: torch.Generator | None = None


def diffusion_logits(model: DiffusionForward, batch: DiffusionBatch, noise: EmbeddingNoise = EmbeddingNoise()
                     ) -> Tensor:
    """Logits of the whole input [b, S, V] (both halves for BDLM), with the embedding noise on masked tokens. The
    scores below take these and read the noisy half only, so a pipeline-parallel stack can hand its last stage's
    output straight to them."""
    embeddings = add_embedding_noise(model.embed(batch.input_ids), batch.masked_inputs, noise.std, noise.step,
                                     noise.until_step, noise.generator)
    return model(embeddings, batch.positions, batch.attention_mask(flex=model.flex_attention))


def noisy_logits(model: DiffusionForward, batch: DiffusionBatch, noise: EmbeddingNoise = EmbeddingNoise()) -> Tensor:
    """Logits of the noisy half [b, L, V]: the loss is only ever taken there."""
    return diffusion_logits(model, batch, noise)[:, : batch.noisy_len]


def pretrain_score(logits: Tensor, batch: DiffusionBatch) -> Tensor:
    """BDLM (Eq. 1) or MDLM (Eq. 2), whichever is the batch's objective, from `diffusion_logits`, normalised by the
    batch's maskable tokens."""
    return diffusion_loss(logits[:, : batch.noisy_len], batch.targets, batch.masked, batch.t_tok,
                          batch.maskable.sum())


def pretrain_loss(model: DiffusionForward, batch: DiffusionBatch, noise: EmbeddingNoise = EmbeddingNoise()) -> Tensor:
    return pretrain_score(diffusion_logits(model, batch, noise), batch)


def sft_score(logits: Tensor, batch: DiffusionBatch, confidence_weight: float = 0.0) -> Tensor:
    """SFT (Eq. 5), or CAP (Eq. 6) when confidence_weight > 0, from `diffusion_logits`. The batch's `maskable` marks
    the response."""
    logits = logits[:, : batch.noisy_len]
    if confidence_weight > 0:
        return cap_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable, confidence_weight)
    return sft_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable)


def sft_objective(model: DiffusionForward, batch: DiffusionBatch, confidence_weight: float = 0.0) -> Tensor:
    return sft_score(diffusion_logits(model, batch), batch, confidence_weight)


def complementary_sft_score(logits: Tensor, batch: DiffusionBatch, confidence_weight: float = 0.0) -> Tensor:
    """LLaDA2.0's complementary masking: the mean SFT score of `batch` and its complement, from the logits of
    `cat_batches([batch, batch.complement()])` (one forward for the pair)."""
    rows = batch.input_ids.shape[0]
    return 0.5 * (sft_score(logits[:rows], batch, confidence_weight)
                  + sft_score(logits[rows:], batch.complement(), confidence_weight))


def sequence_nll(model: DiffusionForward, batch: DiffusionBatch) -> Tensor:
    """Per-sequence weighted masked NLL ([b]): the negative one-sample ELBO that DPO compares."""
    return weighted_masked_nll(noisy_logits(model, batch), batch.targets, batch.masked, batch.t_tok)


def dpo_objective(policy: DiffusionForward, reference: DiffusionForward, chosen: DiffusionBatch,
                  rejected: DiffusionBatch, beta: float) -> Tensor:
    """DPO on the ELBO (Eq. 7-8): policy and frozen reference score the very same noised samples."""
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_nll(reference, chosen), sequence_nll(reference, rejected)
    return dpo_loss(sequence_nll(policy, chosen), sequence_nll(policy, rejected), ref_chosen, ref_rejected, beta)


@torch.no_grad()
def heldout_accuracy(model: DiffusionForward, ids: Tensor, doc_ids: Tensor, block_size: int, mask_token_id: int,
                     mask_ratio: float = 0.5, seed: int = 0, device: torch.device | str = "cpu") -> float:
    """Share of masked held-out tokens whose argmax (mask token excluded) is right, at a fixed mask ratio and a fixed
    seed: the same noise for every model compared and on every rank."""
    batch = make_diffusion_batch(ids, doc_ids, block_size, "bdlm", mask_token_id, MaskBand(mask_ratio, mask_ratio),
                                 torch.Generator().manual_seed(seed)).to(device)
    return masked_token_accuracy(noisy_logits(model, batch), batch.targets, batch.masked, mask_token_id)
