"""The places SGLang is hooked (through its HookRegistry, see `register`). Those that run per request in the
scheduler process turn a failure into that request's error: an exception there would end the whole server."""

from __future__ import annotations

import dataclasses
import logging
import math
from http import HTTPStatus

import yaml

from blockdiff.http_guard import RequestGuard
from blockdiff.models.hf_config import block_diffusion_settings
from blockdiff.serving import ACCOUNTING_KEY
from sglang_blockdiff.algorithm import NAME
from sglang_blockdiff.validation import check_body

logger = logging.getLogger(__name__)


def dllm_config_from_model(original, server_args):
    """`DllmConfig.from_server_args`: block size, mask id, EOS and threshold from the checkpoint's own config for any
    block-diffusion architecture (`block_diffusion` section, or LLaDA2.0's model-card values); SGLang's hard-coded
    table stays the fallback for the rest. `--dllm-algorithm-config` YAML may override block_size and threshold."""
    from sglang.srt.dllm import config as dllm_config
    from sglang.srt.dllm.algorithm import get_algorithm_cls

    cfg = dllm_config.resolving_view(server_args)
    if cfg.dllm_algorithm is None:
        return None
    model_config = dllm_config.ModelConfig.from_server_args(server_args, model_path=cfg.model_path,
                                                           model_revision=cfg.revision)
    try:
        settings = block_diffusion_settings(model_config.hf_config)
    except ValueError:
        return original(server_args)
    algorithm_config = {}
    if cfg.dllm_algorithm_config is not None:
        with open(cfg.dllm_algorithm_config) as f:
            algorithm_config = yaml.safe_load(f) or {}
        if not isinstance(algorithm_config, dict):
            raise ValueError(f"{cfg.dllm_algorithm_config}: the dLLM algorithm config must be a YAML mapping")
    settings = dataclasses.replace(settings, block_size=algorithm_config.get("block_size", settings.block_size),
                                   threshold=algorithm_config.get("threshold", settings.threshold))
    algorithm = get_algorithm_cls(cfg.dllm_algorithm)
    config = dllm_config.DllmConfig(
        algorithm=cfg.dllm_algorithm, algorithm_config={**algorithm_config, "threshold": settings.threshold},
        block_size=settings.block_size, mask_id=settings.mask_token_id,
        max_running_requests=1 if cfg.max_running_requests is None else cfg.max_running_requests,
        first_done_first_out_mode=cfg.dllm_fdfo,
        requires_separate_context_encoding=algorithm.requires_separate_context_encoding,
        capture_input_preparation=(algorithm.capture_input_preparation
                                   and algorithm_config.get("capture_input_preparation", True)))
    config.blockdiff_settings = settings
    return config


def attach_requests(original, worker, forward_batch, batch=None):
    """`TpModelWorker._forward_batch_generation_dllm`: the algorithm reads per-request parameters off the requests."""
    if batch is not None:
        forward_batch.blockdiff_reqs = batch.reqs
    return original(worker, forward_batch, batch)


def accounting_outputs(streamer, reqs) -> dict[str, list]:
    """`SchedulerOutputStreamer.build_additional_customized_info`: DECODING.md's accounting, once, in the finished
    request's meta_info under "block_diffusion" (left out, and logged, for a request it cannot be made for)."""
    values = []
    for req in reqs:
        state = getattr(req, "blockdiff", None)
        try:
            finished = state is not None and req.finished()
            values.append([state.accounting(req.finished_len or len(req.output_ids))] if finished else [])
        except Exception:  # noqa: BLE001 - a request must never take the scheduler down
            logger.exception("no block-diffusion accounting for request %s", req.rid)
            values.append([])
    return {ACCOUNTING_KEY: values}


def accounting_in_metadata(metadata: dict | None, meta_info: dict) -> dict | None:
    """`build_endpoint_weight_version_metadata` as SGLang's OpenAI completion and chat endpoints call it (after it):
    a finished block-diffusion request's accounting joins the response's `metadata` under "block_diffusion", as
    /generate has it in `meta_info`."""
    accounting = meta_info.get(ACCOUNTING_KEY)
    if not accounting:
        return metadata
    return {**(metadata or {}), ACCOUNTING_KEY: accounting[0]}


def send_committed_blocks_only(original, accumulator, *, req):
    """`_GenerationStreamAccumulator.accept`: a block-diffusion request's output goes to the detokenizer only when a
    block was committed or it finished. SGLang sends a streaming request's output every forward at its default stream
    interval of 1, so every denoising step that commits nothing would reach the client as an empty chunk; and it sends
    a non-streaming request's output whenever its length is a multiple of `SGLANG_FORCE_STREAM_INTERVAL`, which an
    empty output is, so every forward of a request's first block would cost the detokenizer and tokenizer processes
    a message carrying nothing."""
    try:
        unchanged = (getattr(req, "blockdiff", None) is not None and not req.finished()
                     and len(req.output_ids) == req.send_token_offset)
    except Exception:  # noqa: BLE001 - never take the scheduler down: send as SGLang would
        logger.exception("deciding whether to send the output of request %s failed", req.rid)
        unchanged = False
    if not unchanged:
        original(accumulator, req=req)


