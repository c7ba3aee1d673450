"""The recipes as NeMo-Run entrypoints under this plugin's namespace: `nemo dllm <stage> --factory <recipe>`.

NeMo-Run discovers them through the `nemo_run.cli` entry point `dllm = nemo_dllm`, exactly as it discovers NeMo's
own `nemo llm ...`. Every stage takes one config dataclass; command-line overrides address its fields
(`config.trainer.max_steps=10`), and `--yaml` loads a recipe from recipes/. NeMo-Run resolves the config types from
their annotations at run time, so the modules it parses (this one, stages.py, training.py) must not use
`from __future__ import annotations`.
"""

import nemo_run as run

from nemo_dllm import stages
from nemo_dllm.stages import DPOConfig, MergeConfig, PipelineConfig, SFTConfig, WSDConfig
from nemo_dllm.training import TrainerConfig


@run.cli.entrypoint(namespace="dllm", skip_confirmation=True,
                    help="Warmup-Stable-Decay conversion of an AR checkpoint to block diffusion (LLaDA2.0 sec. 4)")
def wsd_cpt(config: WSDConfig) -> None:
    stages.wsd_cpt(config)


@run.cli.entrypoint(namespace="dllm", skip_confirmation=True,
                    help="Block-diffusion SFT with a mask-ratio band and complementary masking")
def sft(config: SFTConfig) -> None:
    stages.sft(config)


@run.cli.entrypoint(namespace="dllm", skip_confirmation=True,
                    help="Confidence-aware SFT (CAP): SFT plus lambda * entropy of correct masked predictions")
def cap(config: SFTConfig) -> None:
    if config.confidence_weight <= 0:
        raise ValueError(f"cap needs config.confidence_weight > 0, got {config.confidence_weight}")
    stages.sft(config)


@run.cli.entrypoint(namespace="dllm", skip_confirmation=True,
                    help="DPO on the ELBO against a frozen reference (beta 0.1)")
def dpo(config: DPOConfig) -> None:
    stages.dpo(config)


@run.cli.entrypoint(namespace="dllm", skip_confirmation=True,
                    help="Average the top-k kept checkpoints of a run by validation loss")
def merge(config: MergeConfig) -> None:
    stages.merge(config)


@run.cli.entrypoint(namespace="dllm", skip_confirmation=True,
                    help="The whole recipe in one process: wsd_cpt, merge of its best checkpoints, then sft and cap "
                         "side by side, dpo")
def pipeline(config: PipelineConfig) -> None:
    stages.pipeline(config)


# Toy-scale recipes for the demo's tiny model and data (runs/demo/ar-base and runs/demo/data/*.jsonl, written by
# `python -m blockdiff_demo base`); paths are overridable.
DEMO_DATA = "runs/demo/data"


@run.cli.factory(target=wsd_cpt, name="tiny")
def tiny_wsd_cpt(init_from: str = "runs/demo/ar-base", out_dir: str = "runs/nemo/wsd_cpt") -> run.Partial:
    return run.Partial(wsd_cpt, config=run.Config(
        WSDConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/pretrain.jsonl", seq_len=256, batch_size=8,
        warmup_tokens=8 * 256 * 40, stable_tokens=8 * 256 * 80, decay_tokens=8 * 256 * 40,
        trainer=run.Config(TrainerConfig, lr=2e-3, warmup_steps=5, val_every=40)))


@run.cli.factory(target=sft, name="tiny")
def tiny_sft(init_from: str = "runs/nemo/wsd_merged", out_dir: str = "runs/nemo/sft") -> run.Partial:
    return run.Partial(sft, config=run.Config(
        SFTConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/sft.jsonl", seq_len=256, batch_size=8,
        trainer=run.Config(TrainerConfig, max_steps=150, lr=1e-3, warmup_steps=5, val_every=50)))


@run.cli.factory(target=cap, name="tiny")
def tiny_cap(init_from: str = "runs/nemo/sft/hf", out_dir: str = "runs/nemo/cap") -> run.Partial:
    return run.Partial(cap, config=run.Config(
        SFTConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/sft.jsonl", seq_len=256, batch_size=8,
        confidence_weight=2.0,
        trainer=run.Config(TrainerConfig, max_steps=100, lr=5e-4, warmup_steps=5, val_every=50)))


@run.cli.factory(target=dpo, name="tiny")
def tiny_dpo(init_from: str = "runs/nemo/cap/hf", out_dir: str = "runs/nemo/dpo") -> run.Partial:
    return run.Partial(dpo, config=run.Config(
        DPOConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/preferences.jsonl", seq_len=256,
        batch_size=4,
        trainer=run.Config(TrainerConfig, max_steps=40, warmup_steps=2, val_every=10)))


@run.cli.factory(target=merge, name="tiny")
def tiny_merge(run_dir: str = "runs/nemo/wsd_cpt", out_dir: str = "runs/nemo/wsd_merged") -> run.Partial:
    return run.Partial(merge, config=run.Config(MergeConfig, run_dir=run_dir, out_dir=out_dir, top_k=2))


@run.cli.factory(target=pipeline, name="tiny")
def tiny_pipeline(init_from: str = "runs/demo/ar-base", out_dir: str = "runs/nemo") -> run.Partial:
    """The README's main job: about 8 minutes on 2 CPU cores after the AR base."""
    trainer = dict(lr=1e-3, warmup_steps=3, val_every=15)
    return run.Partial(pipeline, config=run.Config(
        PipelineConfig,
        wsd=run.Config(WSDConfig, init_from=init_from, out_dir=f"{out_dir}/wsd_cpt", data=f"{DEMO_DATA}/pretrain.jsonl",
                       seq_len=256, batch_size=8,
                       warmup_tokens=8 * 256 * 16, stable_tokens=8 * 256 * 32, decay_tokens=8 * 256 * 16,
                       trainer=run.Config(TrainerConfig, lr=2e-3, warmup_steps=5, val_every=16, save_top_k=3)),
        merge=run.Config(MergeConfig, run_dir=f"{out_dir}/wsd_cpt", out_dir=f"{out_dir}/wsd_merged", top_k=2),
        sft=run.Config(SFTConfig, init_from=f"{out_dir}/wsd_merged", out_dir=f"{out_dir}/sft",
                       data=f"{DEMO_DATA}/sft.jsonl", batch_size=8,
                       trainer=run.Config(TrainerConfig, max_steps=30, **trainer)),
        cap=run.Config(SFTConfig, init_from=f"{out_dir}/wsd_merged", out_dir=f"{out_dir}/cap",
                       data=f"{DEMO_DATA}/sft.jsonl", batch_size=8,
                       confidence_weight=2.0, trainer=run.Config(TrainerConfig, max_steps=30, **trainer)),
        dpo=run.Config(DPOConfig, init_from=f"{out_dir}/cap/hf", out_dir=f"{out_dir}/dpo",
                       data=f"{DEMO_DATA}/preferences.jsonl", batch_size=4,
                       trainer=run.Config(TrainerConfig, max_steps=20, warmup_steps=2, val_every=5))))
