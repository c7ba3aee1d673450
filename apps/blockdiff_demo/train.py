"""A minimal single-process trainer for the toy-scale main job: AR pretraining of the tiny base and the WSD
conversion. It owns only the loop (AdamW, clipping, progress); the objective, the batches, the learning-rate schedule
and the held-out accuracy are the core's (`blockdiff.objectives`, `blockdiff.batches`, `blockdiff.schedules`), the same
ones the Megatron recipes in `nemo_dllm` train with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from blockdiff.batches import make_diffusion_batch
from blockdiff.masks import document_positions, mdlm_mask
from blockdiff.noise import MaskBand
from blockdiff.objectives import EmbeddingNoise, ReferenceForward, pretrain_loss
from blockdiff.schedules import WSDSchedule, warmup_cosine


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0


def _fit(model: torch.nn.Module, steps: int, optim: OptimConfig, loss_at: Callable[[int], tuple[Tensor, dict]],
         desc: str) -> None:
    """`loss_at(step)` returns the step's loss and what the progress bar shows beside it."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, betas=(0.9, 0.95))
    # a log file gets a line every 15 s instead of a redraw every 0.1 s
    with tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 15) as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = optim.lr * warmup_cosine(step, optim.warmup_steps, steps)
            loss, shown = loss_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", **shown, refresh=False)
    model.eval()


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


def train_ar(model: torch.nn.Module, ids: Tensor, doc_ids: Tensor, steps: int, batch_size: int,
             optim: OptimConfig = OptimConfig(), seed: int = 0, desc: str = "AR pretrain") -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []

    def loss_at(step: int) -> tuple[Tensor, dict]:
        rows = _rows(ids.shape[0], batch_size, g)
        loss = ar_loss(model, ids[rows], doc_ids[rows])
        losses.append(loss.item())
        return loss, {}

    _fit(model, steps, optim, loss_at, desc)
    return losses


def train_wsd(model: torch.nn.Module, ids: Tensor, doc_ids: Tensor, schedule: WSDSchedule, batch_size: int,
              mask_token_id: int, optim: OptimConfig = OptimConfig(), band: MaskBand = MaskBand(),
              embed_noise_std: float = 0.1, embed_noise_steps: int = 50, seed: int = 0) -> list[tuple[str, float]]:
    """Convert an AR model to block diffusion along the WSD schedule. Returns (phase, loss) per step."""
    if ids.shape[1] != schedule.seq_len:
        raise ValueError(f"data rows have length {ids.shape[1]}, the schedule expects {schedule.seq_len}")
    g = torch.Generator().manual_seed(seed)
    tokens_per_step = batch_size * schedule.seq_len
    forward = ReferenceForward(model)
    history = []

    def loss_at(step: int) -> tuple[Tensor, dict]:
        phase = schedule.phase_at(step, tokens_per_step)
        rows = _rows(ids.shape[0], batch_size, g)
        batch = make_diffusion_batch(ids[rows], doc_ids[rows], phase.block_size, phase.objective, mask_token_id,
                                     band, g)
        loss = pretrain_loss(forward, batch, EmbeddingNoise(embed_noise_std, step, embed_noise_steps, g))
        history.append((phase.name, loss.item()))
        return loss, {"phase": phase.name}

    _fit(model, schedule.total_steps(tokens_per_step), optim, loss_at, "WSD convert")
    return history