def refuse_prompts_without_room(result, scheduler, req):
    """`Scheduler.init_req_max_new_tokens` (after it): a prompt within a token of the context leaves SGLang's
    max_new_tokens at 0, and SGLang would run it anyway; refuse it with a 400 naming the lengths."""
    config = scheduler.dllm_config
    if config is None or config.algorithm != NAME or req.to_finish is not None or req.finished():
        return result
    try:
        if req.sampling_params.max_new_tokens < 1:
            req.set_finish_with_abort(f"the prompt ({len(req.origin_input_ids)} tokens) leaves no room for output: "
                                      f"this server's context length is {scheduler.model_config.context_len} tokens")
    except Exception as e:  # noqa: BLE001 - a request must never take the scheduler down
        logger.exception("checking the room left for request %s failed", req.rid)
        req.set_finish_with_abort(f"the request could not be checked for block diffusion: {type(e).__name__}: {e}")
    return result


def install_request_guard(*args, **kwargs) -> None:
    """`http_server.launch_server` (before it): the request guard in front of SGLang's app, the outermost
    middleware, so a body over the size limit or of the wrong shape never reaches SGLang's parsing."""
    from sglang.srt.entrypoints.http_server import app

    if not getattr(app.state, "blockdiff_guard", False):
        app.add_middleware(RequestGuard, check=check_body)
        app.state.blockdiff_guard = True


