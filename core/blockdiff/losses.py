"""Training objectives of LLaDA2.0 (Eq. 1-2 and 5-8), on logits of the noisy half only.

Labels are the clean token at the same position (no shift): a masked position predicts its own token. All reductions
run in fp32 whatever the logits' dtype. `t_tok` is the mask ratio of each token's sequence or block ([batch, L]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blockdiff.noise import elbo_weight


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """-log p(target) per position: logits [batch, L, V], targets [batch, L] -> [batch, L] fp32."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def weighted_masked_nll(logits: Tensor, targets: Tensor, masked: Tensor, t_tok: Tensor) -> Tensor:
    """Per sequence: sum over masked positions of (1/t) * -log p(x_0 | x_t). [batch] fp32. Its negation is the
    one-sample ELBO estimate of log p(x_0) that Eq. 7-8 use."""
    nll = token_nll(logits, targets) * elbo_weight(t_tok.float())
    return torch.where(masked, nll, torch.zeros_like(nll)).sum(dim=1)


def diffusion_loss(logits: Tensor, targets: Tensor, masked: Tensor, t_tok: Tensor, num_tokens: int | Tensor) -> Tensor:
    """BDLM (Eq. 1) and MDLM (Eq. 2): the weighted masked NLL summed over the batch, divided by the number of
    loss-eligible tokens. The two objectives differ only in the attention mask the logits were computed under."""
    if not torch.is_tensor(num_tokens) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return weighted_masked_nll(logits, targets, masked, t_tok).sum() / num_tokens


def sft_loss(logits: Tensor, targets: Tensor, masked: Tensor, t_tok: Tensor, response: Tensor) -> Tensor:
    """Eq. 5: prompt-conditioned; each sequence's weighted masked NLL over its response length, averaged over the
    batch. `response` [batch, L] marks response positions (padding included: the model learns to emit EOS)."""
    lengths = response.sum(dim=1).clamp(min=1).float()
    return (weighted_masked_nll(logits, targets, masked, t_tok) / lengths).mean()


def confidence_loss(logits: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """Eq. 6's second term: mean entropy of the predictive distribution over masked positions that the model already
    predicts correctly (argmax == target); minimising it sharpens right answers, which lets more of them pass the
    decoding threshold. Zero when no such position exists."""
    logits = logits.float()
    correct = masked & (logits.argmax(dim=-1) == targets)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    count = correct.sum()
    return torch.where(correct, entropy, torch.zeros_like(entropy)).sum() / count.clamp(min=1)


def cap_loss(logits: Tensor, targets: Tensor, masked: Tensor, t_tok: Tensor, response: Tensor,
             weight: float) -> Tensor:
    """Eq. 6: SFT loss + weight * confidence loss."""
    return sft_loss(logits, targets, masked, t_tok, response) + weight * confidence_loss(logits, targets, masked)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float = 0.1) -> Tensor:
    """Eq. 7-8: DPO with the ELBO in place of the intractable log-likelihood. Each input is the per-sequence
    weighted masked NLL ([batch]) of the policy or the frozen reference, both computed on the same noised samples so
    the noise cancels in the difference."""
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    # ELBO = -NLL, so the log-ratio log pi/ref is approximated by (ref_nll - policy_nll).
    chosen = reference_chosen - policy_chosen
    rejected = reference_rejected - policy_rejected
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def masked_token_accuracy(logits: Tensor, targets: Tensor, masked: Tensor, mask_token_id: int) -> float:
    """Share of masked positions whose argmax (the mask token excluded, as in decoding) is the right token."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    right = (logits.argmax(dim=-1) == targets) & masked
    return right.sum().item() / max(1, int(masked.sum()))
