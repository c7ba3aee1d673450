"""This project's decoding semantics (DECODING.md) as an SGLang dLLM algorithm, `--dllm-algorithm BlockDiff`.

SGLang runs one block per request at a time and calls `step` after every forward of it. A step proposes and commits
with the core's rule functions (mask token excluded, fp32, strict threshold, fallback k, per-request seeded sampling).
A block is reported done at its last commit; its final KV (SGLang keeps generated blocks' KV) is written by the
request's next forward, which runs the finished block's tokens ahead of the new block's masks in the request's row
(`prepare_inputs`), as the reference decoder fuses its commit forward; the plugin's torch-native extend attention
(`hooks.attend_from_extend_tokens_only`) keeps that row block-causal. Until then the request publishes nothing to
SGLang's radix cache, so no other request reads KV written over masks. With `fuse_commit: false` in
`--dllm-algorithm-config` (or another attention backend) a block is reported done only after the forward that writes
its final KV, a forward of its own. EOS and max_tokens are SGLang's own finish checks over the emitted block, which cut
exactly where rule 6 does. A block that ends its request needs no such forward (as in the reference decoder, the last
block gets none): `hooks.drop_stale_block_kv` gives its KV back to the pool instead of SGLang's radix cache.

Under SGLang's first-done-first-out scheduling (its default) a scheduler step runs one forward, and everything SGLang
does around it (scheduling, the batch's preparation, result processing) is paid again for each denoising step. `run`
denoises on inside the step instead: while no block of the batch is done, it runs the next forward on the same batch,
whose rows address the same positions and KV slots, as SGLang's own synchronous scheduling does; at the first block
that is done the step returns as SGLang's FDFO step would. Each forward is still one denoising step (counted so); the
price is that a request arriving meanwhile waits for the step to end (at most one block's denoising). `denoise_loop:
false` in `--dllm-algorithm-config` keeps one forward per scheduler step.

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
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.managers.schedule_batch import FINISH_ABORT

from blockdiff.decoding import DecodeParams, denoise_step, request_params
from blockdiff.serving import BlockDiffusionSettings, accounting
from sglang_blockdiff.validation import settings_of, temperature, user_overrides, validate_request

NAME = "BlockDiff"  # as in --dllm-algorithm
RECORD_ENV = "SGLANG_BLOCKDIFF_RECORD"  # a directory: every denoising step's inputs and logits, to verify them
FUSE_COMMIT = "fuse_commit"  # --dllm-algorithm-config key: false gives each finished block's KV a forward of its own
DENOISE_LOOP = "denoise_loop"  # --dllm-algorithm-config key: false runs one forward per scheduler step
# the ForwardBatch fields a fused forward lays out anew (one row per request, a finished block ahead of the new one)
FUSED_FIELDS = ("input_ids", "positions", "out_cache_loc", "extend_prefix_lens", "extend_prefix_lens_cpu",
                "extend_seq_lens", "extend_seq_lens_cpu", "extend_start_loc", "extend_num_tokens",
                "global_num_token_non_padded", "global_num_token_non_padded_cpu", "num_token_non_padded")

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
    # where a block reported done at its last commit starts, until a forward writes its final KV
    unwritten_block_from: int | None = None
    skipped_cache_insert: bool = False  # `req.skip_radix_cache_insert` before that block, given back after it

    def defer_block_kv(self, req, block_from: int) -> None:
        """The block at `block_from` is done but its KV was written over masks: publish none of the request to the
        radix cache (a checkpoint, or a release should it end meanwhile) until a forward has written it."""
        self.unwritten_block_from, self.skipped_cache_insert = block_from, req.skip_radix_cache_insert
        req.skip_radix_cache_insert = True

    def block_kv_written(self, req) -> None:
        if self.unwritten_block_from is not None:
            req.skip_radix_cache_insert, self.unwritten_block_from = self.skipped_cache_insert, None

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


def has_ended(req) -> bool:
    """Aborted by SGLang or failed (`end_with_error`) and not yet gone from the batch: no more decoding."""
    return req.to_finish is not None or req.finished()


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
        self.fuse_commit = _flag(config.algorithm_config, FUSE_COMMIT)
        self.denoise_loop = _flag(config.algorithm_config, DENOISE_LOOP)
        self.forward_in_step = 0  # 0 for a scheduler step's first forward, then 1, 2, ... in `run`'s loop (recorded)

    @classmethod
    def validate_request(cls, req) -> str | None:
        try:
            return validate_request(req)
        except Exception as e:  # noqa: BLE001 - a request must never take the scheduler down
            logger.exception("validating request %s failed", req.rid)
            return f"the request could not be validated for block diffusion: {type(e).__name__}: {e}"

    def run(self, model_runner, forward_batch, algo_states: list | None = None) -> tuple:
        """SGLang's FDFO step, its forwards repeated until a block is done (`denoise_loop`); otherwise SGLang's."""
        self.forward_in_step = 0
        if not (self.fdfo and self.denoise_loop):
            return super().run(model_runner, forward_batch, algo_states)
        states = [None] * forward_batch.batch_size  # this algorithm keeps its state on the requests
        for forward in range(self.max_steps(self.block_size)):  # each forward commits a token or more
            self.forward_in_step = forward
            self.prepare_inputs(model_runner, forward_batch, states)
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            done = self.step(forward_batch, out.logits_output.full_logits, states)
            if any(done):
                break
        # as SGLang's FDFO step returns them: each row's block, all of it accepted where done, none where not (the
        # scheduler keeps those blocks for the request's next step)
        return (out.logits_output, forward_batch.input_ids.view(forward_batch.batch_size, self.block_size).tolist(),
                [self.block_size if d else 0 for d in done], states, out.can_run_graph)

    def prepare_inputs(self, model_runner, forward_batch, states: list) -> None:
        """Before a forward: each request's forward is counted (here, as SGLang's synchronous rounds skip `step`
        after a forward of prompt blocks only), and each request whose previous block is done but unwritten
        (`defer_block_kv`) gets that block's tokens, positions and KV slots ahead of its new block in its row, so
        this forward writes the finished block's final KV; `step` puts the batch back as SGLang laid it out."""
        for req in forward_batch.blockdiff_reqs:
            if has_ended(req):  # `step` lets it leave
                continue
            try:
                request_decoding(req, self.settings).nfe += 1
            except Exception as e:  # noqa: BLE001 - one request's failure is that request's error
                end_with_error(req, e)
        if self.fuse_commit and not isinstance(model_runner.attn_backend, TorchNativeAttnBackend):
            logger.warning("the commit forward is fused on the torch-native attention backend only; %s writes each "
                           "finished block's KV in a forward of its own", type(model_runner.attn_backend).__name__)
            self.fuse_commit = False
        if not self.fuse_commit:
            return
        model_runner.attn_backend.extend_block_size = self.block_size  # the fused row attends block-causally
        finished = {}
        for row, req in enumerate(forward_batch.blockdiff_reqs):
            start = getattr(getattr(req, "blockdiff", None), "unwritten_block_from", None)
            # the row must be the block after it (in a synchronous round the finished block itself may come again)
            if start is not None and forward_batch.extend_prefix_lens_cpu[row] == start + self.block_size:
                finished[row] = start
        if finished:
            fields, kept_rows = lay_out_finished_blocks(forward_batch, finished,
                                                        model_runner.req_to_token_pool.req_to_token, self.block_size)
            forward_batch.blockdiff_unfused = fields, kept_rows, list(finished)

    def step(self, forward_batch, full_logits: torch.Tensor, states: list) -> list[bool]:
        unfused = getattr(forward_batch, "blockdiff_unfused", None)
        if unfused is not None:  # a fused forward: back to SGLang's layout, the finished blocks' logits dropped
            fields, kept_rows, fused_rows = unfused
            for name, value in fields.items():
                setattr(forward_batch, name, value)
            forward_batch.blockdiff_unfused = None
            full_logits = full_logits[kept_rows]
            for row in fused_rows:
                req = forward_batch.blockdiff_reqs[row]
                req.blockdiff.block_kv_written(req)
        bs = forward_batch.batch_size
        logits = full_logits.view(bs, self.block_size, -1)
        ids = forward_batch.input_ids.view(bs, self.block_size)
        done = []
        for row, req in enumerate(forward_batch.blockdiff_reqs):
            if has_ended(req):  # let it leave
                done.append(True)
                continue
            try:
                done.append(self.step_request(req, row, logits, ids, forward_batch.dllm_prompt_mask))
            except Exception as e:  # noqa: BLE001 - one request's failure is that request's error
                end_with_error(req, e)
                done.append(True)
        return done

    def step_request(self, req, row: int, logits: torch.Tensor, ids: torch.Tensor, prompt_mask) -> bool:
        """One denoising step of one request's block; True when the block is done: this forward wrote its final KV,
        or it ends the request, or (fused) the request's next forward writes it."""
        state = request_decoding(req, self.settings)
        masked = ids[row] == self.mask_id
        if prompt_mask is not None:
            masked &= ~prompt_mask[row]
        positions = masked.nonzero().squeeze(-1)
        state.stale_kv_from = None
        if len(positions) == 0:  # this forward wrote the full block's KV: it may leave
            state.block_kv_written(req)
            return True
        state.denoise_forwards += 1
        if self.records is not None:
            self.record(req, ids[row], logits[row])
        denoise_step(ids[row], logits[row], positions, state.params, self.mask_id, state.generator)
        first_generated = len(req.origin_input_ids) + len(req.output_ids)  # the block's, as an absolute position
        if (ids[row][positions] == self.mask_id).any():
            return False
        if ends_request(req, ids[row][first_generated - req.dllm_block_offset:]):
            state.stale_kv_from = first_generated
            return True
        if self.fuse_commit:  # the request's next forward writes its KV (`prepare_inputs`)
            state.defer_block_kv(req, req.dllm_block_offset)
            return True
        return False

    def record(self, req, block: torch.Tensor, logits: torch.Tensor) -> None:
        """One file per step in the records directory: the tokens before the block, the block as this forward saw it
        and the logits the step proposes from (the scheduler process cannot hand them back any other way)."""
        context = (req.origin_input_ids + req.output_ids)[:req.dllm_block_offset]
        torch.save({"context": list(context), "block": block.tolist(), "logits": logits.float().cpu().clone(),
                    "forward_in_step": self.forward_in_step},
                   self.records / f"{os.getpid()}-{self.recorded}.pt")
        self.recorded += 1


