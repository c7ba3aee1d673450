"""Reference model implementations with Hugging Face weight names (`qwen3`, `llada2_moe`), and loading/saving of
HF directories (`checkpoints`). This package face only hands their names on."""

from blockdiff.models.checkpoints import (
    ARCHITECTURES,
    build_model,
    config_eos_ids,
    init_weights,
    load_model,
    read_config,
    save_model,
    save_weights,
    tiny_dense_config,
    with_block_diffusion,
)
from blockdiff.models.llada2_moe import LLaDA2MoeConfig, LLaDA2MoeDecoder, tiny_llada2_config
from blockdiff.models.qwen3 import DenseConfig, DenseDecoder
from blockdiff.serving import BlockDiffusionSettings

__all__ = ["ARCHITECTURES", "BlockDiffusionSettings", "DenseConfig", "DenseDecoder", "LLaDA2MoeConfig",
           "LLaDA2MoeDecoder", "build_model", "config_eos_ids", "init_weights", "load_model", "read_config",
           "save_model", "save_weights", "tiny_dense_config", "tiny_llada2_config", "with_block_diffusion"]
