"""The recipe stages of LLaDA2.0 on Megatron: `wsd_cpt` (AR -> block diffusion), `sft` (and CAP), `dpo`, `merge`.

Each stage reads a Hugging Face directory and trains it inside NeMo's trainer (`nemo_dllm.training.fit`: NeMo's
Megatron strategy, distributed checkpoints kept by validation loss, resume) as a `module.BlockDiffusionModule` on a
`datamodule.RecipeData`, and ends with a Hugging Face directory `<out_dir>/hf` that the next stage and the serving
plugins load. Every configuration error is raised before the model is built.
"""

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from blockdiff.merge import merge_checkpoints, select_top_k
from blockdiff.models import BlockDiffusionSettings, load_model, read_config, save_weights, with_block_diffusion
from blockdiff.noise import MaskBand
from blockdiff.objectives import ReferenceForward, heldout_accuracy
from blockdiff.schedules import WSDSchedule
from blockdiff.text import EOS, MASK, load_tokenizer, special_id
from nemo_dllm import data, megatron_model, parallel
from nemo_dllm.datamodule import Cycled, PretrainCollate, RecipeData, ResponseCollate, Shuffled
from nemo_dllm.module import BlockDiffusionModule, DPOObjective, PretrainObjective, SFTObjective, megatron_optimizer
from nemo_dllm.training import TrainerConfig, fit

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class WSDConfig:
    init_from: str  # HF directory of the AR model
    out_dir: str
    data: str  # JSONL: {"text"} documents
    seq_len: int = 256
    batch_size: int = 8
    warmup_blocks: tuple[int, ...] = (1, 4, 32, 64)
    decay_blocks: tuple[int, ...] | None = None  # default: halving from seq_len/2 to final_block
    final_block: int = 32
    warmup_tokens: int = 65536  # per warmup phase
    stable_tokens: int = 131072
    decay_tokens: int = 65536  # per decay phase
    mask_band: tuple[float, float] = (1e-3, 1.0)
    embed_noise_std: float = 0.1
    embed_noise_steps: int = 50
    threshold: float = 0.95  # the decoding default written into the output config
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def schedule(self) -> WSDSchedule:
        return WSDSchedule.build(self.seq_len, tuple(self.warmup_blocks),
                                 None if self.decay_blocks is None else tuple(self.decay_blocks), self.warmup_tokens,
                                 self.stable_tokens, self.decay_tokens, self.final_block)


@dataclass
class SFTConfig:
    init_from: str  # HF directory of a block-diffusion model
    out_dir: str
    data: str  # JSONL: {"prompt", "response"} or {"messages"} lines
    seq_len: int = 256
    batch_size: int = 8
    mask_band: tuple[float, float] = (0.3, 0.8)
    complementary: bool = True
    confidence_weight: float = 0.0  # > 0 makes this the CAP stage (Eq. 6)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class DPOConfig:
    init_from: str  # HF directory of the SFT model: the policy's start
    out_dir: str
    data: str  # JSONL: {"prompt", "chosen", "rejected"} lines
    reference_from: str | None = None  # the frozen reference; None: init_from (the post-SFT model, as the paper)
    seq_len: int = 256
    batch_size: int = 4
    beta: float = 0.1
    mask_band: tuple[float, float] = (0.3, 0.8)
    lr: float | None = None  # None: the learning rate the SFT run ended with
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class MergeConfig:
    run_dir: str  # a stage's out_dir: its kept checkpoints (the best by validation loss) are the candidates
    out_dir: str
    top_k: int = 2
    metric: str = "val_loss"
    higher_is_better: bool = False


@dataclass
class PipelineConfig:
    """Every stage of the recipe: `wsd`, then `merge` of its best checkpoints by validation loss (the paper's top-k
    merge before post-training); `sft` and `cap` both start from the merged model with equal budgets, so their
    decoding speed compares CAP against SFT alone; `dpo` continues from `cap`, against `cap`'s start as reference."""

    wsd: WSDConfig
    merge: MergeConfig
    sft: SFTConfig
    cap: SFTConfig
    dpo: DPOConfig


def _check_seq_len(seq_len: int, block: int) -> None:
    if seq_len % block:
        raise ValueError(f"seq_len {seq_len} is not divisible by the block size {block}")


def export_hf(model, cfg: dict, tokenizer_dir: str, out: Path, extra: dict | None = None) -> Path:
    """Gather every tensor-parallel shard of every pipeline stage and write an HF directory (rank 0), atomically."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (parallel_state.get_tensor_model_parallel_rank(),
                                   megatron_model.megatron_state(model)), group=group)
    if dist.get_rank() == 0:
        shards = [{} for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        for tp_rank, state in parts:
            shards[tp_rank].update(state)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(megatron_model.megatron_to_hf(shards, cfg), cfg, tmp)
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tokenizer_dir) / name, tmp / name)
        if extra:
            (tmp / "training_state.json").write_text(json.dumps(extra, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out


def _hf_exporter(hf_cfg: dict, tokenizer_dir: str):
    """What each kept checkpoint also gets: an HF directory, the top-k merge's input."""

    def export(module: BlockDiffusionModule, out: Path) -> None:
        export_hf(module.gpt_model(), hf_cfg, tokenizer_dir, out)

    return export


