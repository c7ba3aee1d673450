"""The block-diffusion model as NeMo trains models: a LightningModule whose Megatron model is a GPTModel built from
an HF checkpoint, whose data step carries the block-diffusion batch and whose forward step returns the core's
objective. NeMo's `MegatronStrategy` does the rest (Megatron's DDP and optimizer, micro-batches, checkpoints).

The module adds only what is new to NeMo: the `[x_noisy, x_clean]` batch (built by the data module, its noise made
identical across each model-parallel group here) and the objective (`blockdiff.objectives`, composed over Megatron's
forward by `megatron_model.DiffusionForward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig
from nemo.lightning import io
from nemo.lightning.megatron_parallel import MegatronLossReduction
from nemo.lightning.pytorch.optim import LRSchedulerModule, MegatronOptimizerModule
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from blockdiff.batches import DiffusionBatch, cat_batches
from blockdiff.models import read_config
from blockdiff.objectives import (
    EmbeddingNoise,
    complementary_sft_score,
    diffusion_logits,
    dpo_objective,
    pretrain_score,
    sft_score,
)
from blockdiff.schedules import warmup_cosine
from nemo_dllm import megatron_model, parallel


def stage_output(module: "BlockDiffusionModule", output: torch.Tensor) -> torch.Tensor | None:
    """On a pipeline stage before the last, what the forward step returns: the stage's activations in Megatron's
    sequence-first layout, for the schedule to send on. None on the last stage, which scores the logits."""
    return None if module.gpt_model().post_process else output.transpose(0, 1)


@dataclass(frozen=True)
class PretrainObjective:
    """BDLM/MDLM (Eq. 1-2), with Gaussian noise on masked tokens' embeddings for the first `embed_noise_steps`."""

    embed_noise_std: float = 0.0
    embed_noise_steps: int = 0

    def __call__(self, module: "BlockDiffusionModule", batch: dict) -> torch.Tensor:
        noise = EmbeddingNoise(self.embed_noise_std, module.global_step, self.embed_noise_steps,
                               torch.Generator().manual_seed(batch["seed"]))
        output = diffusion_logits(module.forward_fn(), batch["diffusion"], noise)
        activations = stage_output(module, output)
        return pretrain_score(output, batch["diffusion"]) if activations is None else activations


@dataclass(frozen=True)
class SFTObjective:
    """SFT (Eq. 5) with complementary masking (the pair in one forward); CAP (Eq. 6) when `confidence_weight` > 0."""

    confidence_weight: float = 0.0
    complementary: bool = True

    def __call__(self, module: "BlockDiffusionModule", batch: dict) -> torch.Tensor:
        diffusion: DiffusionBatch = batch["diffusion"]
        rows = cat_batches([diffusion, diffusion.complement()]) if self.complementary else diffusion
        output = diffusion_logits(module.forward_fn(), rows)
        activations = stage_output(module, output)
        if activations is not None:
            return activations
        if self.complementary:
            return complementary_sft_score(output, diffusion, self.confidence_weight)
        return sft_score(output, diffusion, self.confidence_weight)


@dataclass(frozen=True)
class DPOObjective:
    """DPO on the ELBO (Eq. 7-8) against the frozen reference the module holds (one pipeline stage: the reference
    is not pipelined)."""

    beta: float = 0.1

    def __call__(self, module: "BlockDiffusionModule", batch: dict) -> torch.Tensor:
        return dpo_objective(module.forward_fn(), module.reference_fn(), batch["chosen"], batch["rejected"],
                             self.beta)


