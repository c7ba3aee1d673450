"""Block-diffusion variants of SGLang's dense models.

The weights, names and layers are SGLang's own Qwen3/Llama; a block-diffusion model differs only in attending in both
directions within the tokens being extended (SGLang's `ENCODER_ONLY` attention, which still reads the cached prefix,
as its own LLaDA2 model does) and in returning logits for every position of the block.
"""

from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.models.llama import LlamaForCausalLM
from sglang.srt.models.qwen3 import Qwen3ForCausalLM


def _as_block_diffusion(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.attn.attn_type = AttentionType.ENCODER_ONLY
    model.logits_processor = LogitsProcessor(model.config, return_full_logits=True)


class Qwen3BlockDiffusionForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _as_block_diffusion(self)


class LlamaBlockDiffusionForCausalLM(LlamaForCausalLM):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _as_block_diffusion(self)


EntryClass = [Qwen3BlockDiffusionForCausalLM, LlamaBlockDiffusionForCausalLM]
