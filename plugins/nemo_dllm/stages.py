"""The recipe stages of LLaDA2.0 on Megatron: `wsd_cpt` (AR -> block diffusion), `sft` (and CAP), `dpo`, `merge`.

Each stage reads a Hugging Face directory, trains a megatron-core GPTModel (tensor parallel on gloo or nccl), writes
resumable checkpoints, and ends with a Hugging Face directory `<out_dir>/hf` that the next stage and the serving
plugins load. Every configuration error is raised before the model is built.
"""

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from blockdiff.batches import DiffusionBatch, make_diffusion_batch
from blockdiff.merge import merge_checkpoints, select_top_k
from blockdiff.models import BlockDiffusionSettings, read_config, save_weights, with_block_diffusion
from blockdiff.noise import MaskBand
from blockdiff.objectives import EmbeddingNoise, dpo_objective, heldout_accuracy, pretrain_loss, sft_objective
from blockdiff.schedules import WSDSchedule
from blockdiff.text import EOS, MASK, load_tokenizer, special_id
from nemo_dllm import data, megatron_model, parallel
from nemo_dllm.data import Example
from nemo_dllm.trainer import TrainerConfig, train

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
    init_from: str  # HF directory of the SFT model: the policy's start and the frozen reference
    out_dir: str
    data: str  # JSONL: {"prompt", "chosen", "rejected"} lines
    seq_len: int = 256
    batch_size: int = 4
    beta: float = 0.1
    mask_band: tuple[float, float] = (0.3, 0.8)
    lr: float | None = None  # None: the learning rate the SFT run ended with
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class MergeConfig:
    run_dir: str  # a stage's out_dir: its checkpoints/step-*/hf are the candidates
    out_dir: str
    top_k: int = 2
    metric: str = "val_loss"
    higher_is_better: bool = False


@dataclass
class PipelineConfig:
    """Every stage of the recipe; `sft` and `cap` both start from the converted model with equal budgets, so their
    decoding speed compares CAP against SFT alone; `dpo` continues from `cap`; `merge` averages the DPO run's best."""

    wsd: WSDConfig
    sft: SFTConfig
    cap: SFTConfig
    dpo: DPOConfig
    merge: MergeConfig


def _check_seq_len(seq_len: int, block: int) -> None:
    if seq_len % block:
        raise ValueError(f"seq_len {seq_len} is not divisible by the block size {block}")


def _load(hf_dir: str, tp: int):
    cfg = read_config(hf_dir)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update(load_file(f))
    tp_rank, _ = parallel.tp_rank_and_size()
    model = megatron_model.build_gpt_model(cfg, tp_size=tp)
    megatron_model.load_hf_weights(model, weights, cfg, tp_rank, tp)
    return model.to(parallel.device()), cfg


def export_hf(model, cfg: dict, tokenizer_dir: str, out: Path, extra: dict | None = None) -> Path:
    """Gather every tensor-parallel shard and write an HF directory (rank 0), atomically."""
    from megatron.core import parallel_state

    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    dist.all_gather_object(shards, megatron_model.megatron_state(model),
                           group=parallel_state.get_tensor_model_parallel_group())
    if dist.get_rank() == 0:
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


def _checkpoint_export(model, cfg: dict, tokenizer_dir: str, validation_loss):
    """Each checkpoint also gets an HF directory and its validation loss: what the top-k merge chooses and averages."""

    def on_save(folder: Path) -> dict:
        export_hf(model, cfg, tokenizer_dir, folder / "hf")
        model.eval()
        with torch.no_grad():
            return {"val_loss": validation_loss()}

    return on_save


def _finish(model, cfg: dict, tokenizer_dir: str, out_dir: Path, records: list[dict], summary: dict) -> Path:
    hf = export_hf(model, cfg, tokenizer_dir, out_dir / "hf", {"final_lr": records[-1]["lr"], **summary})
    if dist.get_rank() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return hf


