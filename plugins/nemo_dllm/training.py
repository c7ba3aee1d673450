"""How every recipe stage trains: NeMo's `llm.pretrain` / `llm.finetune` with `nl.Trainer` and `nl.MegatronStrategy`
(Megatron's DDP, optimizer, micro-batches and parallel layout), NeMo's distributed checkpoints kept by validation loss,
and resume from the last one when the same command runs again. This module builds those NeMo objects; `stages`
composes them per stage.

Exact resume rests on the data modules (`nemo_dllm.datamodule`): a sample and its noise are functions of their index,
and NeMo's sampler restarts at the samples the checkpoint had consumed, so a run killed and resumed replays the
uninterrupted run's steps.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning.pytorch as L
import torch
import torch.distributed as dist
from nemo import lightning as nl
from nemo.lightning.ckpt_utils import ckpt_to_dir

from nemo_dllm import cpu_compat
from nemo_dllm.llada2_moe import expert_load


@dataclass
class TrainerConfig:
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    val_every: int = 50  # validate, and checkpoint, every N steps (and at the last)
    save_top_k: int = 2  # checkpoints kept: the best k by validation loss (the top-k merge's candidates)
    seed: int = 1
    micro_batch_size: int = 0  # 0: the stage's whole per-rank batch in one micro-batch
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    expert_parallel: int = 1  # MoE models: experts split over this many of the data(x context)-parallel ranks
    sequence_parallel: bool = False  # Megatron's: needed by MoE layers under tensor parallelism
    attention: str = "dense"  # "flex": FlexAttention with the core's block mask (dense where a CPU needs gradients)

    def __post_init__(self) -> None:
        for key in ("max_steps", "val_every", "save_top_k", "seed", "tensor_parallel", "pipeline_parallel",
                    "context_parallel", "expert_parallel"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.micro_batch_size < 0:
            raise ValueError(f"trainer.micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if self.lr <= 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr}")
        if self.attention not in ("dense", "flex"):
            raise ValueError(f"trainer.attention must be 'dense' or 'flex', got {self.attention!r}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("trainer.sequence_parallel splits the sequence over the tensor-parallel ranks: it needs "
                             "trainer.tensor_parallel > 1")
        if self.attention == "flex" and self.context_parallel > 1:
            raise ValueError(f"trainer.attention 'flex' does not run with trainer.context_parallel "
                             f"{self.context_parallel}: context parallel attention takes the dense mask")

    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def data_parallel(self) -> int:
        """Data-parallel size of the launch (torchrun's WORLD_SIZE over the model-parallel sizes); raises naming the
        keys when they do not divide the processes."""
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if self.world_size() % model_parallel:
            raise ValueError(f"trainer.tensor_parallel x pipeline_parallel x context_parallel = "
                             f"{self.tensor_parallel} x {self.pipeline_parallel} x {self.context_parallel} does not "
                             f"divide the {self.world_size()} processes")
        data_parallel = self.world_size() // model_parallel
        if (data_parallel * self.context_parallel) % self.expert_parallel:
            raise ValueError(f"trainer.expert_parallel {self.expert_parallel} does not divide the data x context "
                             f"parallel ranks ({data_parallel} x {self.context_parallel}) it splits the experts over")
        return data_parallel

    def check_rows_split(self, tokens: int, what: str) -> None:
        """Under context parallelism every row splits evenly over the context-parallel ranks: rows of `tokens`
        tokens (or a multiple) must, or the run stops here, before training, naming `what` they are."""
        if tokens % self.context_parallel:
            raise ValueError(f"trainer.context_parallel {self.context_parallel} does not divide {what} ({tokens} "
                             "tokens): rows must split evenly over the context-parallel ranks")

    def micro_batch(self, global_batch_size: int) -> int:
        """The micro-batch size, checked against the global batch: each data-parallel rank's share of it must be a
        whole number of micro-batches."""
        dp = self.data_parallel()
        if global_batch_size % dp:
            raise ValueError(f"batch_size {global_batch_size} is not divisible by the {dp} data-parallel ranks")
        micro = self.micro_batch_size or global_batch_size // dp
        if (global_batch_size // dp) % micro:
            raise ValueError(f"trainer.micro_batch_size {micro} does not divide the per-rank batch "
                             f"{global_batch_size // dp} (batch_size {global_batch_size} over {dp} data-parallel "
                             f"ranks)")
        return micro


class MetricsLog(L.Callback):
    """`<out_dir>/metrics.jsonl`: one record per step (loss, learning rate, a MoE model's tokens per expert of each
    layer as `expert_load`, and what `extra(step)` adds), and
    `<out_dir>/validation.jsonl`: the validation loss after each validated step, both written by rank 0. A resumed
    run first drops the records of steps after its checkpoint (they are replayed)."""

    def __init__(self, out_dir: Path, extra: Callable[[int], dict] | None = None) -> None:
        self.path, self.validation, self.extra = out_dir / "metrics.jsonl", out_dir / "validation.jsonl", extra
        self._started = False

    def _drop_records_from(self, step: int) -> None:
        """Forget the records of `step` and later: a resumed run is about to replay them."""
        for path in (self.path, self.validation):
            kept = [r for r in read_metrics(path) if r["step"] < step]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".partial")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # the step's own; the scheduler moves it before the end
        if trainer.global_rank == 0 and not self._started:
            self._drop_records_from(trainer.global_step)  # restored from the checkpoint by now
            self._started = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            record = {"step": trainer.global_step - 1, "val_loss": float(trainer.callback_metrics["val_loss"])}
            with self.validation.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": step, "loss": float(loss), "lr": self.lr,
                  **(self.extra(step) if self.extra else {})}
        load = expert_load(pl_module.gpt_model())  # every rank: it sums over them
        if load:
            record["expert_load"] = load
        if trainer.global_rank == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The metric records of `path`, without a last line cut short by a kill mid-append (its step comes after the
    last checkpoint, so resuming recomputes it)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON metrics record: {line[:80]!r}") from None
    return records


class CheckpointWithHF(nl.ModelCheckpoint):
    """NeMo's checkpointing (distributed checkpoints, the best `save_top_k` kept by validation loss, plus the last),
    where each checkpoint folder also gets `hf/` (an HF export of its weights) and `meta.json` (its step and
    validation loss): the top-k merge averages those."""

    def __init__(self, export_hf: Callable[[L.LightningModule, Path], None], **kwargs) -> None:
        super().__init__(**kwargs)
        self.export_hf = export_hf

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        folder = ckpt_to_dir(filepath)
        self.export_hf(trainer.lightning_module, folder / "hf")
        if trainer.global_rank == 0:
            meta = {"step": trainer.global_step, "val_loss": float(trainer.callback_metrics["val_loss"])}
            (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


class AtFitEnd(L.Callback):
    """Runs `finish(module)` when training is over, also when a resumed run found nothing left to train (Lightning
    then skips its train-end hooks, not this one): the stage's export and summary."""

    def __init__(self, finish: Callable[[L.LightningModule], None]) -> None:
        self.finish = finish

    def on_fit_end(self, trainer, pl_module) -> None:
        self.finish(pl_module)


def trainer(cfg: TrainerConfig, global_batch_size: int, callbacks: list[L.Callback]) -> nl.Trainer:
    """NeMo's trainer with Megatron's strategy in `cfg`'s layout, for `cfg.max_steps`, validating every
    `cfg.val_every` steps (one global batch: Lightning counts validation batches as NeMo's data step pulls them, one
    per micro-batch)."""
    cpu_compat.apply()
    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=cfg.tensor_parallel, pipeline_model_parallel_size=cfg.pipeline_parallel,
        context_parallel_size=cfg.context_parallel, expert_model_parallel_size=cfg.expert_parallel,
        sequence_parallel=cfg.sequence_parallel, ckpt_async_save=False,  # the async writer needs CUDA
        ckpt_load_optimizer=True, ckpt_save_optimizer=True,
    )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    micro_batches = global_batch_size // (cfg.micro_batch(global_batch_size) * cfg.data_parallel())
    return nl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=local,
        num_nodes=max(1, cfg.world_size() // local), strategy=strategy, max_steps=cfg.max_steps,
        val_check_interval=min(cfg.val_every, cfg.max_steps), limit_val_batches=micro_batches,
        num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
        plugins=nl.MegatronMixedPrecision(precision="32"), callbacks=callbacks,
    )


