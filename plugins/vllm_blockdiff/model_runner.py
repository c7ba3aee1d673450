"""vLLM's CPU model runner, running block-diffusion denoising steps.

Each request scheduled with a canvas (`vllm_blockdiff.scheduler`) gets one denoising step from the forward vLLM runs
anyway: before it, the canvas positions' input ids are set to the block's current state (committed tokens, mask
elsewhere); after it, the block's logits go through the core's `BlockState` (rules 2-6 of DECODING.md, never
re-derived here), and when a block fills, its generated tokens leave as that step's sampled tokens, which vLLM's own
stop checks then cut at EOS or max_tokens exactly as the reference does.

A step whose every request schedules exactly its block (no prompt chunk, no finished block riding with it) denoises
on inside the step: while no block has filled, the model runs again on the blocks' new state with the step's
positions and attention metadata, which address the same rows and KV slots. Each forward is still one denoising step
per request (counted and reported as such), but vLLM's per-step cost (scheduling, moving the step between processes,
input preparation) is paid once for all of them. The loop stops at the first block that fills, so no forward runs a
request with nothing left to denoise; the price is that a request arriving meanwhile waits until then (at most one
block's denoising). `VLLM_BLOCKDIFF_DENOISE_LOOP=0` returns to one denoising forward per step.

This runs in vLLM's engine process, where an exception ends the whole server: whatever goes wrong with one request's
block leaves as that request's `FAILED` row, and the scheduler ends the request with vLLM's error finish (a 500 for
that request alone).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
from vllm.v1.outputs import ModelRunnerOutput, SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from blockdiff.decoding import BlockState, request_params
from blockdiff.models.hf_config import block_diffusion_settings
from vllm_blockdiff.engine import DENOISE_LOOP_ENV

PLACEHOLDER = -1  # vLLM's padding id in sampled-token rows; dropped by its output parsing
FAILED = -2  # a sampled-token row [FAILED]: this request's block failed; the scheduler ends it with an error
RECORD_ENV = "VLLM_BLOCKDIFF_RECORD"  # "1": keep every denoising step's inputs and logits, to verify them
EXTRA_FORWARDS = "blockdiff_extra_forwards"  # on a step's ModelRunnerOutput: request id -> forwards beyond the first

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
        self.denoise_loop = os.environ.get(DENOISE_LOOP_ENV, "1") != "0"
        self.loop_step = None  # this step's scheduler output when it may denoise on (see _model_forward)
        self.denoised = False  # whether this step's denoising already ran inside _model_forward
        self.extra_forwards: dict[str, int] = {}
        self.forward_in_step = 0  # 0 for a step's first forward, then 1, 2, ... (recorded with each step)

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
        num_scheduled = scheduler_output.num_scheduled_tokens
        only_blocks = canvases.keys() == num_scheduled.keys() and not self.failed & canvases.keys() \
            and all(n == self.settings.block_size for n in num_scheduled.values())
        self.loop_step = scheduler_output if self.denoise_loop and canvases and only_blocks else None
        self.denoised, self.extra_forwards, self.forward_in_step = False, {}, 0
        return super().execute_model(scheduler_output, intermediate_tensors)

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **kwargs):
        """vLLM's forward; in a step of blocks only (`execute_model`), denoising on until a block fills."""
        hidden_states = super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        step, self.loop_step = self.loop_step, None  # once per step (vLLM also calls this for its dummy runs)
        if step is None or input_ids is None:
            return hidden_states
        denoising, rows = self._canvas_rows(step)
        self.committed_this_step, self.denoised = self._denoise_rows(denoising, rows, hidden_states), True
        while denoising and not self.committed_this_step and not self.failed & set(denoising):
            input_ids[rows] = torch.cat([self.block_states[r].block for r in denoising]).to(input_ids)
            hidden_states = super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                                                   **kwargs)
            self.forward_in_step += 1
            self.committed_this_step = self._denoise_rows(denoising, rows, hidden_states)
        if self.forward_in_step:  # every request of the step ran every forward of the loop
            self.extra_forwards = dict.fromkeys(denoising, self.forward_in_step)
        return hidden_states

    def _fail(self, req_id: str, error: Exception) -> None:
        logger.exception("block diffusion failed for request %s", req_id, exc_info=error)
        self.failed.add(req_id)
        self.block_states.pop(req_id, None)

    @torch.inference_mode()
    def sample_tokens(self, grammar_output):
        if self.execute_model_state is not None and not self.denoised:
            state = self.execute_model_state
            self.committed_this_step = self._denoise_rows(*self._canvas_rows(state.scheduler_output),
                                                          state.hidden_states)
        output = super().sample_tokens(grammar_output)
        if self.extra_forwards and isinstance(output, ModelRunnerOutput):  # for the scheduler's accounting
            setattr(output, EXTRA_FORWARDS, self.extra_forwards)
        return output

    def _canvas_rows(self, scheduler_output) -> tuple[list[str], torch.Tensor]:
        """The requests that carried a canvas this step (failed ones left out) and their blocks' rows among the
        step's tokens, B per request in that order."""
        b = self.settings.block_size
        denoising, rows, offset = [], [torch.zeros(0, dtype=torch.long)], 0
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
        return denoising, torch.cat(rows).to(self.device)

    def _denoise_rows(self, denoising: list[str], rows: torch.Tensor, hidden_states: torch.Tensor
                      ) -> dict[str, list[int]]:
        """One denoising step for each of `denoising` from its block's `rows` of `hidden_states`; returns the tokens
        of blocks that filled. The blocks' logits come from one `compute_logits` over all their rows."""
        if not denoising:
            return {}
        b = self.settings.block_size
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
                                 "logits": logits.clone(), "forward_in_step": self.forward_in_step})
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
