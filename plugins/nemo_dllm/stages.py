"""The recipe stages of LLaDA2.0 on Megatron: `wsd_cpt` (AR -> block diffusion), `sft` (and CAP), `dpo`, `merge`.

Each training stage reads a Hugging Face directory and trains it inside NeMo's trainer: NeMo's `llm.pretrain`
(wsd_cpt) or `llm.finetune` (sft, cap, dpo) on a `module.BlockDiffusionModule`, a `datamodule.RecipeData`, NeMo's
trainer with Megatron's strategy, distributed checkpoints kept by validation loss and resume (`nemo_dllm.training`).
It ends with a Hugging Face directory `<out_dir>/hf` that the next stage and the serving plugins load. Every
configuration error is raised before the model is built.
"""

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from nemo import lightning as nl
from nemo.collections import llm
from tokenizers import Tokenizer

from blockdiff.merge import merge_checkpoints, select_top_k
from blockdiff.models import (
    BlockDiffusionSettings,
    config_eos_ids,
    load_model,
    read_config,
    save_weights,
    with_block_diffusion,
)
from blockdiff.noise import MaskBand
from blockdiff.objectives import ReferenceForward, heldout_accuracy
from blockdiff.schedules import WSDSchedule
from blockdiff.text import EOS, MASK, load_tokenizer, special_id
from nemo_dllm import data, megatron_model, parallel, training
from nemo_dllm.datamodule import Cycled, PretrainCollate, RecipeData, ResponseCollate, Shuffled
from nemo_dllm.module import BlockDiffusionModule, DPOObjective, PretrainObjective, SFTObjective, megatron_optimizer
from nemo_dllm.training import AtFitEnd, MetricsLog, TrainerConfig, read_metrics

# what an HF directory's tokenizer is, besides weights and config: the first two always there, the others as a real
# checkpoint has them (transformers 5 saves the chat template on its own)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass
class WSDConfig:
    init_from: str  # HF directory of the AR model
    out_dir: str
    data: str  # JSONL: {"text"} documents
    seq_len: int = 256
    batch_size: int = 8
    # Recipe fields use the annotations NeMo-Run's command-line parser knows: lists, not tuples, and Optional[X],
    # not X | None (`model.recipe.warmup_blocks=[32]` fails to parse otherwise).
    warmup_blocks: list[int] = field(default_factory=lambda: [1, 4, 32, 64])
    decay_blocks: Optional[list[int]] = None  # default: halving from seq_len/2 to final_block
    final_block: int = 32
    warmup_tokens: int = 65536  # per warmup phase
    stable_tokens: int = 131072
    decay_tokens: int = 65536  # per decay phase
    mask_band: list[float] = field(default_factory=lambda: [1e-3, 1.0])  # [low, high]
    embed_noise_std: float = 0.1
    embed_noise_steps: int = 50
    # False trains every packed row as one sequence (attention and positions run across the documents in it): the
    # ablation of the document-level mask. Validation keeps the documents apart either way.
    document_mask: bool = True
    threshold: float = 0.95  # the decoding default written into the output config
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        mask_band(self)

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
    mask_band: list[float] = field(default_factory=lambda: [0.3, 0.8])  # [low, high]
    complementary: bool = True
    confidence_weight: float = 0.0  # > 0 makes this the CAP stage (Eq. 6)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        mask_band(self)


@dataclass
class DPOConfig:
    init_from: str  # HF directory of the SFT model: the policy's start
    out_dir: str
    data: str  # JSONL: {"prompt", "chosen", "rejected"} lines
    reference_from: Optional[str] = None  # the frozen reference; None: init_from (the post-SFT model, as the paper)
    seq_len: int = 256
    batch_size: int = 4
    beta: float = 0.1
    mask_band: list[float] = field(default_factory=lambda: [0.3, 0.8])  # [low, high]
    lr: Optional[float] = None  # None: the learning rate the SFT run ended with
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        mask_band(self)


@dataclass
class MergeConfig:
    run_dir: str  # a stage's out_dir: its kept checkpoints (the best by validation loss) are the candidates
    out_dir: str
    top_k: int = 2
    metric: str = "val_loss"
    higher_is_better: bool = False


def mask_band(recipe: WSDConfig | SFTConfig | DPOConfig) -> MaskBand:
    """The recipe's `mask_band` as the core's MaskBand; a bad one is named when the recipe is built."""
    band = recipe.mask_band
    if len(band) != 2:
        raise ValueError(f"mask_band must be [low, high], got {band}")
    return MaskBand(*band)


def _check_seq_len(seq_len: int, block: int) -> None:
    if seq_len % block:
        raise ValueError(f"seq_len {seq_len} is not divisible by the block size {block}")


