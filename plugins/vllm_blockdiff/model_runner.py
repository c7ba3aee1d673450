"""vLLM's CPU model runner, running block-diffusion denoising steps.

Each request scheduled with a canvas (`vllm_blockdiff.scheduler`) gets one denoising step from the forward vLLM runs
anyway: before it, the canvas positions' input ids are set to the block's current state (committed tokens, mask
elsewhere); after it, the block's logits go through the core's `BlockState` (rules 2-6 of DECODING.md, never
re-derived here), and when a block fills, its generated tokens leave as that step's sampled tokens, which vLLM's own
stop checks then cut at EOS or max_tokens exactly as the reference does.

This runs in vLLM's engine process, where an exception ends the whole server: whatever goes wrong with one request's
block leaves as that request's `FAILED` row, and the scheduler ends the request with vLLM's error finish (a 500 for
that request alone).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from blockdiff.decoding import BlockState, request_params
from blockdiff.models.hf_config import block_diffusion_settings

PLACEHOLDER = -1  # vLLM's padding id in sampled-token rows; dropped by its output parsing
FAILED = -2  # a sampled-token row [FAILED]: this request's block failed; the scheduler ends it with an error
RECORD_ENV = "VLLM_BLOCKDIFF_RECORD"  # "1": keep every denoising step's inputs and logits, to verify them

logger = logging.getLogger(__name__)


class BlockDiffusionRunnerMixin:
    """Over vLLM's V1 model runner (CPU subclass here; the GPU one has the same methods and is reviewed only)."""

    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.settings = block_diffusion_settings(vllm_config.model_config.hf_config)
        self.block_states: dict[str, BlockState] = {}
        self.committed_this_step: dict[str, list[int]] = {}
        self.failed: set[str] = set()  # requests whose block failed; their rows say FAILED until vLLM ends them
        self.records: list[dict] | None = [] if os.environ.get(RECORD_ENV) == "1" else None

    def _block_state(self, req_id: str, new_requests: dict) -> BlockState:
        """The request's block state, made on its first canvas; `new_requests` (this step's admissions, which the
        runner has not recorded yet) supply a request first seen in this step."""
        state = self.block_states.get(req_id)
        req = self.requests.get(req_id) or new_requests[req_id]
        if state is None:
            sp = req.sampling_params
            params = request_params(self.settings, max_tokens=sp.max_tokens, temperature=sp.temperature,
                                    seed=sp.seed or 0, overrides=sp.extra_args)
            state = self.block_states[req_id] = BlockState(list(req.prompt_token_ids), params,
                                                           self.settings.mask_token_id, self.settings.eos_token_ids)
        b = self.settings.block_size
        num_tokens = req.num_tokens if req_id in self.requests else len(req.prompt_token_ids)
        if state.block_start != num_tokens // b * b:
            raise RuntimeError(f"request {req_id}: runner block at {state.block_start} but vLLM holds "
                               f"{num_tokens} committed tokens")
        return state

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        for req_id in scheduler_output.finished_req_ids:
            self.block_states.pop(req_id, None)
            self.failed.discard(req_id)
        canvases = {}
        new_requests = {r.req_id: r for r in scheduler_output.scheduled_new_reqs}
        for req_id, scheduled in scheduler_output.scheduled_spec_decode_tokens.items():
            if req_id in self.failed:  # its FAILED row is on the way to the scheduler
                canvases[req_id] = [self.settings.mask_token_id] * len(scheduled)
                continue
            try:
                state = self._block_state(req_id, new_requests)
                canvases[req_id] = state.block[-len(scheduled):].tolist()
            except Exception as e:  # noqa: BLE001 - one request's failure is that request's error
                self._fail(req_id, e)
                canvases[req_id] = [self.settings.mask_token_id] * len(scheduled)
        scheduler_output = replace(scheduler_output, scheduled_spec_decode_tokens=canvases)
        return super().execute_model(scheduler_output, intermediate_tensors)

    def _fail(self, req_id: str, error: Exception) -> None:
        logger.exception("block diffusion failed for request %s", req_id, exc_info=error)
        self.failed.add(req_id)
        self.block_states.pop(req_id, None)

    @torch.inference_mode()
    def sample_tokens(self, grammar_output):
        if self.execute_model_state is not None:
            self.committed_this_step = self._denoise(self.execute_model_state.scheduler_output,
                                                     self.execute_model_state.hidden_states)
        return super().sample_tokens(grammar_output)

    def _denoise(self, scheduler_output, hidden_states: torch.Tensor) -> dict[str, list[int]]:
        """One denoising step for every request that carried a canvas; returns the tokens of blocks that filled.
        The blocks' logits come from one `compute_logits` over all their rows."""
        b = self.settings.block_size
        denoising, rows, offset = [], [], 0
        for index, req_id in enumerate(self.input_batch.req_ids):
            if req_id in scheduler_output.scheduled_spec_decode_tokens and req_id not in self.failed:
                state = self.block_states.get(req_id)
                if state is None:  # cannot happen after execute_model made its canvas; fail it rather than the step
                    self._fail(req_id, RuntimeError(f"request {req_id}: no block state"))
                else:
                    first = offset + state.block_start - int(self.input_batch.num_computed_tokens_cpu[index])
                    denoising.append(req_id)
                    rows.append(torch.arange(first, first + b))
            offset += scheduler_output.num_scheduled_tokens[req_id]
        if not denoising:
            return {}
        rows = torch.cat(rows).to(hidden_states.device)
        logits = self.model.compute_logits(hidden_states[rows]).float().cpu().view(len(denoising), b, -1)
        committed = {}
        for req_id, block_logits in zip(denoising, logits):
            try:
                tokens = self._denoise_request(req_id, block_logits)
            except Exception as e:  # noqa: BLE001 - one request's failure is that request's error
                self._fail(req_id, e)
            else:
                if tokens is not None:
                    committed[req_id] = tokens
        return committed

    def _denoise_request(self, req_id: str, logits: torch.Tensor) -> list[int] | None:
        """One request's denoising step from its block's logits; its new output tokens if the block filled."""
        state = self.block_states[req_id]
        if self.records is not None:
            self.records.append({"context": list(state.committed), "block": state.block.tolist(),
                                 "logits": logits.clone()})
        if not state.step(logits):
            return None
        before = len(state.output)
        if state.finish_block():
            state.next_block()
        return state.output[before:]

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        """The committed blocks as this step's sampled tokens (vLLM's sampler has nothing to sample here)."""
        committed, self.committed_this_step = self.committed_this_step, {}
        width = max([2] + [len(t) for t in committed.values()])  # >= 2: vLLM parses variable-length rows then
        rows = torch.full((self.input_batch.num_reqs, width), PLACEHOLDER, dtype=torch.int32)
        for req_id, tokens in committed.items():
            rows[self.input_batch.req_id_to_index[req_id], : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        for req_id in self.failed:
            if req_id in self.input_batch.req_id_to_index:
                rows[self.input_batch.req_id_to_index[req_id], 0] = FAILED
        return SamplerOutput(sampled_token_ids=rows.to(self.device), logprobs_tensors=None)

    def take_records(self) -> list[dict]:
        records, self.records = self.records or [], [] if self.records is not None else None
        return records


class BlockDiffusionModelRunner(BlockDiffusionRunnerMixin, CPUModelRunner):
    pass


class BlockDiffusionGPUModelRunner(BlockDiffusionRunnerMixin, GPUModelRunner):
    pass
