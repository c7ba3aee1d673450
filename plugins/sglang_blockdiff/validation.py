"""Requests a block-diffusion model cannot honour, refused in two places: at the door (`check_body`, on the HTTP
server's request guard, before SGLang parses the body) and where SGLang validates dLLM requests (the algorithm's
`validate_request`, in the scheduler, whose message SGLang returns with a 400), before they reach a batch."""

from __future__ import annotations

from sglang.srt.sampling.sampling_params import TOP_K_ALL

from blockdiff.decoding import check_overrides, request_params
from blockdiff.http_guard import json_type
from blockdiff.serving import BlockDiffusionSettings

WHY = "block diffusion commits tokens by confidence within a block"
SGLANG_PRIVATE_KEYS = "__sglang"  # prefix of the keys SGLang itself puts in custom_params (reasoning transport)

# sampling parameter -> (value that means "off", why it cannot be honoured)
UNSUPPORTED = {
    "top_p": (1.0, WHY), "top_k": (TOP_K_ALL, WHY), "min_p": (0.0, WHY), "frequency_penalty": (0.0, WHY),
    "presence_penalty": (0.0, WHY), "repetition_penalty": (1.0, WHY), "min_new_tokens": (0, WHY),
    "ignore_eos": (False, "the checkpoint's EOS ends the output by definition"), "json_schema": (None, WHY),
    "regex": (None, WHY), "ebnf": (None, WHY), "structural_tag": (None, WHY), "logit_bias": (None, WHY),
    "beam_width": (None, WHY), "n": (1, "send separate requests"),
}


def settings_of(dllm_config) -> BlockDiffusionSettings:
    settings = getattr(dllm_config, "blockdiff_settings", None)
    if settings is None:
        raise ValueError("--dllm-algorithm BlockDiff needs a block-diffusion checkpoint (a `block_diffusion` section "
                         "in config.json, or LLaDA2MoeModelLM)")
    return settings


def temperature(sampling_params) -> float:
    """SGLang encodes temperature 0 as temperature 1 with top_k 1 (its normalisation); that is greedy here too."""
    return 0.0 if sampling_params.top_k == 1 else sampling_params.temperature


def user_overrides(custom: object) -> object:
    """A request's `custom_params` as the user sent them: without the keys SGLang adds for itself."""
    if isinstance(custom, dict):
        return {k: v for k, v in custom.items() if not str(k).startswith(SGLANG_PRIVATE_KEYS)}
    return custom


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
    if "" in (sp.stop_strs or ()):
        return "stop: an empty stop string would end every output before its first token"
    try:  # max_new_tokens None: SGLang fills in the rest of the context after validation
        request_params(settings, max_tokens=sp.max_new_tokens or 1, temperature=temperature(sp),
                       seed=sp.sampling_seed or 0, overrides=user_overrides(sp.custom_params))
    except ValueError as e:
        return f"custom_params: {e}"
    sp.stop_token_ids = set(sp.stop_token_ids or ()) | set(settings.eos_token_ids)
    return None


PROMPT_FIELDS = ("text", "input_ids", "input_embeds")


def check_body(path: str, body: dict) -> tuple[str, str] | None:
    """The HTTP server's door (see `blockdiff.http_guard`): the shapes of /generate's fields that SGLang's own
    parsing fails on with a 500 or passes to its scheduler unchecked. (field, message), or None."""
    if path != "/generate":
        return None
    sampling = body.get("sampling_params")
    prompt = next((body[f] for f in PROMPT_FIELDS if body.get(f) is not None), None)
    batch = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else None
    if isinstance(sampling, list):
        if batch != len(sampling):
            prompts = "one prompt" if batch is None else f"{batch} prompts"
            return "sampling_params", (f"sampling_params is a list of {len(sampling)}, for {prompts}: a list needs "
                                       "a batch of as many prompts (text or input_ids as a list of prompts)")
        items = sampling
    elif sampling is None or isinstance(sampling, dict):
        items = [sampling or {}]
    else:
        return "sampling_params", f"sampling_params must be an object, got a JSON {json_type(sampling)}"
    for item in items:
        if not isinstance(item, dict):
            return "sampling_params", f"each sampling_params must be an object, got a JSON {json_type(item)}"
        try:
            check_overrides(user_overrides(item.get("custom_params")))
        except ValueError as e:
            return "sampling_params.custom_params", f"sampling_params.custom_params: {e}"
    return None
