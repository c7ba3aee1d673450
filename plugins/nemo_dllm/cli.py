"""The recipes as NeMo-Run entrypoints under this plugin's namespace, `nemo dllm <stage> --factory <recipe>`, and as
factories of NeMo's own `nemo llm pretrain` / `nemo llm finetune` (`--factory dllm_wsd_tiny`, `dllm_sft_tiny`,
`dllm_cap_tiny`). The `moe_tiny` factories run the same stages on LLaDA2.0's MoE architecture.

NeMo-Run discovers them through the `nemo_run.cli` entry point `dllm = nemo_dllm`, exactly as it discovers NeMo's
own `nemo llm ...`. Every stage takes one config dataclass; command-line overrides address its fields
(`config.trainer.max_steps=10`), and `--yaml` loads a recipe from recipes/. NeMo-Run resolves the config types from
their annotations at run time, so the modules it parses (this one, stages.py, training.py) must not use
`from __future__ import annotations`.
"""

import nemo_run as run
from nemo.collections import llm

from nemo_dllm import stages
from nemo_dllm.stages import DPOConfig, MergeConfig, SFTConfig, WSDConfig
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


# Toy-scale recipes for the demo's tiny model and data (runs/demo/ar-base and runs/demo/data/*.jsonl, written by
# `python -m blockdiff_demo base`), with the budgets of the README's main job (`make demo`, about 13 minutes on 2 CPU
# cores with the AR base); paths are overridable. One function per stage, shared by every factory below.
DEMO_DATA = "runs/demo/data"


def tiny_wsd_recipe(init_from: str = "runs/demo/ar-base", out_dir: str = "runs/nemo/wsd_cpt") -> run.Config[WSDConfig]:
    return run.Config(
        WSDConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/pretrain.jsonl", seq_len=256, batch_size=8,
        warmup_tokens=8 * 256 * 16, stable_tokens=8 * 256 * 32, decay_tokens=8 * 256 * 16,
        trainer=run.Config(TrainerConfig, lr=2e-3, warmup_steps=5, val_every=16, save_top_k=3))


def tiny_merge_recipe(run_dir: str = "runs/nemo/wsd_cpt", out_dir: str = "runs/nemo/wsd_merged"
                      ) -> run.Config[MergeConfig]:
    return run.Config(MergeConfig, run_dir=run_dir, out_dir=out_dir, top_k=2)


def tiny_sft_recipe(init_from: str = "runs/nemo/wsd_merged", out_dir: str = "runs/nemo/sft") -> run.Config[SFTConfig]:
    return run.Config(SFTConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/sft.jsonl", batch_size=32,
                      trainer=run.Config(TrainerConfig, max_steps=800, lr=2e-3, warmup_steps=10, val_every=200))


def tiny_cap_recipe(init_from: str = "runs/nemo/sft/hf", out_dir: str = "runs/nemo/cap") -> run.Config[SFTConfig]:
    """SFT continued for 200 steps with the confidence term (lambda 0.5). `benchmarks/cap_effect.py` continues the same
    SFT model for the same steps with other lambdas and without the term, comparing CAP with SFT alone."""
    return run.Config(SFTConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/sft.jsonl", batch_size=32,
                      confidence_weight=0.5,
                      trainer=run.Config(TrainerConfig, max_steps=200, lr=2e-3, warmup_steps=10, val_every=100))


def tiny_dpo_recipe(init_from: str = "runs/nemo/cap/hf", out_dir: str = "runs/nemo/dpo") -> run.Config[DPOConfig]:
    return run.Config(DPOConfig, init_from=init_from, out_dir=out_dir, data=f"{DEMO_DATA}/preferences.jsonl",
                      batch_size=4, trainer=run.Config(TrainerConfig, max_steps=20, warmup_steps=2, val_every=5))


@run.cli.factory(target=wsd_cpt, name="tiny")
def tiny_wsd_cpt(init_from: str = "runs/demo/ar-base", out_dir: str = "runs/nemo/wsd_cpt") -> run.Partial:
    return run.Partial(wsd_cpt, config=tiny_wsd_recipe(init_from, out_dir))


@run.cli.factory(target=merge, name="tiny")
def tiny_merge(run_dir: str = "runs/nemo/wsd_cpt", out_dir: str = "runs/nemo/wsd_merged") -> run.Partial:
    return run.Partial(merge, config=tiny_merge_recipe(run_dir, out_dir))


@run.cli.factory(target=sft, name="tiny")
def tiny_sft(init_from: str = "runs/nemo/wsd_merged", out_dir: str = "runs/nemo/sft") -> run.Partial:
    return run.Partial(sft, config=tiny_sft_recipe(init_from, out_dir))


@run.cli.factory(target=cap, name="tiny")
def tiny_cap(init_from: str = "runs/nemo/sft/hf", out_dir: str = "runs/nemo/cap") -> run.Partial:
    return run.Partial(cap, config=tiny_cap_recipe(init_from, out_dir))