def wsd_cpt(cfg: WSDConfig) -> Path:
    """Warmup-Stable-Decay conversion of an AR checkpoint into a block-diffusion model."""
    schedule = cfg.schedule()  # raises on a sequence length the block sizes do not divide
    band = MaskBand(*cfg.mask_band)
    tok = load_tokenizer(cfg.init_from)
    mask_id, eos = special_id(tok, MASK), special_id(tok, EOS)
    ids, doc_ids, val_ids, val_doc = data.pretraining_rows(cfg.data, tok, cfg.seq_len)
    tp = cfg.trainer.tensor_parallel
    parallel.init(tp, cfg.trainer.seed)
    model, hf_cfg = _load(cfg.init_from, tp)
    forward = megatron_model.DiffusionForward(model)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    trainer = replace(cfg.trainer, max_steps=schedule.total_steps(tokens_per_step))

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        phase = schedule.phase_at(step, tokens_per_step)
        rows = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=g)
        batch = make_diffusion_batch(ids[rows], doc_ids[rows], phase.block_size, phase.objective, mask_id, band, g)
        return pretrain_loss(forward, parallel.broadcast_noise(batch),
                             EmbeddingNoise(cfg.embed_noise_std, step, cfg.embed_noise_steps, g))

    def phase_of(step: int) -> dict:
        phase = schedule.phase_at(step, tokens_per_step)
        return {"phase": phase.name, "block_size": phase.block_size}

    settings = BlockDiffusionSettings(mask_token_id=mask_id, eos_token_ids=(eos,), block_size=cfg.final_block,
                                      threshold=cfg.threshold)
    out_cfg = with_block_diffusion(hf_cfg, settings)

    def validation_loss() -> float:
        batch = make_diffusion_batch(val_ids[:16], val_doc[:16], cfg.final_block, "bdlm", mask_id, band,
                                     torch.Generator().manual_seed(0))
        return pretrain_loss(forward, batch.to(parallel.device())).item()

    records = train(trainer, model, loss_at, Path(cfg.out_dir), "wsd_cpt", phase_of,
                    _checkpoint_export(model, out_cfg, cfg.init_from, validation_loss))
    accuracy = heldout_accuracy(forward, val_ids[:16], val_doc[:16], cfg.final_block, mask_id,
                                device=parallel.device())
    return _finish(model, out_cfg, cfg.init_from, Path(cfg.out_dir), records,
                   {"stage": "wsd_cpt", "masked_token_accuracy": accuracy, "chance": 1 / tok.get_vocab_size(),
                    "config": asdict(cfg)})


def _sft_like_setup(init_from: str, seq_len: int):
    settings = BlockDiffusionSettings.from_config(read_config(init_from))
    _check_seq_len(seq_len, settings.block_size)
    return settings, load_tokenizer(init_from)