def admit_only_what_the_pool_can_finish(original, scheduler):
    """`Scheduler._fetch_waiting_reqs`: move waiting requests into the dLLM manager (where they start taking KV) only
    while the KV their in-progress peers and they will hold at their largest, prompt plus max_new_tokens rounded up to
    whole blocks and pages, fits in the pool. SGLang 0.5.23 admits up to --max-running-requests regardless: once the
    admitted requests' committed blocks fill the pool, each waits for room for its next block that only another's
    finish would free, and the server stalls for good (seen with a 512-token pool and 16 running: usage 1.00, no
    forward for minutes; with SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE the stall is reported as a leak and the
    server exits). In first-come order; a request alone is always admitted, so a large one cannot wait forever."""
    granule = math.lcm(scheduler.dllm_config.block_size, scheduler.page_size)

    def footprint(req) -> int:
        most = len(req.origin_input_ids) + (req.sampling_params.max_new_tokens or 0)
        return -(-most // granule) * granule

    try:
        held = sum(footprint(r) for r in scheduler.dllm_manager.waiting_queue)
        room = scheduler.dllm_config.max_running_requests - len(scheduler.dllm_manager.waiting_queue)
        admissible = 0
        for req in scheduler.waiting_queue[:max(room, 0)]:  # SGLang takes no more than that: look no further
            held += footprint(req)
            if held > scheduler.max_total_num_tokens and (admissible or scheduler.dllm_manager.waiting_queue):
                break
            admissible += 1
    except Exception:  # noqa: BLE001 - never take the scheduler down: admit as SGLang would
        logger.exception("sizing the waiting requests' KV failed; admitting as SGLang does")
        return original(scheduler)
    waiting, scheduler.waiting_queue = scheduler.waiting_queue, scheduler.waiting_queue[:admissible]
    try:
        original(scheduler)
    finally:
        scheduler.waiting_queue += waiting[admissible:]


def stage_whole_blocks_only(original, adder, req):
    """`PrefillAdder.add_dllm_staging_req`: a request's next block runs whole or waits for the next round. SGLang
    0.5.23 cuts the block to the round's remaining KV budget, which its own reservations for this round's requests
    can bring below a block, and once that budget is spent it stops counting KV and extends by up to the round's
    compute budget; either way the forward fails on mismatched buffers and kills the scheduler. Waiting is safe:
    the round's offsets are reset next round, and `admit_only_what_the_pool_can_finish` keeps room for every admitted
    request's blocks."""
    block = adder.dllm_config.block_size
    if not adder.dllm_config.requires_separate_context_encoding and \
            min(adder.rem_dllm_tokens, int(adder.rem_total_tokens)) < block:
        from sglang.srt.managers.schedule_policy import AddReqResult

        return AddReqResult.NO_TOKEN
    return original(adder, req)


def drop_stale_block_kv(original, scheduler, req):
    """`SchedulerDllmMixin._finish_dllm_request_if_needed`: a request whose last block was reported done without the
    forward that writes its final KV (`algorithm.ends_request`) gives that block's KV back to the pool before SGLang
    releases the request, so its radix cache keeps the prompt and earlier blocks only (keeping the stale block, a
    later request with the same prefix would read KV written over mask tokens). Should SGLang not have ended the
    request, it ends here with an error: decoding on would read that stale KV."""
    state = getattr(req, "blockdiff", None)
    stale_from = getattr(state, "stale_kv_from", None)
    if stale_from is not None and req.kv.holds_kv:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        try:
            if not req.finished():
                logger.error("request %s did not end after a block that should end it", req.rid)
                req.finished_reason = FINISH_ABORT("block-diffusion decoding expected this block to end the request",
                                                   HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")
            page = scheduler.token_to_kv_pool_allocator.page_size
            start, allocated = -(-stale_from // page) * page, req.kv.kv_allocated_len
            if start < allocated:
                slots = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, start:allocated]
                scheduler.token_to_kv_pool_allocator.free_segment(slots, start_pos=start)
            req.kv.kv_committed_len = req.kv.kv_allocated_len = stale_from
        except Exception:  # noqa: BLE001 - never take the scheduler down, and never let the stale block be cached
            logger.exception("dropping the last block's KV of request %s failed; caching none of it", req.rid)
            req.skip_radix_cache_insert = True
        state.stale_kv_from = None
    return original(scheduler, req)


def scale_native_moe_output(output, layer, x, topk_output, moe_runner_config):
    """`moe_forward_native` (SGLang's MoE on CPU): apply `routed_scaling_factor`, which SGLang applies in its GPU
    kernels or fused top-k but this fallback drops (measured: LLaDA2MoeModelLM matched the reference only with the
    factor set to 1). A CPU runtime fix; GPU serving does not run this function."""
    factor = moe_runner_config.routed_scaling_factor
    return output if factor is None or factor == 1.0 else output * factor


def attend_from_extend_tokens_only(original, backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                   seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                   enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
    """`TorchNativeAttnBackend._run_sdpa_forward_extend` (SGLang's attention on CPU): a bidirectional extend (a
    block-diffusion block over its cached prefix) attends from the extended tokens only, the whole batch in one
    attention call. SGLang 0.5.23 runs every sequence's attention from all its positions, prefix included, and throws
    the prefix rows away (a 32-token block after a 500-token context costs 16 times the attention it needs), one
    sequence at a time in Python. Without a mask every output row is the same softmax over the same keys either way.
    On a block-diffusion server (`extend_block_size` set on the backend by the algorithm) an extend of several blocks
    is block-causal: each block attends to the prefix, the blocks before it and itself (the fused commit forward's
    rows). Causal, cross-attention, sliding-window and encoder extends are SGLang's."""
    if causal or is_cross_attn or encoder_lens is not None or (sliding_window_size or -1) > -1:
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    import torch

    q_lens, kv_lens = extend_seq_lens.tolist(), seq_lens.tolist()
    if not q_lens or max(q_lens) == 0:
        return output
    rows, q_max, kv_max = len(q_lens), max(q_lens), max(kv_lens)
    block = getattr(backend, "extend_block_size", None)
    # Each sequence's keys and values padded to the longest: past a sequence's length its req_to_token row holds
    # slot 0 (SGLang's pool starts zeroed) or an earlier request's slots, valid indices whose keys the mask hides.
    slots = req_to_token[req_pool_indices, :kv_max].reshape(-1)
    key = k_cache.index_select(0, slots).view(rows, kv_max, *k_cache.shape[1:]).transpose(1, 2)
    value = v_cache.index_select(0, slots).view(rows, kv_max, *v_cache.shape[1:]).transpose(1, 2)
    if key.dtype != query.dtype:  # as SGLang: sdpa wants one dtype
        key, value = key.to(query.dtype), value.to(query.dtype)
    padded = min(q_lens) < q_max
    if padded:  # queries padded to the longest extend; the padding rows are computed and dropped
        real = torch.arange(q_max, device=query.device) < extend_seq_lens[:, None]
        queries = query.new_zeros(rows, q_max, *query.shape[1:])
        queries[real] = query
    else:
        queries = query.reshape(rows, q_max, *query.shape[1:])
    mask = None
    if min(kv_lens) < kv_max or (block is not None and q_max > block):
        # query i of a sequence sees its prefix and its extend up to the end of i's block (all of it without blocks)
        ends = torch.arange(q_max, device=query.device)[None, :]
        ends = ((ends // block + 1) * block).minimum(extend_seq_lens[:, None]) if block else extend_seq_lens[:, None]
        ends = (seq_lens - extend_seq_lens)[:, None] + ends
        mask = (torch.arange(kv_max, device=query.device)[None, None, :] < ends[:, :, None])[:, None]
    attended = torch.nn.functional.scaled_dot_product_attention(queries.transpose(1, 2), key, value, attn_mask=mask,
                                                                scale=scaling, enable_gqa=enable_gqa).transpose(1, 2)
    if padded:
        output.copy_(attended[real])
    else:
        output.view(attended.shape).copy_(attended)
    return output