def export_hf(model, cfg: dict, tokenizer_dir: str, out: Path, extra: dict | None = None) -> Path:
    """Gather every tensor-parallel shard of every pipeline stage (and every expert-parallel rank's experts) and write
    an HF directory (rank 0), atomically."""
    from megatron.core import parallel_state

    # tensor x pipeline x expert ranks hold every tensor between them (the expert group equals the model-parallel
    # group without expert parallelism; dense tensors gathered twice from data-parallel replicas are the same)
    group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
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
            if name in TOKENIZER_FILES[:2] or (Path(tokenizer_dir) / name).exists():
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


def _finisher(recipe, hf_cfg: dict, stage: str, evaluate: Callable[[Path, RecipeData], dict] | None = None):
    """The end of a stage: export the trained model to `<out_dir>/hf` and write `summary.json` with the parallel
    layout it ran and what `evaluate(hf_dir, data)` measures on the exported model with the stage's data module
    (rank 0, the core's reference model: the same on any parallel layout)."""
    out_dir = Path(recipe.out_dir)

    def finish(module: BlockDiffusionModule) -> None:
        summary = {"stage": stage, "config": asdict(recipe)}
        records = read_metrics(out_dir / "metrics.jsonl")
        hf = export_hf(module.gpt_model(), hf_cfg, recipe.init_from, out_dir / "hf",
                       {"final_lr": records[-1]["lr"] if records else None, **summary})
        layout = parallel.layout()
        if dist.get_rank() == 0:
            summary = {**summary, "parallel": layout,
                       **(evaluate(hf, module.trainer.datamodule) if evaluate else {})}
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        dist.barrier()

    return finish


def _optimizer(trainer: TrainerConfig):
    return megatron_optimizer(trainer.lr, trainer.weight_decay, trainer.grad_clip, trainer.warmup_steps,
                              trainer.max_steps, trainer.min_lr_ratio)


def _run(train: Callable, recipe, model, data, trainer) -> Path:
    """Train one stage through NeMo's `train` (`llm.pretrain` or `llm.finetune`); its HF export."""
    training.run(train, model=model, data=data, trainer=trainer, log=stage_log(recipe), resume=stage_resume(recipe))
    return Path(recipe.out_dir) / "hf"


# Each stage is NeMo's model, data, trainer, log and resume, each built from the stage's recipe by one function below,
# so `nemo llm pretrain|finetune --factory dllm_...` (NeMo-Run builds them from `run.Config`s of these functions, see
# `nemo_dllm.cli`) and the `nemo dllm` stages run the very same objects. Each function checks what it needs before
# anything is built, so a bad recipe fails before training.

def stage_resume(recipe) -> nl.AutoResume:
    return training.resume(Path(recipe.out_dir))


def stage_log(recipe) -> nl.NeMoLogger:
    """NeMo's logger with checkpoints kept by validation loss, each exported to HF with the stage's output config."""
    hf_cfg = _wsd_output_config(recipe) if isinstance(recipe, WSDConfig) else read_config(recipe.init_from)
    return training.logger(Path(recipe.out_dir), recipe.trainer.save_top_k, _hf_exporter(hf_cfg, recipe.init_from))


def _wsd_trainer_config(recipe: WSDConfig) -> TrainerConfig:
    """The recipe's trainer settings with the number of steps its token budgets make (raises on a sequence length
    the block sizes or the context-parallel ranks do not divide, and on a batch the layout does not fit)."""
    schedule = recipe.schedule()
    recipe.trainer.check_rows_split(recipe.seq_len, "seq_len (MDLM rows; BDLM rows are twice as long)")
    recipe.trainer.micro_batch(recipe.batch_size)
    return replace(recipe.trainer, max_steps=schedule.total_steps(recipe.batch_size * recipe.seq_len))


def _mask_token_id(tok: Tokenizer, init_from: str) -> int:
    """The mask token's id in `tok`, the tokenizer of `init_from`; raises naming the command that adds one."""
    mask_id = tok.token_to_id(MASK)
    if mask_id is None:
        raise ValueError(f"wsd_cpt.init_from: the tokenizer of {init_from} has no mask token {MASK!r}; add one with "
                         f"`python -m blockdiff.models.mask_token {init_from} DST` and convert DST")
    return mask_id


