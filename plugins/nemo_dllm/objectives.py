"""The training objectives on a Megatron GPTModel: the core's batches and losses, Megatron's forward.

Nothing here re-derives math: masks, noise, weights and reductions all come from `blockdiff`. The only Megatron
specifics are the forward (sequence-first embeddings, inverted mask) and where embedding noise is injected.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blockdiff.batches import DiffusionBatch
from blockdiff.losses import cap_loss, diffusion_loss, dpo_loss, sft_loss, weighted_masked_nll
from blockdiff.noise import add_embedding_noise
from nemo_dllm import megatron_model


def noisy_logits(model, batch: DiffusionBatch, embed_noise_std: float = 0.0, step: int = 0,
                 embed_noise_steps: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Logits of the noisy half [b, L, V]; masked-token embeddings noised during the first `embed_noise_steps`."""
    embeddings = megatron_model.embed(model, batch.input_ids).transpose(0, 1)  # Megatron is sequence-first
    embeddings = add_embedding_noise(embeddings, batch.masked_inputs, embed_noise_std, step, embed_noise_steps,
                                     generator).transpose(0, 1)
    logits = megatron_model.forward(model, None, batch.positions, batch.attention_mask(), embeddings=embeddings)
    return logits[:, : batch.noisy_len]


def pretrain_loss(model, batch: DiffusionBatch, **noise) -> Tensor:
    """BDLM or MDLM (which one is the batch's objective), normalised by the batch's maskable tokens."""
    logits = noisy_logits(model, batch, **noise)
    return diffusion_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable.sum())


def sft_objective(model, batch: DiffusionBatch, confidence_weight: float = 0.0) -> Tensor:
    """SFT (Eq. 5), or CAP (Eq. 6) when confidence_weight > 0. `maskable` marks the response."""
    logits = noisy_logits(model, batch)
    if confidence_weight > 0:
        return cap_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable, confidence_weight)
    return sft_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable)


def sequence_nll(model, batch: DiffusionBatch) -> Tensor:
    """Per-sequence weighted masked NLL ([b]): the negative one-sample ELBO that DPO compares."""
    return weighted_masked_nll(noisy_logits(model, batch), batch.targets, batch.masked, batch.t_tok)


def dpo_objective(policy, reference, chosen: DiffusionBatch, rejected: DiffusionBatch, beta: float) -> Tensor:
    """DPO on the ELBO (Eq. 7-8): policy and frozen reference score the very same noised samples."""
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_nll(reference, chosen), sequence_nll(reference, rejected)
    return dpo_loss(sequence_nll(policy, chosen), sequence_nll(policy, rejected), ref_chosen, ref_rejected, beta)
