"""A minimal single-process trainer over the core: AR pretraining of the tiny base and the WSD conversion.

It exists for the toy-scale main job and the tests; the real recipes run on Megatron through `nemo_dllm`, which
builds its batches and losses from the same core functions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from blockdiff.batches import DiffusionBatch, make_diffusion_batch
from blockdiff.losses import diffusion_loss, masked_token_accuracy
from blockdiff.masks import document_positions, mdlm_mask
from blockdiff.noise import MaskBand, add_embedding_noise
from blockdiff.schedules import WSDSchedule


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0


def _optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _progress(steps: int, desc: str) -> tqdm:
    # a log file gets a line every 15 s instead of a redraw every 0.1 s
    return tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 15)


def _rows(n_rows: int, batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, n_rows, (batch_size,), generator=generator)


def ar_loss(model: torch.nn.Module, ids: Tensor, doc_ids: Tensor) -> Tensor:
    """Next-token cross-entropy under a causal, document-restricted mask; no loss across a document boundary."""
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    logits = model(ids, document_positions(doc_ids), mdlm_mask(doc_ids) & causal)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * same_doc).sum() / same_doc.sum()


def diffusion_logits(model: torch.nn.Module, batch: DiffusionBatch, embed_noise_std: float = 0.0, step: int = 0,
                     embed_noise_steps: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Logits of the noisy half [b, L, V]."""
    embeds = add_embedding_noise(model.embed(batch.input_ids), batch.masked_inputs, embed_noise_std, step,
                                 embed_noise_steps, generator)
    logits = model(None, batch.positions, batch.attention_mask(), inputs_embeds=embeds)
    return logits[:, : batch.noisy_len]


def train_ar(model: torch.nn.Module, ids: Tensor, doc_ids: Tensor, steps: int, batch_size: int,
             optim: OptimConfig = OptimConfig(), seed: int = 0, desc: str = "AR pretrain") -> list[float]:
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(model, optim, steps)
    losses = []
    with _progress(steps, desc) as bar:
        for _ in bar:
            rows = _rows(ids.shape[0], batch_size, g)
            loss = ar_loss(model, ids[rows], doc_ids[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def train_wsd(model: torch.nn.Module, ids: Tensor, doc_ids: Tensor, schedule: WSDSchedule, batch_size: int,
              mask_token_id: int, optim: OptimConfig = OptimConfig(), band: MaskBand = MaskBand(),
              embed_noise_std: float = 0.1, embed_noise_steps: int = 50, seed: int = 0) -> list[tuple[str, float]]:
    """Convert an AR model to block diffusion along the WSD schedule. Returns (phase, loss) per step."""
    if ids.shape[1] != schedule.seq_len:
        raise ValueError(f"data rows have length {ids.shape[1]}, the schedule expects {schedule.seq_len}")
    model.train()
    g = torch.Generator().manual_seed(seed)
    tokens_per_step = batch_size * schedule.seq_len
    total = schedule.total_steps(tokens_per_step)
    opt, sched = _optimizer(model, optim, total)
    history = []
    with _progress(total, "WSD convert") as bar:
        for step in bar:
            phase = schedule.phase_at(step, tokens_per_step)
            rows = _rows(ids.shape[0], batch_size, g)
            batch = make_diffusion_batch(ids[rows], doc_ids[rows], phase.block_size, phase.objective, mask_token_id,
                                         band, g)
            logits = diffusion_logits(model, batch, embed_noise_std, step, embed_noise_steps, g)
            loss = diffusion_loss(logits, batch.targets, batch.masked, batch.t_tok, batch.maskable.sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            history.append((phase.name, loss.item()))
            bar.set_postfix(phase=phase.name, loss=f"{loss.item():.3f}")
    model.eval()
    return history


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, ids: Tensor, doc_ids: Tensor, block_size: int, mask_token_id: int,
                          mask_ratio: float = 0.5, seed: int = 0) -> float:
    """Share of masked tokens whose argmax (mask token excluded) is the right token, at a fixed mask ratio."""
    g = torch.Generator().manual_seed(seed)
    batch = make_diffusion_batch(ids, doc_ids, block_size, "bdlm", mask_token_id, MaskBand(mask_ratio, mask_ratio), g)
    return masked_token_accuracy(diffusion_logits(model, batch), batch.targets, batch.masked, mask_token_id)