def _wsd_output_config(recipe: WSDConfig) -> dict:
    """The AR model's HF config with the block-diffusion settings the converted model is served with. Its EOS ids are
    the AR config's (a chat model's end of turn first: responses end with it) and the document separator the
    pretraining rows are packed with."""
    tok, cfg = load_tokenizer(recipe.init_from), read_config(recipe.init_from)
    eos_ids = tuple(dict.fromkeys([*config_eos_ids(cfg), special_id(tok, EOS)]))
    settings = BlockDiffusionSettings(mask_token_id=_mask_token_id(tok, recipe.init_from),
                                      eos_token_ids=eos_ids, block_size=recipe.final_block,
                                      threshold=recipe.threshold)
    return with_block_diffusion(cfg, settings)


def wsd_model(recipe: WSDConfig) -> BlockDiffusionModule:
    trainer = _wsd_trainer_config(recipe)
    return BlockDiffusionModule(recipe.init_from, PretrainObjective(recipe.embed_noise_std, recipe.embed_noise_steps),
                                _optimizer(trainer), recipe.seq_len, flex_attention=trainer.attention == "flex")


def wsd_data(recipe: WSDConfig) -> RecipeData:
    """Packed rows of the recipe's documents (every 20th held out), WSD's block size by the global step."""
    trainer = _wsd_trainer_config(recipe)
    micro = trainer.micro_batch(recipe.batch_size)
    tok = load_tokenizer(recipe.init_from)
    mask_id = _mask_token_id(tok, recipe.init_from)
    ids, doc_ids, val_ids, val_doc = data.pretraining_rows(recipe.data, tok, recipe.seq_len)
    if not recipe.document_mask:
        doc_ids = torch.zeros_like(doc_ids)
    train_collate = PretrainCollate(recipe.schedule(), recipe.batch_size, recipe.batch_size * recipe.seq_len,
                                    mask_id, mask_band(recipe), trainer.seed)
    val_collate = replace(train_collate, fixed_block=recipe.final_block)
    return RecipeData(Shuffled(list(zip(ids, doc_ids)), trainer.max_steps * recipe.batch_size, trainer.seed),
                      Cycled(list(zip(val_ids, val_doc)), recipe.batch_size), train_collate, val_collate,
                      recipe.seq_len, micro, recipe.batch_size)


def wsd_trainer(recipe: WSDConfig) -> nl.Trainer:
    """NeMo's trainer for the WSD run: metrics with each step's phase and block size; at the end the HF export and
    the held-out masked-token accuracy of the exported model."""
    trainer = _wsd_trainer_config(recipe)
    schedule, tokens_per_step = recipe.schedule(), recipe.batch_size * recipe.seq_len

    def phase_of(step: int) -> dict:
        phase = schedule.phase_at(step, tokens_per_step)
        return {"phase": phase.name, "block_size": phase.block_size}

    def accuracy(hf: Path, data_module: RecipeData) -> dict:
        """On the first 16 held-out rows the run validated on (not read and tokenized again)."""
        rows = data_module.val.items[:16]
        tok = load_tokenizer(recipe.init_from)
        model, _ = load_model(hf)
        return {"masked_token_accuracy": heldout_accuracy(ReferenceForward(model), torch.stack([i for i, _ in rows]),
                                                          torch.stack([d for _, d in rows]), recipe.final_block,
                                                          special_id(tok, MASK)),
                "chance": 1 / tok.get_vocab_size()}

    finish = _finisher(recipe, _wsd_output_config(recipe), "wsd_cpt", accuracy)
    return training.trainer(trainer, recipe.batch_size, [MetricsLog(Path(recipe.out_dir), phase_of),
                                                         AtFitEnd(finish)])


def wsd_cpt(cfg: WSDConfig) -> Path:
    """Warmup-Stable-Decay conversion of an AR checkpoint into a block-diffusion model (NeMo's `llm.pretrain`)."""
    data_module = wsd_data(cfg)  # first: it checks the layout before reading the data
    return _run(llm.pretrain, cfg, wsd_model(cfg), data_module, wsd_trainer(cfg))


