"""vLLM plugin serving block-diffusion models (issue #3), loaded through the `vllm.general_plugins` entry point.

Loading it registers the architectures and the `llada2_moe` config type, puts a block-causal aware CPU attention
backend in place and adds request validation for block-diffusion models (both behave exactly like vLLM's own for
every other model). Decoding itself is switched on by running
with this plugin's scheduler and worker: `blockdiff-vllm-serve` (server) or `vllm_blockdiff.engine_kwargs()` (offline).
"""

from vllm_blockdiff.engine import engine_kwargs


def register() -> None:
    """Entry point of `vllm.general_plugins`; vLLM runs it in every process it starts."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from blockdiff.models.hf_config import LLaDA2MoeHFConfig
    from vllm_blockdiff import validation

    AutoConfig.register(LLaDA2MoeHFConfig.model_type, LLaDA2MoeHFConfig, exist_ok=True)
    for arch in ("Qwen3BlockDiffusionForCausalLM", "LlamaBlockDiffusionForCausalLM", "LLaDA2MoeModelLM"):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"vllm_blockdiff.models:{arch}")
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_blockdiff.attention.BlockCausalCPUAttentionBackend")
    else:  # GPU: reviewed, not run here
        register_backend(AttentionBackendEnum.FLASH_ATTN,
                         "vllm_blockdiff.attention.BlockCausalFlashAttentionBackend")
    validation.install()


__all__ = ["engine_kwargs", "register"]