def _finish(module: BlockDiffusionModule, cfg: dict, tokenizer_dir: str, out_dir: Path, records: list[dict],
            summary: dict, evaluate: Callable[[Path], dict] | None = None) -> Path:
    """Export the trained model and write `summary.json`, with what `evaluate(hf_dir)` measures on the exported model
    (rank 0, the core's reference model: the same on any parallel layout)."""
    hf = export_hf(module.gpt_model(), cfg, tokenizer_dir, out_dir / "hf", {"final_lr": records[-1]["lr"], **summary})
    layout = parallel.layout()
    if dist.get_rank() == 0:
        summary = {**summary, "parallel": layout, **(evaluate(hf) if evaluate else {})}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    dist.barrier()
    return hf


def _optimizer(trainer: TrainerConfig):
    return megatron_optimizer(trainer.lr, trainer.weight_decay, trainer.grad_clip, trainer.warmup_steps,
                              trainer.max_steps, trainer.min_lr_ratio)


def wsd_cpt(cfg: WSDConfig) -> Path:
    """Warmup-Stable-Decay conversion of an AR checkpoint into a block-diffusion model."""
    schedule = cfg.schedule()  # raises on a sequence length the block sizes do not divide
    cfg.trainer.check_rows_split(cfg.seq_len, "seq_len (MDLM rows; BDLM rows are twice as long)")
    micro = cfg.trainer.micro_batch(cfg.batch_size)
    band = MaskBand(*cfg.mask_band)
    tok = load_tokenizer(cfg.init_from)
    mask_id, eos = special_id(tok, MASK), special_id(tok, EOS)
    ids, doc_ids, val_ids, val_doc = data.pretraining_rows(cfg.data, tok, cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    trainer = replace(cfg.trainer, max_steps=schedule.total_steps(tokens_per_step))
    seed = trainer.seed
    train_collate = PretrainCollate(schedule, cfg.batch_size, tokens_per_step, mask_id, band, seed)
    val_collate = replace(train_collate, fixed_block=cfg.final_block)
    datamodule = RecipeData(Shuffled(list(zip(ids, doc_ids)), trainer.max_steps * cfg.batch_size, seed),
                            Cycled(list(zip(val_ids, val_doc)), cfg.batch_size), train_collate, val_collate,
                            cfg.seq_len, micro, cfg.batch_size)

    def phase_of(step: int) -> dict:
        phase = schedule.phase_at(step, tokens_per_step)
        return {"phase": phase.name, "block_size": phase.block_size}

    hf_cfg = read_config(cfg.init_from)
    settings = BlockDiffusionSettings(mask_token_id=mask_id, eos_token_ids=(eos,), block_size=cfg.final_block,
                                      threshold=cfg.threshold)
    out_cfg = with_block_diffusion(hf_cfg, settings)
    module = BlockDiffusionModule(cfg.init_from, PretrainObjective(cfg.embed_noise_std, cfg.embed_noise_steps),
                                  _optimizer(trainer), flex_attention=trainer.attention == "flex")
    records = fit(trainer, module, datamodule, Path(cfg.out_dir), _hf_exporter(out_cfg, cfg.init_from), phase_of)

    def accuracy(hf: Path) -> dict:
        model, _ = load_model(hf)
        return {"masked_token_accuracy": heldout_accuracy(ReferenceForward(model), val_ids[:16], val_doc[:16],
                                                          cfg.final_block, mask_id),
                "chance": 1 / tok.get_vocab_size()}

    return _finish(module, out_cfg, cfg.init_from, Path(cfg.out_dir), records,
                   {"stage": "wsd_cpt", "config": asdict(cfg)}, accuracy)


def _split_held_out(items: list, source: str, seq_len: int, block: int) -> tuple[list, list]:
    """Keep the examples whose prompt leaves room for a block of response; hold out the last 5% for validation."""
    items = [x for x in items if len(x.prompt) <= seq_len - block]
    if len(items) < 2:
        raise data.DataError(f"{source}: fewer than 2 examples with a prompt shorter than seq_len - block_size")
    cut = max(1, len(items) // 20)
    return items[-cut:], items[:-cut]


def _response_data(items: list, source: str, seq_len: int, batch_size: int, micro_batch_size: int,
                   trainer: TrainerConfig, settings: BlockDiffusionSettings, band: MaskBand) -> RecipeData:
    held_out, train = _split_held_out(items, source, seq_len, settings.block_size)
    collate = ResponseCollate(seq_len, settings.block_size, settings.eos_token_ids[0], settings.mask_token_id, band,
                              trainer.seed)
    return RecipeData(Shuffled(train, trainer.max_steps * batch_size, trainer.seed), Cycled(held_out, batch_size),
                      collate, collate, seq_len, micro_batch_size, batch_size)


def _block_diffusion_config(init_from: str, seq_len: int, trainer: TrainerConfig
                            ) -> tuple[dict, BlockDiffusionSettings]:
    """The HF config of a block-diffusion checkpoint and its settings, checked against the sequence length and the
    context-parallel split (response rows are whole blocks, so BDLM rows are multiples of 2 x block_size)."""
    hf_cfg = read_config(init_from)
    settings = BlockDiffusionSettings.from_config(hf_cfg)
    _check_seq_len(seq_len, settings.block_size)
    trainer.check_rows_split(2 * settings.block_size, "2 x the model's block_size (the unit of BDLM response rows)")
    return hf_cfg, settings


def sft(cfg: SFTConfig) -> Path:
    """Prompt-conditioned block-diffusion SFT (Eq. 5) with a mask-ratio band and complementary masking; CAP (Eq. 6)
    when `confidence_weight` > 0."""
    if cfg.confidence_weight < 0:
        raise ValueError(f"confidence_weight must be >= 0, got {cfg.confidence_weight}")
    hf_cfg, settings = _block_diffusion_config(cfg.init_from, cfg.seq_len, cfg.trainer)
    micro = cfg.trainer.micro_batch(cfg.batch_size)
    tok = load_tokenizer(cfg.init_from)
    datamodule = _response_data(data.sft_examples(cfg.data, tok), cfg.data, cfg.seq_len, cfg.batch_size, micro,
                                cfg.trainer, settings, MaskBand(*cfg.mask_band))
    module = BlockDiffusionModule(cfg.init_from, SFTObjective(cfg.confidence_weight, cfg.complementary),
                                  _optimizer(cfg.trainer), flex_attention=cfg.trainer.attention == "flex")
    records = fit(cfg.trainer, module, datamodule, Path(cfg.out_dir), _hf_exporter(hf_cfg, cfg.init_from))
    stage = "cap" if cfg.confidence_weight > 0 else "sft"
    return _finish(module, hf_cfg, cfg.init_from, Path(cfg.out_dir), records, {"stage": stage, "config": asdict(cfg)})


def dpo(cfg: DPOConfig) -> Path:
    """DPO on the ELBO (Eq. 7-8) against a frozen reference (by default the starting, post-SFT model)."""
    if cfg.trainer.pipeline_parallel > 1:
        raise ValueError(f"dpo: trainer.pipeline_parallel must be 1, got {cfg.trainer.pipeline_parallel} (the frozen "
                         "reference model is not pipelined)")
    hf_cfg, settings = _block_diffusion_config(cfg.init_from, cfg.seq_len, cfg.trainer)
    micro = cfg.trainer.micro_batch(cfg.batch_size)
    lr = cfg.lr
    if lr is None:
        state = Path(cfg.init_from) / "training_state.json"
        if not state.exists():
            raise ValueError(f"dpo.lr is not set and {state} (the SFT run's final learning rate) does not exist")
        lr = json.loads(state.read_text())["final_lr"]
    trainer = replace(cfg.trainer, lr=lr)
    tok = load_tokenizer(cfg.init_from)
    datamodule = _response_data(data.preference_examples(cfg.data, tok), cfg.data, cfg.seq_len, cfg.batch_size,
                                micro, trainer, settings, MaskBand(*cfg.mask_band))
    module = BlockDiffusionModule(cfg.init_from, DPOObjective(cfg.beta), _optimizer(trainer),
                                  reference_from=cfg.reference_from or cfg.init_from,
                                  flex_attention=trainer.attention == "flex")
    records = fit(trainer, module, datamodule, Path(cfg.out_dir), _hf_exporter(hf_cfg, cfg.init_from))
    return _finish(module, hf_cfg, cfg.init_from, Path(cfg.out_dir), records, {"stage": "dpo", "config": asdict(cfg)})


def merge(cfg: MergeConfig) -> Path:
    """Average the top-k of a run's kept checkpoints by a metric recorded in each one's meta.json (NeMo's "-last"
    copy of the newest checkpoint is not a candidate of its own)."""
    candidates = {}
    for meta_path in sorted(Path(cfg.run_dir).glob("checkpoints/*/meta.json")):
        if meta_path.parent.name.endswith("-last"):
            continue
        meta = json.loads(meta_path.read_text())
        if cfg.metric not in meta:
            raise ValueError(f"{meta_path} has no metric {cfg.metric!r} (has: {', '.join(sorted(meta))})")
        candidates[meta_path.parent / "hf"] = meta[cfg.metric]
    if not candidates:
        raise ValueError(f"{cfg.run_dir} has no checkpoints to merge")
    best = select_top_k(candidates, cfg.top_k, cfg.higher_is_better)
    out = merge_checkpoints(best, Path(cfg.out_dir))
    (out / "merge.json").write_text(json.dumps({"merged": [str(p) for p in best], **asdict(cfg)}, indent=1) + "\n")
    return out


def pipeline(cfg: PipelineConfig) -> Path:
    if cfg.cap.confidence_weight <= 0:
        raise ValueError(f"pipeline.cap.confidence_weight must be > 0, got {cfg.cap.confidence_weight}")
    wsd_cpt(cfg.wsd)
    if dist.get_rank() == 0:
        merge(cfg.merge)
    dist.barrier()
    sft(cfg.sft)
    sft(cfg.cap)
    return dpo(cfg.dpo)