def _flag(algorithm_config: dict, key: str) -> bool:
    value = algorithm_config.get(key, True)
    if not isinstance(value, bool):
        raise ValueError(f"--dllm-algorithm-config {key}: {value!r} is not true or false")
    return value


def lay_out_finished_blocks(batch, finished: dict[int, int], req_to_token: torch.Tensor,
                            block_size: int) -> tuple[dict, torch.Tensor]:
    """Put each finished block (row -> its first position) ahead of its row's new block in `batch`, in place: its
    tokens, positions and the KV slots its request holds for it, the row's prefix shortened by it. Returns the fields
    as they were and the fused layout's rows of the original tokens (the logits `step` reads)."""
    saved = {name: getattr(batch, name) for name in FUSED_FIELDS}
    device = batch.input_ids.device
    ids, positions, slots, kept = [], [], [], []
    prefix_lens, seq_lens = list(batch.extend_prefix_lens_cpu), list(batch.extend_seq_lens_cpu)
    start, fused_start = 0, 0
    for row, (req, length) in enumerate(zip(batch.blockdiff_reqs, batch.extend_seq_lens_cpu)):
        if row in finished:
            first = finished[row]
            tokens = (req.origin_input_ids + req.output_ids)[first:first + block_size]
            ids.append(torch.tensor(tokens, dtype=batch.input_ids.dtype, device=device))
            positions.append(torch.arange(first, first + block_size, dtype=batch.positions.dtype, device=device))
            slots.append(req_to_token[req.kv.req_pool_idx, first:first + block_size].to(batch.out_cache_loc.dtype))
            prefix_lens[row] -= block_size
            seq_lens[row] += block_size
            fused_start += block_size
        ids.append(batch.input_ids[start:start + length])
        positions.append(batch.positions[start:start + length])
        slots.append(batch.out_cache_loc[start:start + length])
        kept.append(torch.arange(fused_start, fused_start + length, device=device))
        start, fused_start = start + length, fused_start + length
    batch.input_ids, batch.positions, batch.out_cache_loc = torch.cat(ids), torch.cat(positions), torch.cat(slots)
    batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu = prefix_lens, seq_lens
    batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=saved["extend_prefix_lens"].dtype, device=device)
    batch.extend_seq_lens = torch.tensor(seq_lens, dtype=saved["extend_seq_lens"].dtype, device=device)
    batch.extend_start_loc = torch.tensor([0, *seq_lens[:-1]], dtype=saved["extend_start_loc"].dtype,
                                          device=device).cumsum(0)
    # the token count attention reads (SGLang runs it on that many rows, the rest taken for padding)
    batch.extend_num_tokens = batch.global_num_token_non_padded_cpu = fused_start
    for name in ("global_num_token_non_padded", "num_token_non_padded"):
        if saved[name] is not None:
            setattr(batch, name, torch.tensor(fused_start, dtype=saved[name].dtype, device=device))
    return saved, torch.cat(kept)


def ends_request(req, generated: torch.Tensor) -> bool:
    """Whether SGLang's finish check ends `req` on this fully committed block's generated tokens: a stop token (the
    checkpoint's EOS ids are among them, see validation) or max_new_tokens. It may end a request this does not foresee
    (a stop string), never the other way: validation refuses ignore_eos and min_new_tokens."""
    sp = req.sampling_params
    stop_ids = sp.stop_token_ids or ()
    return any(int(t) in stop_ids for t in generated) or \
        (sp.max_new_tokens is not None and len(req.output_ids) + len(generated) >= sp.max_new_tokens)


Algorithm = BlockDiff
