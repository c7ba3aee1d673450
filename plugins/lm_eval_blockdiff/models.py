"""The two lm-eval models this project adds, each answering generation requests with text that carries its decoding
cost (`Completion`), so a task's `process_results` can put TPF, NFE per token and tokens/s beside its score:

- `blockdiff`: the core's reference decoder (block diffusion at the request's block size and threshold; greedy
  next-token decoding for an AR checkpoint, TPF 1), in this process, no server.
- `blockdiff-completions`: lm-eval's own `local-completions` (the OpenAI-compatible `/v1/completions` client) pointed
  at `blockdiff-vllm-serve` or at SGLang with `--dllm-algorithm BlockDiff`, reading the accounting every response
  carries (vLLM: `kv_transfer_params`, SGLang: `metadata`). Plain `local-completions` gives the same text and scores,
  without the cost.

Loglikelihood requests are refused: a block-diffusion model has no left-to-right likelihood, and its ELBO (the DPO
stage's bound) is a bound, not the probability multiple-choice tasks compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.models.utils import normalize_gen_kwargs
from transformers import AutoTokenizer

from blockdiff.decoding import DecodeParams, ReferenceDecoder, greedy_ar_decode
from blockdiff.models import BlockDiffusionSettings, config_eos_ids, load_model
from blockdiff.serving import ACCOUNTING_KEY

NO_LIKELIHOOD = ("{kind} requests are not supported by block-diffusion models: decoding fills a block in parallel, "
                 "so there is no left-to-right likelihood, and the diffusion ELBO is only a bound on it; evaluate "
                 "with generation tasks (output_type: generate_until)")


@dataclass(frozen=True)
class Cost:
    """What one request cost: output tokens, denoising forwards, all forwards (prefill and commit included) and the
    request's latency in seconds."""

    output_tokens: int
    denoise_forwards: int
    nfe: int
    seconds: float


class Completion(str):
    """Generated text carrying its `Cost`; lm-eval passes it unchanged to a task's `process_results` when the task
    has no filters that rewrite the text."""

    cost: Cost

    def __new__(cls, text: str, cost: Cost) -> Completion:
        self = super().__new__(cls, text)
        self.cost = cost
        return self

    def __reduce__(self):  # lm-eval's request cache pickles responses
        return Completion, (str(self), self.cost)


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first stop string, as every lm-eval model returns it."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@register_model("blockdiff")
class BlockDiffusionLM(LM):
    """`--model blockdiff --model_args pretrained=DIR[,block_size=32,threshold=0.95,fallback_k=1]`: the checkpoint
    in DIR decoded by the core's reference decoder, `batch_size` requests per `generate` (default 1, each request on
    its own, so tokens/s is a single user's speed). Decoding settings default to the checkpoint's. The model runs
    where the core's reference models run, on the CPU: lm-eval's `device` (which its CLI always sends) is ignored."""

    def __init__(self, pretrained: str, block_size: int | None = None, threshold: float | None = None,
                 fallback_k: int | None = None, batch_size: int | str = 1, max_gen_toks: int = 256,
                 device: str | None = None, **unknown: Any) -> None:
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if k not in ("max_batch_size",) and v is not None}
        if unknown:
            raise ValueError(f"blockdiff: unknown model_args {sorted(unknown)}; known: pretrained, block_size, "
                             "threshold, fallback_k, batch_size, max_gen_toks")
        if str(batch_size).startswith("auto"):
            raise ValueError("blockdiff: batch_size=auto is not supported; give a number of requests per generate")
        self.model, cfg = load_model(pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        if "block_diffusion" in cfg:
            settings = BlockDiffusionSettings.from_config(cfg)
            self.decoder = ReferenceDecoder(self.model, settings.mask_token_id, settings.eos_token_ids)
            self.eos = settings.eos_token_ids
            overrides = {"block_size": block_size, "threshold": threshold, "fallback_k": fallback_k}
            self.settings = {"block_size": settings.block_size, "threshold": settings.threshold,
                             "fallback_k": settings.fallback_k, **{k: v for k, v in overrides.items() if v is not None}}
            DecodeParams(max_tokens=1, **self.settings)  # a bad value fails here, before any request
        else:
            if any(v is not None for v in (block_size, threshold, fallback_k)):
                raise ValueError(f"blockdiff: {pretrained} is an AR checkpoint (no block_diffusion section in "
                                 "config.json); block_size, threshold and fallback_k do not apply")
            self.decoder, self.settings = None, {}
            self.eos = config_eos_ids(cfg)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[Completion]:
        out = []
        for start in range(0, len(requests), self.batch_size):
            out += self._generate([r.args for r in requests[start:start + self.batch_size]])
        return out

    def _generate(self, batch: list[tuple[str, dict]]) -> list[Completion]:
        kwargs = [normalize_gen_kwargs(gen, self.max_gen_toks) for _, gen in batch]
        for kw in kwargs:
            extra = set(kw) - {"until", "max_gen_toks", "do_sample", "temperature"}
            if extra:
                raise ValueError(f"blockdiff: unsupported generation_kwargs {sorted(extra)} (block diffusion takes "
                                 "until, max_gen_toks, do_sample, temperature)")
        prompts = [self.tokenizer.encode(context) for context, _ in batch]
        start = time.perf_counter()
        if self.decoder is None:
            if any(kw["temperature"] for kw in kwargs):
                raise ValueError("blockdiff: an AR checkpoint is decoded greedily only (temperature 0)")
            results = [greedy_ar_decode(self.model, [p], kw["max_gen_toks"], self.eos)[0]
                       for p, kw in zip(prompts, kwargs)]
        else:
            params = [DecodeParams(max_tokens=kw["max_gen_toks"], temperature=kw["temperature"], **self.settings)
                      for kw in kwargs]
            results = self.decoder.generate(prompts, params)
        seconds = time.perf_counter() - start
        return [Completion(cut_at_stop(self.tokenizer.decode([t for t in r.tokens if t not in self.eos],
                                                             skip_special_tokens=True), kw["until"]),
                           Cost(len(r.tokens), r.denoise_forwards, r.nfe, seconds))
                for r, kw in zip(results, kwargs)]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False):
        raise NotImplementedError(NO_LIKELIHOOD.format(kind="loglikelihood"))

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False):
        raise NotImplementedError(NO_LIKELIHOOD.format(kind="loglikelihood_rolling"))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")


