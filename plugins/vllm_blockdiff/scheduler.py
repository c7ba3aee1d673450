"""vLLM's scheduler, scheduling block diffusion.

A request's tokens are its prompt plus its committed output; the block being denoised (the "canvas": the prompt's
tail, committed and still-masked positions, up to the next block boundary) rides on vLLM's speculative-token fields,
so the stock scheduler gives it KV slots and schedules it with the request. These changes make that block diffusion:

- every scheduled span ends at a block boundary or at the end of what is known (`_mamba_block_aligned_split`, the
  scheduler's own alignment hook): a prefill chunk never ends mid-block, and a canvas is scheduled whole or not at all;
- a request admitted from the waiting queue whose whole prompt fits the step gets its first canvas in the same span
  (the hook extends it, within the step's token budget, and `schedule` marks the extension as the canvas): its first
  denoising step shares the prompt's forward instead of following a prompt-only forward whose tail KV would be
  thrown away;
- after each step a request's computed tokens fall back to the last block boundary among its committed tokens
  (`update_from_output`): the canvas' KV is scratch, rewritten by the next step, and a finished block's KV becomes
  final in the step after it is committed (that forward is fused with the next block's first denoising step);
- a step may run several denoising forwards (`model_runner`: a step of whole blocks denoises on until one fills); the
  runner reports the extra ones, and they are counted as the step's;
- the output carries the reference accounting (`denoise_forwards`, `nfe`, `tpf`) and the request's preemption
  count when it finishes;
- a request whose block failed in the runner (its sampled row is `[FAILED]`) ends with vLLM's error finish, alone.

The model runner (`vllm_blockdiff.model_runner`) decides what the canvas holds and what is committed.
"""

from __future__ import annotations

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from blockdiff.models.hf_config import block_diffusion_settings
from blockdiff.serving import ACCOUNTING_KEY, accounting
from vllm_blockdiff.model_runner import EXTRA_FORWARDS, FAILED


class BlockDiffusionScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        settings = block_diffusion_settings(vllm_config.model_config.hf_config)
        self.diffusion_block = settings.block_size
        self.mask_token_id = settings.mask_token_id
        self.eos_token_ids = list(settings.eos_token_ids)
        if self.cache_config.enable_prefix_caching:
            raise ValueError("block diffusion needs --no-enable-prefix-caching: a cached prefix block's KV would be "
                             "reused across requests at positions this scheduler rolls back")
        self.num_sampled_tokens_per_step = 0  # a step appends committed blocks, not one sampled token
        self.need_mamba_block_aligned_split = True  # the alignment hook, used here for diffusion blocks
        self.accounting: dict[str, list[int]] = {}  # request id -> [denoise_forwards, nfe, output tokens, preemptions]

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        if params is not None:  # the checkpoint's EOS ids end a request whatever the tokenizer calls EOS
            params.stop_token_ids = sorted(set(params.stop_token_ids or []) | set(self.eos_token_ids))
        self.accounting.setdefault(request.request_id, [0, 0, 0, 0])
        super().add_request(request)

    def _canvas_length(self, request: Request) -> int:
        return (request.num_tokens // self.diffusion_block + 1) * self.diffusion_block - request.num_tokens

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        for request in self.running:
            request.spec_token_ids = [self.mask_token_id] * self._canvas_length(request)
        # what this step can still schedule, as the stock scheduler counts it (an upper bound: a request the hook
        # saw may still be left out), so that a canvas added to an admitted prompt never exceeds the step's budget
        self.unscheduled_budget = min(self.max_num_scheduled_tokens, self.scheduler_config.max_num_batched_tokens)
        self.admitted_canvases: dict[str, int] = {}
        output = super().schedule(throttle_prefills)
        for rid, length in self.admitted_canvases.items():
            if rid in output.num_scheduled_tokens:
                output.scheduled_spec_decode_tokens[rid] = [self.mask_token_id] * length
        return output

    def _mamba_block_aligned_split(self, request: Request, num_new_tokens: int,
                                   num_new_local_computed_tokens: int = 0, num_external_computed_tokens: int = 0
                                   ) -> int:
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        end = start + num_new_tokens
        if end != request.num_tokens_with_spec:
            num_new_tokens = max(end // self.diffusion_block * self.diffusion_block - start, 0)
        elif request.status != RequestStatus.RUNNING and end == request.num_tokens:  # admitted with all it knows
            canvas = self._canvas_length(request)
            if num_new_tokens + canvas <= self.unscheduled_budget and end + canvas <= self.max_model_len:
                self.admitted_canvases[request.request_id] = canvas
                num_new_tokens += canvas
        self.unscheduled_budget -= num_new_tokens
        return num_new_tokens

    def _preempt_request(self, request: Request, *args, **kwargs) -> None:
        self.accounting.setdefault(request.request_id, [0, 0, 0, 0])[3] += 1
        super()._preempt_request(request, *args, **kwargs)

    def make_spec_decoding_stats(self, spec_decoding_stats, *args, **kwargs):
        """The canvas is not a speculative draft: no acceptance statistics (vLLM's would index past its 0-token
        draft configuration)."""
        return spec_decoding_stats

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput):
        failed = [rid for rid, row in zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids)
                  if FAILED in row]
        for rid in failed:
            model_runner_output.sampled_token_ids[model_runner_output.req_id_to_index[rid]] = []
        committed_before = {rid: self.requests[rid].num_tokens
                            for rid in scheduler_output.num_scheduled_tokens if rid in self.requests}
        extra = getattr(model_runner_output, EXTRA_FORWARDS, {})  # denoising forwards run on inside the step
        for rid in committed_before:
            counts = self.accounting.setdefault(rid, [0, 0, 0, 0])
            counts[1] += 1 + extra.get(rid, 0)
            counts[0] += (rid in scheduler_output.scheduled_spec_decode_tokens) + extra.get(rid, 0)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        b = self.diffusion_block
        for rid, committed in committed_before.items():
            request = self.requests.get(rid)
            if request is not None and not request.is_finished():
                request.num_computed_tokens = min(request.num_computed_tokens, committed // b * b)
        for engine_outputs in outputs.values():
            for out in engine_outputs.outputs:
                counts = self.accounting.get(out.request_id)
                if counts is None:
                    continue
                counts[2] += len(out.new_token_ids)
                if out.finish_reason is not None:
                    denoise, nfe, tokens, preemptions = self.accounting.pop(out.request_id)
                    out.kv_transfer_params = {**(out.kv_transfer_params or {}), ACCOUNTING_KEY: {
                        **accounting(tokens, denoise, nfe), "preemptions": preemptions}}
        for request in self.finish_requests(failed, RequestStatus.FINISHED_ERROR):
            client = outputs.setdefault(request.client_index, EngineCoreOutputs())
            client.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                   finish_reason=request.get_finished_reason()))
        for rid in [rid for rid in self.accounting if rid not in self.requests]:
            del self.accounting[rid]
        return outputs
