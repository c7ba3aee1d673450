"""The training loop the recipes share: AdamW with warmup + cosine, tensor-parallel gradient fix-up, atomic
checkpoints every N steps, and exact resume.

Exact resume rests on one rule: everything random in step k (which rows, which tokens masked, embedding noise) comes
from a generator seeded by (seed, k) alone, so a run killed after checkpoint k and resumed replays steps k+1... as the
uninterrupted run did. Megatron's own DDP and optimizer do not run on CPU (their buffers live on CUDA), so this loop
uses a plain torch optimizer on both; on a GPU machine the same loop runs, only the process group changes (nccl).
"""

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from blockdiff.schedules import warmup_cosine
from nemo_dllm import parallel


@dataclass
class TrainerConfig:
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_every: int = 50
    keep_last: int = 2
    seed: int = 0
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        for key in ("max_steps", "save_every", "keep_last", "tensor_parallel"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr}")

    def lr_at(self, step: int) -> float:
        return self.lr * warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Checkpoints:
    """`out/checkpoints/step-0000042/rank-N.pt` (model, optimizer, step) plus `meta.json`, written into a `.partial`
    folder and renamed by rank 0 once every rank has written: a folder without `.partial` is always complete."""

    def __init__(self, out_dir: Path, keep_last: int) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("step-*") if not p.name.endswith(".partial"))

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:07d}"

    def save(self, step: int, model, optimizer, meta: dict, on_save: Callable[[Path], dict] | None = None) -> Path:
        """`on_save(folder)` runs on every rank before the folder is sealed; what it returns joins meta.json."""
        rank = dist.get_rank()
        final, tmp = self.path(step), self.path(step).with_name(self.path(step).name + ".partial")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                   tmp / f"rank-{rank}.pt")
        dist.barrier()
        meta = {**meta, **(on_save(tmp) if on_save else {})}
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1) + "\n")
            tmp.rename(final)
            for old in self.steps()[: -self.keep_last]:  # unlisted first, so a kill mid-delete leaves no torso
                doomed = self.path(old).rename(self.path(old).with_name(self.path(old).name + ".partial"))
                shutil.rmtree(doomed)
        dist.barrier()
        return final

    def load(self, step: int, model, optimizer) -> dict:
        state = torch.load(self.path(step) / f"rank-{dist.get_rank()}.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return json.loads((self.path(step) / "meta.json").read_text())


def read_metrics(path: Path) -> list[dict]:
    """The metric records of `path`, without a last line cut short by a kill mid-append (its step comes after the
    last checkpoint, so resuming recomputes it)."""
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


def train(cfg: TrainerConfig, model, loss_at: Callable[[int, torch.Generator], torch.Tensor], out_dir: Path,
          desc: str, meta: Callable[[int], dict] | None = None, on_save: Callable[[Path], dict] | None = None
          ) -> list[dict]:
    """Run steps [resume point, max_steps). `loss_at(step, generator)` builds step's batch from the generator and
    returns its loss; `meta(step)` adds fields to the step's metrics; `on_save(folder)` adds files and fields to each
    checkpoint. Returns the metric records of every step (including those kept from before a resume)."""
    out_dir = Path(out_dir)
    rank = dist.get_rank()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ckpts = Checkpoints(out_dir, cfg.keep_last)
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    if ckpts.steps():
        start = ckpts.steps()[-1]
        ckpts.load(start, model, optimizer)
    records = [r for r in read_metrics(metrics_path) if r["step"] < start]  # drop steps after the checkpoint
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = metrics_path.with_name(metrics_path.name + ".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, metrics_path)
    model.train()
    bar = tqdm(range(start, cfg.max_steps), desc=desc, initial=start, total=cfg.max_steps, disable=rank != 0,
               dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 15)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = loss_at(step, step_generator(cfg.seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parallel.reduce_replicated_grads(model)
        parallel.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "lr": cfg.lr_at(step), **(meta(step) if meta else {})}
        records.append(record)
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in record.items() if k != "step"})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            ckpts.save(step + 1, model, optimizer, {"lr": cfg.lr_at(step), "trainer": asdict(cfg)}, on_save)
            model.train()
    model.eval()
    return records
