"""Scheduler hooks on stand-ins for SGLang's request and pools: the one that drops the KV of a request's ended last
block (the served path is tests/sglang/test_blockdiff.py::test_a_prompt_that_continues_an_output_reads_no_stale_kv)
and the one that sends a request's output only when a block was committed (served: tests/sglang/test_openai.py)."""

from types import SimpleNamespace

import torch

from sglang_blockdiff.hooks import drop_stale_block_kv, send_committed_blocks_only


def ended_request(stale_from: int, allocated: int) -> SimpleNamespace:
    return SimpleNamespace(rid="r", blockdiff=SimpleNamespace(stale_kv_from=stale_from), finished=lambda: True,
                           skip_radix_cache_insert=False,
                           kv=SimpleNamespace(holds_kv=True, req_pool_idx=0, kv_committed_len=allocated,
                                              kv_allocated_len=allocated))


def scheduler_freeing_with(free_segment) -> SimpleNamespace:
    return SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(page_size=1, free_segment=free_segment),
                           req_to_token_pool=SimpleNamespace(req_to_token=torch.arange(64)[None]))


def test_the_ended_blocks_slots_go_back_before_sglang_releases_the_request():
    freed, released = [], []
    req = ended_request(stale_from=40, allocated=64)
    drop_stale_block_kv(lambda _, r: released.append((r.kv.kv_committed_len, r.kv.kv_allocated_len)),
                        scheduler_freeing_with(lambda slots, start_pos: freed.append((slots.tolist(), start_pos))),
                        req)
    assert freed == [(list(range(40, 64)), 40)] and released == [(40, 40)]
    assert not req.skip_radix_cache_insert and req.blockdiff.stale_kv_from is None


def test_a_failed_drop_caches_none_of_the_request_and_sglang_still_releases_it():
    def fail(slots, start_pos):
        raise RuntimeError("allocator refused")

    released = []
    req = ended_request(stale_from=40, allocated=64)
    drop_stale_block_kv(lambda _, r: released.append(r), scheduler_freeing_with(fail), req)
    assert released == [req] and req.skip_radix_cache_insert and req.blockdiff.stale_kv_from is None


def sent_outputs(req: SimpleNamespace) -> list:
    sent = []
    send_committed_blocks_only(lambda accumulator, *, req: sent.append(req.rid), None, req=req)
    return sent


def output_state(*, stream: bool, output: int, sent: int, finished: bool = False, diffusion: bool = True):
    return SimpleNamespace(rid="r", stream=stream, output_ids=[7] * output, send_token_offset=sent,
                           finished=lambda: finished, **({"blockdiff": SimpleNamespace()} if diffusion else {}))


def test_a_forward_that_commits_nothing_sends_nothing_streaming_or_not():
    for stream in (True, False):
        assert sent_outputs(output_state(stream=stream, output=0, sent=0)) == []  # the first block's steps
        assert sent_outputs(output_state(stream=stream, output=32, sent=32)) == []
        assert sent_outputs(output_state(stream=stream, output=64, sent=32)) == ["r"]  # SGLang decides
        assert sent_outputs(output_state(stream=stream, output=32, sent=32, finished=True)) == ["r"]
        assert sent_outputs(output_state(stream=stream, output=0, sent=0, diffusion=False)) == ["r"]  # not ours


def test_a_request_the_hook_cannot_read_is_sent_as_sglang_would():
    assert sent_outputs(SimpleNamespace(rid="r", blockdiff=SimpleNamespace())) == ["r"]
