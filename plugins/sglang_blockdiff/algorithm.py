"""This project's decoding semantics (DECODING.md) as an SGLang dLLM algorithm, `--dllm-algorithm BlockDiff`.

SGLang runs one block per request at a time and calls `step` after every forward of it. A step proposes and commits
with the core's rule functions (mask token excluded, fp32, strict threshold, fallback k, per-request seeded sampling);
the forward after the last commit writes the block's final KV, and that is when the block is reported done (SGLang
keeps generated blocks' KV). EOS and max_tokens are SGLang's own finish checks over the emitted block, which cut
exactly where rule 6 does. A block that ends its request needs no such forward (as in the reference decoder, the
last block gets none): it is reported done at its last commit, and `hooks.drop_stale_block_kv` gives its KV, written
while it still held masks, back to the pool instead of SGLang's radix cache.

This code runs in SGLang's scheduler process, where an exception ends the whole server: whatever goes wrong with one
request's step ends that request with a 500 naming the error, and the batch goes on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import torch
from sglang.srt.dllm.algorithm.base import DllmAlgorithm
from sglang.srt.managers.schedule_batch import FINISH_ABORT

from blockdiff.decoding import DecodeParams, denoise_step, request_params
from blockdiff.serving import BlockDiffusionSettings, accounting
from sglang_blockdiff.validation import settings_of, temperature, user_overrides, validate_request

NAME = "BlockDiff"  # as in --dllm-algorithm
RECORD_ENV = "SGLANG_BLOCKDIFF_RECORD"  # a directory: every denoising step's inputs and logits, to verify them

logger = logging.getLogger(__name__)


@dataclass
class RequestDecoding:
    """A request's decoding parameters and accounting, kept on SGLang's `Req` for its whole life."""

    params: DecodeParams
    generator: torch.Generator | None
    denoise_forwards: int = 0
    nfe: int = 0
    # where the KV of a block reported done without its final forward starts (SGLang must not keep it)
    stale_kv_from: int | None = None

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
        self.records = Path(os.environ[RECORD_ENV]) if os.environ.get(RECORD_ENV) else None
        self.recorded = 0

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
        state.stale_kv_from = None
        if len(positions) == 0:  # this forward wrote the full block's KV: it may leave
            return True
        state.denoise_forwards += 1
        if self.records is not None:
            self.record(req, ids[row], logits[row])
        denoise_step(ids[row], logits[row], positions, state.params, self.mask_id, state.generator)
        first_generated = len(req.origin_input_ids) + len(req.output_ids)  # the block's, as an absolute position
        if (ids[row][positions] != self.mask_id).all() and \
                ends_request(req, ids[row][first_generated - req.dllm_block_offset:]):
            state.stale_kv_from = first_generated
            return True
        return False

    def record(self, req, block: torch.Tensor, logits: torch.Tensor) -> None:
        """One file per step in the records directory: the tokens before the block, the block as this forward saw it
        and the logits the step proposes from (the scheduler process cannot hand them back any other way)."""
        context = (req.origin_input_ids + req.output_ids)[:req.dllm_block_offset]
        torch.save({"context": list(context), "block": block.tolist(), "logits": logits.float().cpu().clone()},
                   self.records / f"{os.getpid()}-{self.recorded}.pt")
        self.recorded += 1


def ends_request(req, generated: torch.Tensor) -> bool:
    """Whether SGLang's finish check ends `req` on this fully committed block's generated tokens: a stop token (the
    checkpoint's EOS ids are among them, see validation) or max_new_tokens. It may end a request this does not foresee
    (a stop string), never the other way: validation refuses ignore_eos and min_new_tokens."""
    sp = req.sampling_params
    stop_ids = sp.stop_token_ids or ()
    return any(int(t) in stop_ids for t in generated) or \
        (sp.max_new_tokens is not None and len(req.output_ids) + len(generated) >= sp.max_new_tokens)


Algorithm = BlockDiff