def _split_held_out(items: list, source: str, seq_len: int, block: int) -> tuple[list, list]:
    """Keep the examples whose prompt leaves room for a block of response; hold out the last 5% for validation."""
    items = [x for x in items if len(x.prompt) <= seq_len - block]
    if len(items) < 2:
        raise data.DataError(f"{source}: fewer than 2 examples with a prompt shorter than seq_len - block_size")
    cut = max(1, len(items) // 20)
    return items[-cut:], items[:-cut]


def _block_diffusion_config(init_from: str, seq_len: int, trainer: TrainerConfig
                            ) -> tuple[dict, BlockDiffusionSettings]:
    """The HF config of a block-diffusion checkpoint and its settings, checked against the sequence length and the
    context-parallel split (response rows are whole blocks, so BDLM rows are multiples of 2 x block_size)."""
    hf_cfg = read_config(init_from)
    settings = BlockDiffusionSettings.from_config(hf_cfg)
    _check_seq_len(seq_len, settings.block_size)
    trainer.check_rows_split(2 * settings.block_size, "2 x the model's block_size (the unit of BDLM response rows)")
    return hf_cfg, settings


def _response_trainer_config(recipe) -> TrainerConfig:
    """The trainer settings of an SFT, CAP or DPO recipe, checked; DPO's learning rate defaults to the one the SFT run
    ended with."""
    if isinstance(recipe, SFTConfig) and recipe.confidence_weight < 0:
        raise ValueError(f"confidence_weight must be >= 0, got {recipe.confidence_weight}")
    if isinstance(recipe, DPOConfig) and recipe.trainer.pipeline_parallel > 1:
        raise ValueError(f"dpo: trainer.pipeline_parallel must be 1, got {recipe.trainer.pipeline_parallel} (the "
                         "frozen reference model is not pipelined)")
    _block_diffusion_config(recipe.init_from, recipe.seq_len, recipe.trainer)
    recipe.trainer.micro_batch(recipe.batch_size)
    if isinstance(recipe, SFTConfig):
        return recipe.trainer
    if recipe.lr is not None:
        return replace(recipe.trainer, lr=recipe.lr)
    state = Path(recipe.init_from) / "training_state.json"
    if not state.exists():
        raise ValueError(f"dpo.lr is not set and {state} (the SFT run's final learning rate) does not exist")
    return replace(recipe.trainer, lr=json.loads(state.read_text())["final_lr"])


def response_model(recipe: SFTConfig | DPOConfig) -> BlockDiffusionModule:
    """SFT (CAP when `confidence_weight` > 0) or DPO, by the recipe's type."""
    trainer = _response_trainer_config(recipe)
    flex = trainer.attention == "flex"
    if isinstance(recipe, DPOConfig):
        return BlockDiffusionModule(recipe.init_from, DPOObjective(recipe.beta), _optimizer(trainer), recipe.seq_len,
                                    reference_from=recipe.reference_from or recipe.init_from, flex_attention=flex)
    return BlockDiffusionModule(recipe.init_from, SFTObjective(recipe.confidence_weight, recipe.complementary),
                                _optimizer(trainer), recipe.seq_len, flex_attention=flex)


def response_data(recipe: SFTConfig | DPOConfig) -> RecipeData:
    """(prompt, response) pairs for SFT/CAP, (prompt, chosen, rejected) for DPO; the last 5% held out."""
    trainer = _response_trainer_config(recipe)
    _, settings = _block_diffusion_config(recipe.init_from, recipe.seq_len, trainer)
    read = data.preference_examples if isinstance(recipe, DPOConfig) else data.sft_examples
    held_out, train = _split_held_out(read(recipe.data, recipe.init_from), recipe.data, recipe.seq_len,
                                      settings.block_size)
    collate = ResponseCollate(recipe.seq_len, settings.block_size, settings.eos_token_ids[0], settings.mask_token_id,
                              mask_band(recipe), trainer.seed)
    return RecipeData(Shuffled(train, trainer.max_steps * recipe.batch_size, trainer.seed),
                      Cycled(held_out, recipe.batch_size), collate, collate, recipe.seq_len,
                      trainer.micro_batch(recipe.batch_size), recipe.batch_size)


def response_trainer(recipe: SFTConfig | DPOConfig) -> nl.Trainer:
    trainer = _response_trainer_config(recipe)
    stage = "dpo" if isinstance(recipe, DPOConfig) else "cap" if recipe.confidence_weight > 0 else "sft"
    finish = _finisher(recipe, read_config(recipe.init_from), stage)
    return training.trainer(trainer, recipe.batch_size, [MetricsLog(Path(recipe.out_dir)), AtFitEnd(finish)])


def sft(cfg: SFTConfig) -> Path:
    """Prompt-conditioned block-diffusion SFT (Eq. 5) with a mask-ratio band and complementary masking; CAP (Eq. 6)
    when `confidence_weight` > 0 (NeMo's `llm.finetune`)."""
    data_module = response_data(cfg)
    return _run(llm.finetune, cfg, response_model(cfg), data_module, response_trainer(cfg))


def dpo(cfg: DPOConfig) -> Path:
    """DPO on the ELBO (Eq. 7-8) against a frozen reference (by default the starting, post-SFT model), through NeMo's
    `llm.finetune`."""
    data_module = response_data(cfg)
    return _run(llm.finetune, cfg, response_model(cfg), data_module, response_trainer(cfg))


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
