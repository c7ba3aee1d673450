"""The recipes' data as NeMo data modules: map-style datasets whose sample i is a pure function of (seed, i), batched
by NeMo's Megatron sampler, which gives each data-parallel rank its micro-batches of every global batch.

Because a sample and its noise depend only on their index, a run resumed at global step k (the checkpoint keeps the k *
global_batch_size samples consumed, and NeMo's sampler starts after them) replays the uninterrupted run, and a
data-parallel layout changes only which rank computes which micro-batch, not what any micro-batch holds: DP = 2 trains
on exactly the micro-batches one process does with two micro-batches per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import lightning.pytorch as L
import torch
from nemo.lightning.data import WrappedDataLoader
from nemo.lightning.pytorch.plugins import MegatronDataSampler
from torch.utils.data import DataLoader, Dataset

from blockdiff.batches import DiffusionBatch, make_diffusion_batch
from blockdiff.noise import MaskBand
from blockdiff.schedules import WSDSchedule
from nemo_dllm import data


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


class Shuffled(Dataset):
    """`length` samples drawn from `items` in a fresh permutation per pass (seeded by the pass), each tagged with its
    index."""

    def __init__(self, items: Sequence, length: int, seed: int) -> None:
        if not items:
            raise data.DataError("no training examples")
        self.items, self.length, self.seed = items, length, seed
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, object]:
        n = len(self.items)
        epoch = index // n
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(
                sample_seed(self.seed, -1 - epoch))))
        return index, self.items[int(self._order[1][index % n])]


class Cycled(Dataset):
    """Validation: the held-out items in order, repeated up to `at_least` samples (NeMo's sampler drops a last
    incomplete global batch, so a held-out set smaller than one would give no validation loss), each tagged with its
    index."""

    def __init__(self, items: Sequence, at_least: int) -> None:
        if not items:
            raise data.DataError("no held-out examples")
        self.items, self.length = items, max(len(items), at_least)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, object]:
        return index, self.items[index % len(self.items)]


@dataclass(frozen=True)
class PretrainCollate:
    """Packed rows -> a BDLM/MDLM batch at the block size of the WSD phase the samples' global step is in."""

    schedule: WSDSchedule
    global_batch_size: int
    tokens_per_step: int
    mask_token_id: int
    band: MaskBand
    seed: int
    fixed_block: int | None = None  # validation: always this block size, BDLM

    def __call__(self, samples: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]) -> dict:
        first = samples[0][0]
        ids = torch.stack([s[1][0] for s in samples])
        doc_ids = torch.stack([s[1][1] for s in samples])
        if self.fixed_block is None:
            phases = {self.schedule.phase_at(i // self.global_batch_size, self.tokens_per_step) for i, _ in samples}
            if len(phases) != 1:
                raise AssertionError(f"a micro-batch spans WSD phases {phases}: samples {[i for i, _ in samples]}")
            phase = phases.pop()
            block, objective = phase.block_size, phase.objective
        else:
            block, objective = self.fixed_block, "bdlm"
        g = torch.Generator().manual_seed(sample_seed(self.seed, first))
        batch = make_diffusion_batch(ids, doc_ids, block, objective, self.mask_token_id, self.band, g)
        return {"diffusion": batch, "seed": sample_seed(self.seed, first) + 1}


@dataclass(frozen=True)
class ResponseCollate:
    """(prompt, response) pairs -> a prompt-conditioned block-diffusion batch, only the response maskable; or, for
    preference triples, one such batch for the chosen and one for the rejected response."""

    seq_len: int
    block_size: int
    eos_id: int
    mask_token_id: int
    band: MaskBand
    seed: int

    def noised(self, pairs: list[tuple[list[int], list[int]]], g: torch.Generator) -> DiffusionBatch:
        ids, response, doc_ids = data.response_batch(pairs, self.seq_len, self.block_size, self.eos_id)
        return make_diffusion_batch(ids, doc_ids, self.block_size, "bdlm", self.mask_token_id, self.band, g,
                                    maskable=response)

    def __call__(self, samples: list) -> dict:
        g = torch.Generator().manual_seed(sample_seed(self.seed, samples[0][0]))
        items = [s[1] for s in samples]
        if isinstance(items[0], data.Preference):
            return {"chosen": self.noised([(p.prompt, p.chosen) for p in items], g),
                    "rejected": self.noised([(p.prompt, p.rejected) for p in items], g)}
        return {"diffusion": self.noised([(e.prompt, e.response) for e in items], g)}


class RecipeData(L.LightningDataModule):
    """Training and validation loaders for one stage, batched by NeMo's Megatron sampler."""

    def __init__(self, train: Dataset, val: Dataset, collate: Callable, val_collate: Callable, seq_len: int,
                 micro_batch_size: int, global_batch_size: int) -> None:
        super().__init__()
        self.train, self.val, self.collate, self.val_collate = train, val, collate, val_collate
        # the attributes NeMo's data modules carry, which NeMo's callbacks read
        self.seq_length, self.micro_batch_size, self.global_batch_size = seq_len, micro_batch_size, global_batch_size
        self.tokenizer = None  # llm.pretrain hands the data's tokenizer to the model; the batches are token ids already
        self.data_sampler = MegatronDataSampler(seq_len=seq_len, micro_batch_size=micro_batch_size,
                                                global_batch_size=global_batch_size, dataloader_type="single")

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the data: how many samples the run has consumed."""
        return {"consumed_samples": self.trainer.global_step * self.global_batch_size}

    def load_state_dict(self, state_dict: dict) -> None:
        """On resume, NeMo's sampler starts after the samples the checkpoint had consumed (and counts the samples it
        logs from that step on)."""
        self.data_sampler.init_consumed_samples = state_dict["consumed_samples"]
        self.data_sampler.init_global_step = state_dict["consumed_samples"] // self.global_batch_size

    def train_dataloader(self) -> DataLoader:
        return WrappedDataLoader(mode="train", dataset=self.train, collate_fn=self.collate, num_workers=0)

    def val_dataloader(self) -> DataLoader:  # "validation": NeMo's sampler then starts it at 0 on a resumed run
        return WrappedDataLoader(mode="validation", dataset=self.val, collate_fn=self.val_collate, num_workers=0)