def logger(out_dir: Path, save_top_k: int, export_hf: Callable[[L.LightningModule, Path], None]) -> nl.NeMoLogger:
    """NeMo's logger in `<out_dir>/logs` (it moves every file already in its directory into `run_N/` when a run
    starts: its own folder keeps it away from the stage's metrics and outputs) with the checkpoints in
    `<out_dir>/checkpoints`: validated every `val_every` steps, the best `save_top_k` kept, each exported to HF."""
    checkpoint = CheckpointWithHF(export_hf, dirpath=str(Path(out_dir) / "checkpoints"), monitor="val_loss",
                                  mode="min", save_top_k=save_top_k, save_last=True,
                                  filename="{val_loss:.4f}-{step}-{consumed_samples}",
                                  save_optim_on_train_end=True)  # else a finished run could not be resumed
    return nl.NeMoLogger(explicit_log_dir=str(Path(out_dir) / "logs"), ckpt=checkpoint, use_datetime_version=False)


def resume(out_dir: Path) -> nl.AutoResume:
    """Resume from the newest complete checkpoint in `<out_dir>/checkpoints` when there is one."""
    return nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True,
                         resume_from_directory=str(Path(out_dir) / "checkpoints"))


def run(train: Callable, **parts) -> None:
    """One stage in this process: `train` is NeMo's `llm.pretrain` or `llm.finetune`, `parts` its model, data,
    trainer, log and resume. Other stages may have run in this process before (the recipe's pipeline)."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    cpu_compat.apply()
    destroy_num_microbatches_calculator()  # NeMo keeps one per process; a previous stage's may have another batch size
    rendezvous = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    train(**parts)
    for key, value in rendezvous.items():  # Lightning exports the port it chose; a child process must not inherit it
        if value is None:
            os.environ.pop(key, None)
    if dist.is_initialized():
        dist.barrier()
