"""The fused commit forward in the SGLang algorithm, on SGLang-shaped stand-ins for one request: the block done at
its last commit stays out of the radix cache until the next forward, whose row carries it ahead of the new block and
whose new block's logits alone reach the step; and the denoising loop inside a scheduler step. The served tokens are
tested in test_blockdiff.py."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from blockdiff.serving import BlockDiffusionSettings
from sglang_blockdiff.algorithm import DENOISE_LOOP, FUSE_COMMIT, BlockDiff

BLOCK, MASK, VOCAB = 4, 1, 16


def algorithm(**algorithm_config) -> BlockDiff:
    settings = BlockDiffusionSettings(MASK, (0,), block_size=BLOCK, threshold=0.5)
    return BlockDiff(SimpleNamespace(block_size=BLOCK, mask_id=MASK, first_done_first_out_mode=True,
                                     algorithm_config=algorithm_config, blockdiff_settings=settings))


def request(skip_radix_cache_insert: bool) -> SimpleNamespace:
    sampling = SimpleNamespace(max_new_tokens=32, temperature=0.0, top_k=1, sampling_seed=None, custom_params=None,
                               stop_token_ids={0})
    return SimpleNamespace(rid="r", sampling_params=sampling, origin_input_ids=[5, 6, 7, 8], output_ids=[],
                           dllm_block_offset=4, skip_radix_cache_insert=skip_radix_cache_insert, to_finish=None,
                           finished=lambda: False, kv=SimpleNamespace(req_pool_idx=0))


def next_block(req, first: int) -> SimpleNamespace:
    """SGLang's batch for `req`'s all-mask block at `first`, over the prefix before it."""
    return SimpleNamespace(
        batch_size=1, blockdiff_reqs=[req], dllm_prompt_mask=None, input_ids=torch.full((BLOCK,), MASK),
        positions=torch.arange(first, first + BLOCK), out_cache_loc=torch.arange(first, first + BLOCK) + 100,
        extend_prefix_lens=torch.tensor([first]), extend_prefix_lens_cpu=[first], extend_seq_lens=torch.tensor([BLOCK]),
        extend_seq_lens_cpu=[BLOCK], extend_start_loc=torch.tensor([0]), extend_num_tokens=BLOCK,
        global_num_token_non_padded=None, global_num_token_non_padded_cpu=BLOCK, num_token_non_padded=None)


def favouring(token: int, rows: int) -> torch.Tensor:
    logits = torch.zeros(rows, VOCAB)
    logits[:, token] = 20.0
    return logits


@pytest.mark.parametrize("skipped_before", [False, True])
def test_a_finished_block_is_fused_into_the_next_forward_and_cached_only_after_it(skipped_before):
    algo, req = algorithm(), request(skipped_before)
    runner = SimpleNamespace(attn_backend=object.__new__(TorchNativeAttnBackend),
                             req_to_token_pool=SimpleNamespace(req_to_token=torch.arange(64)[None] + 100))
    first = next_block(req, 4)
    algo.prepare_inputs(runner, first, [None])
    assert not hasattr(first, "blockdiff_unfused") or first.blockdiff_unfused is None  # nothing to fuse yet
    assert algo.step(first, favouring(9, BLOCK), [None]) == [True]  # done at its last commit, KV over masks
    assert req.skip_radix_cache_insert and req.blockdiff.unwritten_block_from == 4

    req.output_ids, req.dllm_block_offset = [9] * BLOCK, 8  # what SGLang does with a done block
    second = next_block(req, 8)
    sglang_ids = second.input_ids
    algo.prepare_inputs(runner, second, [None])
    assert runner.attn_backend.extend_block_size == BLOCK
    assert second.input_ids.tolist() == [9] * BLOCK + [MASK] * BLOCK
    assert second.positions.tolist() == list(range(4, 12))
    assert second.out_cache_loc.tolist() == list(range(104, 112))  # the finished block's own slots, then the new
    assert (second.extend_prefix_lens_cpu, second.extend_seq_lens_cpu) == ([4], [2 * BLOCK])
    assert second.extend_num_tokens == second.global_num_token_non_padded_cpu == 2 * BLOCK
    assert req.skip_radix_cache_insert  # not yet written

    # the finished block's rows favour 2; of the new block's, only the first is confident: 3 there, masks on
    logits = torch.cat([favouring(2, BLOCK), favouring(3, 1), torch.zeros(BLOCK - 1, VOCAB)])
    assert algo.step(second, logits, [None]) == [False]
    assert second.input_ids is sglang_ids and sglang_ids.tolist() == [3] + [MASK] * (BLOCK - 1)
    assert (second.extend_prefix_lens_cpu, second.extend_num_tokens) == ([8], BLOCK)  # SGLang's layout again
    assert req.skip_radix_cache_insert == skipped_before  # written: the cache may have it (unless it never could)
    assert req.blockdiff.unwritten_block_from is None and req.blockdiff.nfe == 2


def test_fuse_commit_false_waits_for_the_forward_that_writes_the_block():
    algo, req = algorithm(**{FUSE_COMMIT: False}), request(False)
    batch = next_block(req, 4)
    assert algo.step(batch, favouring(9, BLOCK), [None]) == [False]
    assert not req.skip_radix_cache_insert
    assert algo.step(batch, favouring(9, BLOCK), [None]) == [True]


@pytest.mark.parametrize("key", [FUSE_COMMIT, DENOISE_LOOP])
def test_a_flag_that_is_not_a_boolean_is_refused_by_name(key):
    with pytest.raises(ValueError, match=f"{key}: 'yes' is not true or false"):
        algorithm(**{key: "yes"})


class OneTokenPerForward:
    """A model runner whose every forward makes the first masked position of the block, if any, confident (token 9)."""

    def __init__(self) -> None:
        self.attn_backend = object.__new__(TorchNativeAttnBackend)
        self.req_to_token_pool = SimpleNamespace(req_to_token=torch.arange(64)[None] + 100)
        self.forwards = 0

    def forward(self, batch, pp_proxy_tensors=None) -> SimpleNamespace:
        self.forwards += 1
        logits, masked = torch.zeros(len(batch.input_ids), VOCAB), (batch.input_ids == MASK).nonzero()
        if len(masked):
            logits[int(masked[0]), 9] = 20.0
        return SimpleNamespace(logits_output=SimpleNamespace(full_logits=logits), can_run_graph=False)


@pytest.mark.parametrize("loop", [True, False])
def test_a_scheduler_step_denoises_on_until_a_block_is_done(loop):
    algo, req, runner = algorithm(**{DENOISE_LOOP: loop}), request(False), OneTokenPerForward()
    batch = next_block(req, 4)
    _, blocks, accepted, states, _ = algo.run(runner, batch, [None])
    if loop:  # one step: four forwards, each a denoising step, the block done at the last
        assert (runner.forwards, accepted, blocks) == (BLOCK, [BLOCK], [[9] * BLOCK])
    else:  # SGLang's FDFO step: one forward, the block kept for the request's next step
        assert (runner.forwards, accepted, blocks) == (1, [0], [[9] + [MASK] * (BLOCK - 1)])
    assert states == [None]
    assert req.blockdiff.nfe == req.blockdiff.denoise_forwards == runner.forwards


def test_unfused_the_loop_runs_the_forward_that_writes_the_block_and_ends_the_step_after_it():
    algo, req, runner = algorithm(**{FUSE_COMMIT: False}), request(False), OneTokenPerForward()
    _, blocks, accepted, _, _ = algo.run(runner, next_block(req, 4), [None])
    assert (runner.forwards, accepted, blocks) == (BLOCK + 1, [BLOCK], [[9] * BLOCK])
    assert (req.blockdiff.nfe, req.blockdiff.denoise_forwards) == (BLOCK + 1, BLOCK)