LATENCY_KEY = "_blockdiff_latency"  # put in a response body by `model_call`, read by `parse_generations`


def response_cost(body: dict) -> Cost | None:
    """The cost of a one-prompt `/v1/completions` response from either server, or None when it carries no
    block-diffusion accounting (another server, or an AR model)."""
    accounting = (body.get("kv_transfer_params") or {}).get(ACCOUNTING_KEY) \
        or (body.get("metadata") or {}).get(ACCOUNTING_KEY)
    if isinstance(accounting, list):  # SGLang: one entry per prompt
        accounting = accounting[0]
    if not accounting:
        return None
    return Cost(body["usage"]["completion_tokens"], accounting["denoise_forwards"], accounting["nfe"],
                body.get(LATENCY_KEY, float("nan")))


@register_model("blockdiff-completions")
class BlockDiffusionCompletions(LocalCompletionsAPI):
    """lm-eval's `local-completions`, keeping each response's block-diffusion accounting: `--model
    blockdiff-completions --model_args base_url=http://HOST:PORT/v1/completions,model=NAME`. One prompt per request
    (batch_size 1), so a response's accounting is one request's. With `num_concurrent` > 1 lm-eval parses responses
    where this class cannot time them: TPF and NFE are kept, tokens/s is not reported (NaN)."""

    def __init__(self, batch_size: int | str = 1, tokenizer_backend: str | None = None, **kwargs: Any) -> None:
        if int(batch_size) != 1:
            raise ValueError(f"blockdiff-completions: batch_size={batch_size}; send one prompt per request and use "
                             "num_concurrent for parallel requests")
        super().__init__(batch_size=1, tokenizer_backend=tokenizer_backend, tokenized_requests=False, **kwargs)

    def model_call(self, messages, *, generate: bool = True, gen_kwargs: dict | None = None, **kwargs):
        start = time.perf_counter()
        body = super().model_call(messages, generate=generate, gen_kwargs=gen_kwargs, **kwargs)
        if body is not None:
            body[LATENCY_KEY] = time.perf_counter() - start
        return body

    def parse_generations(self, outputs: dict | list[dict], **kwargs) -> list[str]:
        texts = LocalCompletionsAPI.parse_generations(outputs, **kwargs)
        cost = response_cost(outputs) if isinstance(outputs, dict) and len(texts) == 1 else None
        return texts if cost is None or texts[0] is None else [Completion(texts[0], cost)]