def _split_held_out(items: list, source: str, seq_len: int, block: int) -> tuple[list, list]:
    """Keep the examples whose prompt leaves room for a block of response; hold out the last 5% for validation."""
    items = [x for x in items if len(x.prompt) <= seq_len - block]
    if len(items) < 2:
        raise data.DataError(f"{source}: fewer than 2 examples with a prompt shorter than seq_len - block_size")
    cut = max(1, len(items) // 20)
    return items[-cut:], items[:-cut]


def _noised_responses(pairs: list[tuple[list[int], list[int]]], seq_len: int, settings: BlockDiffusionSettings,
                      band: MaskBand, g: torch.Generator) -> DiffusionBatch:
    """A prompt-conditioned block-diffusion batch: only response tokens are masked; noise from TP rank 0."""
    ids, response, doc_ids = data.response_batch(pairs, seq_len, settings.block_size, settings.eos_token_ids[0])
    return parallel.broadcast_noise(make_diffusion_batch(ids, doc_ids, settings.block_size, "bdlm",
                                                         settings.mask_token_id, band, g, maskable=response))


def sft(cfg: SFTConfig) -> Path:
    """Prompt-conditioned block-diffusion SFT (Eq. 5) with a mask-ratio band and complementary masking; CAP (Eq. 6)
    when `confidence_weight` > 0."""
    settings, tok = _sft_like_setup(cfg.init_from, cfg.seq_len)
    band = MaskBand(*cfg.mask_band)
    if cfg.confidence_weight < 0:
        raise ValueError(f"confidence_weight must be >= 0, got {cfg.confidence_weight}")
    held_out, examples = _split_held_out(data.sft_examples(cfg.data, tok), cfg.data, cfg.seq_len,
                                         settings.block_size)
    tp = cfg.trainer.tensor_parallel
    parallel.init(tp, cfg.trainer.seed)
    model, hf_cfg = _load(cfg.init_from, tp)
    forward = megatron_model.DiffusionForward(model)

    def noised(chosen: list[Example], g: torch.Generator) -> DiffusionBatch:
        return _noised_responses([(e.prompt, e.response) for e in chosen], cfg.seq_len, settings, band, g)

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        batch = noised([examples[i] for i in torch.randint(0, len(examples), (cfg.batch_size,), generator=g)], g)
        loss = sft_objective(forward, batch, cfg.confidence_weight)
        if cfg.complementary:
            loss = 0.5 * (loss + sft_objective(forward, batch.complement(), cfg.confidence_weight))
        return loss

    def validation_loss() -> float:
        batch = noised(held_out[: cfg.batch_size], torch.Generator().manual_seed(0))
        return sft_objective(forward, batch).item()

    stage = "cap" if cfg.confidence_weight > 0 else "sft"
    records = train(cfg.trainer, model, loss_at, Path(cfg.out_dir), stage,
                    on_save=_checkpoint_export(model, hf_cfg, cfg.init_from, validation_loss))
    return _finish(model, hf_cfg, cfg.init_from, Path(cfg.out_dir), records, {"stage": stage, "config": asdict(cfg)})


def dpo(cfg: DPOConfig) -> Path:
    """DPO on the ELBO (Eq. 7-8) against a frozen copy of the starting model."""
    settings, tok = _sft_like_setup(cfg.init_from, cfg.seq_len)
    band = MaskBand(*cfg.mask_band)
    lr = cfg.lr
    if lr is None:
        state = Path(cfg.init_from) / "training_state.json"
        if not state.exists():
            raise ValueError(f"dpo.lr is not set and {state} (the SFT run's final learning rate) does not exist")
        lr = json.loads(state.read_text())["final_lr"]
    trainer = replace(cfg.trainer, lr=lr)
    held_out, prefs = _split_held_out(data.preference_examples(cfg.data, tok), cfg.data, cfg.seq_len,
                                      settings.block_size)
    tp = cfg.trainer.tensor_parallel
    parallel.init(tp, cfg.trainer.seed)
    policy, hf_cfg = _load(cfg.init_from, tp)
    reference, _ = _load(cfg.init_from, tp)
    reference.eval().requires_grad_(False)

    def pair_loss(picks: list[data.Preference], g: torch.Generator) -> torch.Tensor:
        chosen = _noised_responses([(p.prompt, p.chosen) for p in picks], cfg.seq_len, settings, band, g)
        rejected = _noised_responses([(p.prompt, p.rejected) for p in picks], cfg.seq_len, settings, band, g)
        return dpo_objective(megatron_model.DiffusionForward(policy), megatron_model.DiffusionForward(reference),
                             chosen, rejected, cfg.beta)

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        return pair_loss([prefs[i] for i in torch.randint(0, len(prefs), (cfg.batch_size,), generator=g)], g)

    def validation_loss() -> float:
        return pair_loss(held_out[: cfg.batch_size], torch.Generator().manual_seed(0)).item()

    records = train(trainer, policy, loss_at, Path(cfg.out_dir), "dpo",
                    on_save=_checkpoint_export(policy, hf_cfg, cfg.init_from, validation_loss))
    return _finish(policy, hf_cfg, cfg.init_from, Path(cfg.out_dir), records, {"stage": "dpo", "config": asdict(cfg)})


def merge(cfg: MergeConfig) -> Path:
    """Average the top-k checkpoints of a run by a metric recorded in each checkpoint's meta.json."""
    candidates = {}
    for meta_path in sorted(Path(cfg.run_dir).glob("checkpoints/step-*/meta.json")):
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
    sft(cfg.sft)
    sft(cfg.cap)
    dpo(cfg.dpo)
    return merge(cfg.merge) if dist.get_rank() == 0 else Path(cfg.merge.out_dir)
