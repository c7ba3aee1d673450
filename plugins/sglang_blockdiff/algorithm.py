"""This project's decoding semantics (DECODING.md) as an SGLang dLLM algorithm, `--dllm-algorithm BlockDiff`.

SGLang runs one block per request at a time and calls `step` after every forward of it. A step proposes and commits
with the core's rule functions (mask token excluded, fp32, strict threshold, fallback k, per-request seeded sampling);
the forward after the last commit writes the block's final KV, and that is when the block is reported done (SGLang
keeps generated blocks' KV). EOS and max_tokens are SGLang's own finish checks over the emitted block, which cut
exactly where rule 6 does.

This code runs in SGLang's scheduler process, where an exception ends the whole server: whatever goes wrong with one
request's step ends that request with a 500 naming the error, and the batch goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus

import torch
from sglang.srt.dllm.algorithm.base import DllmAlgorithm
from sglang.srt.managers.schedule_batch import FINISH_ABORT

from blockdiff.decoding import DecodeParams, denoise_step, request_params
from blockdiff.serving import BlockDiffusionSettings, accounting
from sglang_blockdiff.validation import settings_of, temperature, user_overrides, validate_request

NAME = "BlockDiff"  # as in --dllm-algorithm

logger = logging.getLogger(__name__)


@dataclass
class RequestDecoding:
    """A request's decoding parameters and accounting, kept on SGLang's `Req` for its whole life."""

    params: DecodeParams
    generator: torch.Generator | None
    denoise_forwards: int = 0
    nfe: int = 0

    def accounting(self, output_tokens: int) -> dict:
        return accounting(output_tokens, self.denoise_forwards, self.nfe)


def request_decoding(req, settings: BlockDiffusionSettings) -> RequestDecoding:
    """The request's `RequestDecoding`, made on first use from its sampling params (`custom_params` overrides)."""
    state = getattr(req, "blockdiff", None)
    if state is None:
        sp = req.sampling_params
        params = request_params(settings, max_tokens=sp.max_new_tokens, temperature=temperature(sp),
                                seed=sp.sampling_seed or 0, overrides=user_overrides(sp.custom_params))
        generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
        state = req.blockdiff = RequestDecoding(params, generator)
    return state


def end_with_error(req, error: Exception) -> None:
    """End one request with a 500 naming `error` at SGLang's next finish check; the server serves on."""
    logger.exception("block diffusion failed for request %s", req.rid, exc_info=error)
    req.to_finish = FINISH_ABORT(f"block-diffusion decoding failed for this request: {type(error).__name__}: "
                                 f"{error}", HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


class BlockDiff(DllmAlgorithm):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings = settings_of(config)

    @classmethod
    def validate_request(cls, req) -> str | None:
        try:
            return validate_request(req)
        except Exception as e:  # noqa: BLE001 - a request must never take the scheduler down
            logger.exception("validating request %s failed", req.rid)
            return f"the request could not be validated for block diffusion: {type(e).__name__}: {e}"

    def step(self, forward_batch, full_logits: torch.Tensor, states: list) -> list[bool]:
        bs = forward_batch.batch_size
        logits = full_logits.view(bs, self.block_size, -1)
        ids = forward_batch.input_ids.view(bs, self.block_size)
        done = []
        for row, req in enumerate(forward_batch.blockdiff_reqs):
            if req.to_finish is not None or req.finished():  # ended (aborted by SGLang, or failed): let it leave
                done.append(True)
                continue
            try:
                done.append(self.step_request(req, row, logits, ids, forward_batch.dllm_prompt_mask))
            except Exception as e:  # noqa: BLE001 - one request's failure is that request's error
                end_with_error(req, e)
                done.append(True)
        return done

    def step_request(self, req, row: int, logits: torch.Tensor, ids: torch.Tensor, prompt_mask) -> bool:
        """One denoising step of one request's block; True when this forward wrote the finished block's KV."""
        state = request_decoding(req, self.settings)
        state.nfe += 1
        masked = ids[row] == self.mask_id
        if prompt_mask is not None:
            masked &= ~prompt_mask[row]
        positions = masked.nonzero().squeeze(-1)
        if len(positions) == 0:  # this forward wrote the full block's KV: it may leave
            return True
        state.denoise_forwards += 1
        denoise_step(ids[row], logits[row], positions, state.params, self.mask_id, state.generator)
        return False


Algorithm = BlockDiff