@run.cli.factory(target=dpo, name="tiny")
def tiny_dpo(init_from: str = "runs/nemo/cap/hf", out_dir: str = "runs/nemo/dpo") -> run.Partial:
    return run.Partial(dpo, config=tiny_dpo_recipe(init_from, out_dir))


# The same five recipes on LLaDA2.0's MoE architecture, trained on Megatron's MoE layers: `nemo dllm <stage> --factory
# moe_tiny` from the tiny LLaDA2MoeModelLM base of `python -m blockdiff_demo base --arch llada2_moe` (3 layers, the
# first dense; 8 experts, top-2 in 4 groups) on the same data (`make demo-moe`). Expert parallel is an override:
# `config.trainer.expert_parallel=2` under `torchrun --nproc-per-node 2`.
MOE_BASE, MOE_RUNS = "runs/demo/moe-base", "runs/nemo/moe"


@run.cli.factory(target=wsd_cpt, name="moe_tiny")
def moe_tiny_wsd_cpt(init_from: str = MOE_BASE, out_dir: str = f"{MOE_RUNS}/wsd_cpt") -> run.Partial:
    return run.Partial(wsd_cpt, config=tiny_wsd_recipe(init_from, out_dir))


@run.cli.factory(target=merge, name="moe_tiny")
def moe_tiny_merge(run_dir: str = f"{MOE_RUNS}/wsd_cpt", out_dir: str = f"{MOE_RUNS}/wsd_merged") -> run.Partial:
    return run.Partial(merge, config=tiny_merge_recipe(run_dir, out_dir))


@run.cli.factory(target=sft, name="moe_tiny")
def moe_tiny_sft(init_from: str = f"{MOE_RUNS}/wsd_merged", out_dir: str = f"{MOE_RUNS}/sft") -> run.Partial:
    return run.Partial(sft, config=tiny_sft_recipe(init_from, out_dir))


@run.cli.factory(target=cap, name="moe_tiny")
def moe_tiny_cap(init_from: str = f"{MOE_RUNS}/sft/hf", out_dir: str = f"{MOE_RUNS}/cap") -> run.Partial:
    return run.Partial(cap, config=tiny_cap_recipe(init_from, out_dir))


@run.cli.factory(target=dpo, name="moe_tiny")
def moe_tiny_dpo(init_from: str = f"{MOE_RUNS}/cap/hf", out_dir: str = f"{MOE_RUNS}/dpo") -> run.Partial:
    return run.Partial(dpo, config=tiny_dpo_recipe(init_from, out_dir))


# The same recipes in NeMo's own namespace: `nemo llm pretrain --factory dllm_wsd_tiny`, `nemo llm finetune --factory
# dllm_sft_tiny` (or dllm_cap_tiny). NeMo's `llm.pretrain` / `llm.finetune` get the model, data, trainer, log and
# resume that `nemo_dllm.stages` builds from one recipe config, which the five share: an override such as
# `model.recipe.seq_len=128` is seen by all of them. DPO and merge have no NeMo verb and stay `nemo dllm dpo|merge`.

def _nemo_llm(train, model, data, trainer, recipe: run.Config) -> run.Partial:
    return run.Partial(train, model=run.Config(model, recipe=recipe), data=run.Config(data, recipe=recipe),
                       trainer=run.Config(trainer, recipe=recipe), log=run.Config(stages.stage_log, recipe=recipe),
                       resume=run.Config(stages.stage_resume, recipe=recipe))


@run.cli.factory(target=llm.pretrain, name="dllm_wsd_tiny")
def dllm_wsd_tiny(init_from: str = "runs/demo/ar-base", out_dir: str = "runs/nemo/wsd_cpt") -> run.Partial:
    """LLaDA2.0's Warmup-Stable-Decay conversion of the demo's AR model to block diffusion."""
    return _nemo_llm(llm.pretrain, stages.wsd_model, stages.wsd_data, stages.wsd_trainer,
                     tiny_wsd_recipe(init_from, out_dir))


@run.cli.factory(target=llm.finetune, name="dllm_sft_tiny")
def dllm_sft_tiny(init_from: str = "runs/nemo/wsd_merged", out_dir: str = "runs/nemo/sft") -> run.Partial:
    """Block-diffusion SFT with a mask-ratio band and complementary masking."""
    return _nemo_llm(llm.finetune, stages.response_model, stages.response_data, stages.response_trainer,
                     tiny_sft_recipe(init_from, out_dir))


@run.cli.factory(target=llm.finetune, name="dllm_cap_tiny")
def dllm_cap_tiny(init_from: str = "runs/nemo/sft/hf", out_dir: str = "runs/nemo/cap") -> run.Partial:
    """Confidence-aware SFT (CAP, lambda 0.5), continuing dllm_sft_tiny's model."""
    return _nemo_llm(llm.finetune, stages.response_model, stages.response_data, stages.response_trainer,
                     tiny_cap_recipe(init_from, out_dir))
