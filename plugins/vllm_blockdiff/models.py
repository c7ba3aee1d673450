"""The block-diffusion architectures as vLLM models.

Each is vLLM's own implementation of the AR architecture with the same weights and names: a block-diffusion model
differs from its AR parent only in which keys a query may see, and that is the attention backend's job
(`vllm_blockdiff.attention`), not the model's. `LLaDA2MoeModelLM` is the layout vLLM implements as Bailing MoE V2
(fused QKV, QK RMSNorm, partial RoPE, grouped sigmoid router with expert bias, shared expert, first layers dense).
"""

from vllm.model_executor.models.bailing_moe import BailingMoeV2ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class Qwen3BlockDiffusionForCausalLM(Qwen3ForCausalLM):
    pass


class LlamaBlockDiffusionForCausalLM(LlamaForCausalLM):
    pass


class LLaDA2MoeModelLM(BailingMoeV2ForCausalLM):
    pass
