"""Requests a block-diffusion model cannot honour are refused where vLLM validates every request (its input
processor, in the API server's process and in `LLM`), so the server answers 400 naming the parameter and `LLM`
raises, before anything reaches the engine. Other models pass through untouched."""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from blockdiff.decoding import request_params
from blockdiff.models.hf_config import block_diffusion_settings, is_block_diffusion

WHY = "block diffusion commits tokens by confidence within a block"

# parameter -> (value that means "off", why it cannot be honoured)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (1, "send separate requests"),
    "presence_penalty": (0.0, WHY), "frequency_penalty": (0.0, WHY), "repetition_penalty": (1.0, WHY),
    "top_p": (1.0, WHY), "min_p": (0.0, WHY), "min_tokens": (0, WHY),
    "ignore_eos": (False, "the checkpoint's EOS ends the output by definition"),
    "logprobs": (None, "no per-position distribution is sampled"),
    "prompt_logprobs": (None, "prompt blocks are attended bidirectionally, not scored left to right"),
    "structured_outputs": (None, WHY), "logit_bias": (None, WHY), "allowed_token_ids": (None, WHY),
    "bad_words": (None, WHY),
}


def check_sampling_params(params: SamplingParams, hf_config) -> None:
    for name, (off, why) in UNSUPPORTED.items():
        value = getattr(params, name, off)
        if value not in (off, None) and value != [] and value != {}:
            raise VLLMValidationError(f"{name}={value!r} is not supported for block-diffusion models: {why}",
                                      parameter=name, value=value)
    if params.top_k not in (0, -1, None):
        raise VLLMValidationError(f"top_k={params.top_k!r} is not supported for block-diffusion models: {WHY}",
                                  parameter="top_k", value=params.top_k)
    try:
        request_params(block_diffusion_settings(hf_config), max_tokens=params.max_tokens or 1,
                       temperature=params.temperature, seed=params.seed or 0, overrides=params.extra_args)
    except ValueError as e:
        raise VLLMValidationError(f"vllm_xargs: {e}", parameter="vllm_xargs", value=params.extra_args) from e


def check_prompt(prompt_ids: list[int], hf_config) -> None:
    mask = block_diffusion_settings(hf_config).mask_token_id
    if mask in prompt_ids:
        raise VLLMValidationError(f"the prompt contains the mask token (id {mask}) at position "
                                  f"{prompt_ids.index(mask)}; block diffusion reserves it for undecided positions",
                                  parameter="prompt")


def install() -> None:
    """Wrap the two validators of vLLM's input processor once per process (the plugin's `register`)."""
    if getattr(InputProcessor, "_blockdiff_validation", False):
        return
    validate_params, validate_input = InputProcessor._validate_params, InputProcessor._validate_model_input

    def _validate_params(self, params, *args, **kwargs):
        if isinstance(params, SamplingParams) and is_block_diffusion(self.model_config.hf_config):
            check_sampling_params(params, self.model_config.hf_config)
        return validate_params(self, params, *args, **kwargs)

    def _validate_model_input(self, prompt_input, prompt_type):
        validate_input(self, prompt_input, prompt_type)
        if is_block_diffusion(self.model_config.hf_config) and prompt_input.get("prompt_token_ids"):
            check_prompt(list(prompt_input["prompt_token_ids"]), self.model_config.hf_config)

    InputProcessor._validate_params, InputProcessor._validate_model_input = _validate_params, _validate_model_input
    InputProcessor._blockdiff_validation = True
