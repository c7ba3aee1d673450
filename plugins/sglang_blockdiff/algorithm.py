"""This project's decoding semantics (DECODING.md) as an SGLang dLLM algorithm, `--dllm-algorithm BlockDiff`.

SGLang runs one block per request at a time and calls `step` after every forward of it. A step proposes and commits
with the core's rule functions (mask token excluded, fp32, strict threshold, fallback k, per-request seeded sampling);
the forward after the last commit writes the block's final KV, and that is when the block is reported done (SGLang
keeps generated blocks' KV). EOS and max_tokens are SGLang's own finish checks over the emitted block, which cut
exactly where rule 6 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.dllm.algorithm.base import DllmAlgorithm

from blockdiff.decoding import DecodeParams, propose, request_params, select_commits
from blockdiff.models import BlockDiffusionSettings

ACCOUNTING_KEY = "block_diffusion"


@dataclass
class RequestDecoding:
    """A request's decoding parameters and accounting, kept on SGLang's `Req` for its whole life."""

    params: DecodeParams
    generator: torch.Generator | None
    denoise_forwards: int = 0
    nfe: int = 0

    def accounting(self, output_tokens: int) -> dict:
        return {"denoise_forwards": self.denoise_forwards, "nfe": self.nfe,
                "tpf": output_tokens / self.denoise_forwards if self.denoise_forwards else 0.0}


def settings_of(dllm_config) -> BlockDiffusionSettings:
    settings = getattr(dllm_config, "blockdiff_settings", None)
    if settings is None:
        raise ValueError("--dllm-algorithm BlockDiff needs a block-diffusion checkpoint (a `block_diffusion` section "
                         "in config.json, or LLaDA2MoeModelLM)")
    return settings


def temperature(sampling_params) -> float:
    """SGLang encodes temperature 0 as temperature 1 with top_k 1 (its normalisation); that is greedy here too."""
    return 0.0 if sampling_params.top_k == 1 else sampling_params.temperature


def request_decoding(req, settings: BlockDiffusionSettings) -> RequestDecoding:
    """The request's `RequestDecoding`, made on first use from its sampling params (`custom_params` overrides)."""
    state = getattr(req, "blockdiff", None)
    if state is None:
        sp = req.sampling_params
        params = request_params(settings, max_tokens=sp.max_new_tokens, temperature=temperature(sp),
                                seed=sp.sampling_seed or 0, overrides=sp.custom_params)
        generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
        state = req.blockdiff = RequestDecoding(params, generator)
    return state


class BlockDiff(DllmAlgorithm):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings = settings_of(config)

    @classmethod
    def validate_request(cls, req) -> str | None:
        from sglang_blockdiff.validation import validate_request

        return validate_request(req)

    def step(self, forward_batch, full_logits: torch.Tensor, states: list) -> list[bool]:
        bs = forward_batch.batch_size
        logits = full_logits.view(bs, self.block_size, -1)
        ids = forward_batch.input_ids.view(bs, self.block_size)
        done = []
        for row, req in enumerate(forward_batch.blockdiff_reqs):
            state = request_decoding(req, self.settings)
            state.nfe += 1
            masked = ids[row] == self.mask_id
            if forward_batch.dllm_prompt_mask is not None:
                masked &= ~forward_batch.dllm_prompt_mask[row]
            positions = masked.nonzero().squeeze(-1)
            if len(positions) == 0:  # this forward wrote the full block's KV: it may leave
                done.append(True)
                continue
            state.denoise_forwards += 1
            candidate, confidence = propose(logits[row, positions].float().cpu(), self.mask_id,
                                            state.params.temperature, state.generator)
            chosen = select_commits(confidence, state.params.threshold, state.params.fallback_k)
            ids[row, positions[chosen.to(positions.device)]] = candidate[chosen].to(ids.device, ids.dtype)
            done.append(False)
        return done


Algorithm = BlockDiff