class MeanLoss(MegatronLossReduction):
    """Each micro-batch's loss is already its mean; the step's loss is their mean over micro-batches and data-parallel
    ranks (Megatron's schedule divides each micro-batch's loss by their number before backward)."""

    def forward(self, batch: dict, forward_out: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # a copy: the schedule divides forward_out in place by the number of micro-batches
        return forward_out, {"avg": forward_out.detach().clone().reshape(1)}

    def reduce(self, losses_reduced_per_micro_batch: list[dict]) -> torch.Tensor:
        from megatron.core import parallel_state

        if not losses_reduced_per_micro_batch:  # not the last pipeline stage
            return torch.zeros(())
        loss = torch.cat([x["avg"] for x in losses_reduced_per_micro_batch]).mean()
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(loss, group=group)
        return loss / dist.get_world_size(group)


class WarmupCosine(LRSchedulerModule):
    """The core's learning-rate schedule (`blockdiff.schedules.warmup_cosine`) as NeMo's scheduler module."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
        super().__init__()
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio

    def scheduler(self, model, optimizer):
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, self.warmup_steps, self.max_steps,
                                                                   self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}


def megatron_optimizer(lr: float, weight_decay: float, grad_clip: float, warmup_steps: int, max_steps: int,
                       min_lr_ratio: float) -> MegatronOptimizerModule:
    """NeMo's optimizer module over Megatron's optimizer: AdamW (0.9, 0.95), fp32, gradient clipping by the global
    norm of the whole (model-parallel) model."""
    config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.95,
                             clip_grad=grad_clip, bf16=False, fp16=False, use_distributed_optimizer=False)
    return MegatronOptimizerModule(config=config, lr_scheduler=WarmupCosine(warmup_steps, max_steps, min_lr_ratio))


class BlockDiffusionModule(L.LightningModule, io.IOMixin):
    """An HF decoder (dense Qwen3 / Llama, or LLaDA2.0's MoE) trained on a block-diffusion objective by NeMo's
    Megatron strategy.

    `init_from` is the HF directory the weights start from; `reference_from`, when given, is loaded as a frozen
    reference (DPO). `config` is megatron-core's TransformerConfig, into which the strategy writes the parallel sizes.
    `seq_len`: the recipe's sequence length. `flex_attention`: the attention takes the core's FlexAttention block
    mask instead of the dense mask.
    """

    def __init__(self, init_from: str, objective, optim: MegatronOptimizerModule, seq_len: int,
                 reference_from: str | None = None, flex_attention: bool = False) -> None:
        super().__init__()
        self.init_from, self.reference_from, self.objective = str(init_from), reference_from, objective
        self.flex_attention = flex_attention
        self.tokenizer = None  # llm.finetune hands the model's tokenizer to the data; the batches are token ids already
        self.hf_config = read_config(init_from)
        self.config = megatron_model.transformer_config(self.hf_config)
        self.config.seq_length = seq_len  # NeMo's llm.pretrain/finetune check it (against 2 x CP among others)
        self.optim = optim
        self.optim.connect(self)
        self._reference: list = []  # a list keeps the frozen model out of the parameters DDP and the optimizer see

    def configure_model(self) -> None:
        if hasattr(self, "module"):
            return
        self.module = self._load(self.init_from)
        if self.reference_from is not None:
            reference = self._load(self.reference_from).eval().requires_grad_(False)
            self._reference.append(reference)

    def _load(self, hf_dir: str):
        from megatron.core import parallel_state

        weights: dict[str, torch.Tensor] = {}
        for f in sorted(Path(hf_dir).glob("*.safetensors")):
            weights.update(load_file(f))
        tp_rank, tp_size = parallel.tp_rank_and_size()
        model = megatron_model.build_gpt_model(self.hf_config, config=self.config,
                                               pre_process=parallel_state.is_pipeline_first_stage(),
                                               post_process=parallel_state.is_pipeline_last_stage())
        ep_rank, ep_size = parallel.ep_rank_and_size()
        megatron_model.load_hf_weights(model, weights, self.hf_config, tp_rank, tp_size, ep_rank, ep_size)
        return model.to(parallel.device())

    def gpt_model(self):
        """The GPTModel inside the DDP wrapper NeMo's strategy put around it."""
        from megatron.core.utils import unwrap_model

        return unwrap_model(self.module)

    def forward_fn(self) -> megatron_model.DiffusionForward:
        return megatron_model.DiffusionForward(self.gpt_model(), self.flex_attention)

    def reference_fn(self) -> megatron_model.DiffusionForward:
        if not self._reference:
            raise ValueError("this objective needs a reference model: set reference_from")
        return megatron_model.DiffusionForward(self._reference[0], self.flex_attention)

    def data_step(self, dataloader_iter) -> dict:
        batch = next(dataloader_iter)
        if isinstance(batch, tuple) and len(batch) == 3:  # Lightning's (batch, batch_idx, dataloader_idx)
            batch = batch[0]
        return {k: parallel.broadcast_noise(v) if isinstance(v, DiffusionBatch) else v for k, v in batch.items()}

    def forward_step(self, batch: dict) -> torch.Tensor:
        return self.objective(self, batch)

    def training_step(self, batch: dict, batch_idx=None) -> torch.Tensor:
        return self.forward_step(batch)

    def validation_step(self, batch: dict, batch_idx=None) -> torch.Tensor:
        return self.forward_step(batch)

    @property
    def training_loss_reduction(self) -> MeanLoss:
        return MeanLoss()

    @property
    def validation_loss_reduction(self) -> MeanLoss:
        return MeanLoss()
