"""Requests a block-diffusion model cannot honour, refused where SGLang validates dLLM requests (the algorithm's
`validate_request`, whose message SGLang returns with a 400), before they reach a batch."""

from __future__ import annotations

from sglang.srt.sampling.sampling_params import TOP_K_ALL

from blockdiff.decoding import request_params
from sglang_blockdiff.algorithm import settings_of, temperature

WHY = "block diffusion commits tokens by confidence within a block"

# sampling parameter -> (value that means "off", why it cannot be honoured)
UNSUPPORTED = {
    "top_p": (1.0, WHY), "top_k": (TOP_K_ALL, WHY), "min_p": (0.0, WHY), "frequency_penalty": (0.0, WHY),
    "presence_penalty": (0.0, WHY), "repetition_penalty": (1.0, WHY), "min_new_tokens": (0, WHY),
    "ignore_eos": (False, "the checkpoint's EOS ends the output by definition"), "json_schema": (None, WHY),
    "regex": (None, WHY), "ebnf": (None, WHY), "structural_tag": (None, WHY), "logit_bias": (None, WHY),
    "beam_width": (None, WHY), "n": (1, "send separate requests"),
}


def validate_request(req) -> str | None:
    """An error message, or None after making the checkpoint's EOS ids stop the request."""
    settings = settings_of(req.dllm_config)
    sp = req.sampling_params
    for name, (off, why) in UNSUPPORTED.items():
        value = getattr(sp, name, off)
        if value != off and value is not None and not (name == "top_k" and value in (-1, 0, 1)):
            return f"{name}={value!r} is not supported for block-diffusion models: {why}"
    prompt = list(req.origin_input_ids)
    if not prompt:
        return "the prompt is empty: block diffusion needs at least one prompt token (text or input_ids)"
    vocab = getattr(req, "vocab_size", None)
    bad = next((i for i, t in enumerate(prompt) if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        return f"input_ids[{bad}]={prompt[bad]} is out of vocabulary (size {vocab})"
    if sp.max_new_tokens is not None and sp.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {sp.max_new_tokens}"
    if req.return_logprob:
        return "logprobs are not supported for block-diffusion models: no per-position distribution is sampled"
    if settings.mask_token_id in prompt:
        position = prompt.index(settings.mask_token_id)
        return (f"the prompt contains the mask token (id {settings.mask_token_id}) at position {position}; "
                "block diffusion reserves it for undecided positions")
    try:
        request_params(settings, max_tokens=sp.max_new_tokens, temperature=temperature(sp),
                       seed=sp.sampling_seed or 0, overrides=sp.custom_params)
    except ValueError as e:
        return f"custom_params: {e}"
    sp.stop_token_ids = set(sp.stop_token_ids or ()) | set(settings.eos_token_ids)
    return None
