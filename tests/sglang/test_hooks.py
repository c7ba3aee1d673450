"""Scheduler hooks on stand-ins for SGLang's request and pools: the one that drops the KV of a request's ended last
block (the served path is tests/sglang/test_blockdiff.py::test_a_prompt_that_continues_an_output_reads_no_stale_kv)
and the one that sends a request's output only when a block was committed (served: tests/sglang/test_openai.py)."""

from types import SimpleNamespace

import torch

from sglang_blockdiff.hooks import attend_from_extend_tokens_only, drop_stale_block_kv, send_committed_blocks_only


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


def sglang_extend(query, k_cache, v_cache, req_to_token, seq_lens, prefix_lens, causal=False):
    """SGLang's own torch-native extend attention on one batch, and the plugin's in front of it."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    original = TorchNativeAttnBackend._run_sdpa_forward_extend
    original = getattr(original, "__wrapped__", original)  # SGLang's, should the plugin's hooks be applied here
    args = (k_cache, v_cache, req_to_token, torch.arange(len(seq_lens)), seq_lens, prefix_lens, seq_lens - prefix_lens)
    backend = object.__new__(TorchNativeAttnBackend)
    want = original(backend, query, torch.empty_like(query), *args, scaling=0.3, enable_gqa=True, causal=causal)
    got = attend_from_extend_tokens_only(original, backend, query, torch.full_like(query, float("nan")), *args,
                                         scaling=0.3, enable_gqa=True, causal=causal)
    return want, got


def test_a_bidirectional_extend_attends_from_its_new_tokens_only_with_sglangs_outputs():
    torch.manual_seed(0)
    seq_lens, prefix_lens = torch.tensor([40, 32, 97]), torch.tensor([8, 0, 65])  # a block over 8, 0 and 65 tokens
    slots = torch.randperm(200)
    req_to_token = torch.stack([slots[:100], slots[100:], slots[50:150]])  # the third shares the others' slots
    k_cache, v_cache = torch.randn(200, 2, 16), torch.randn(200, 2, 16)  # 2 KV heads under 6 query heads
    query = torch.randn(int((seq_lens - prefix_lens).sum()), 6, 16)
    want, got = sglang_extend(query, k_cache, v_cache, req_to_token, seq_lens, prefix_lens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_causal_extend_is_left_to_sglang():
    torch.manual_seed(0)
    seq_lens, prefix_lens = torch.tensor([40]), torch.tensor([8])
    k_cache, v_cache = torch.randn(40, 2, 16), torch.randn(40, 2, 16)
    query = torch.randn(32, 2, 16)
    want, got = sglang_extend(query, k_cache, v_cache, torch.arange(40)[None], seq_lens, prefix_lens, causal=True)
    assert torch.equal(got, want)


def test_on_a_block_diffusion_server_an_extend_of_two_blocks_is_block_causal():
    """The fused commit forward's row: a finished block and the next one over an 8-token prefix; the first block
    must not see the second, the second sees both (DECODING.md's block-causal mask)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    torch.manual_seed(0)
    block, prefix = 4, 8
    k_cache, v_cache = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    query = torch.randn(2 * block, 2, 8)
    backend = object.__new__(TorchNativeAttnBackend)
    backend.extend_block_size = block
    got = attend_from_extend_tokens_only(None, backend, query, torch.empty_like(query), k_cache, v_cache,
                                         torch.arange(16)[None], torch.tensor([0]), torch.tensor([16]),
                                         torch.tensor([prefix]), torch.tensor([2 * block]), scaling=0.5)
    sees = torch.arange(16)[None, :] < prefix + block * (torch.arange(2 * block)[:, None] // block + 1)
    want = torch.nn.functional.scaled_dot_product_attention(query.movedim(0, 1), k_cache.movedim(0, 1),
                                                            v_cache.movedim(0, 1), attn_mask=sees, scale=0.5)
    torch.testing.assert_close(got, want.movedim(1, 0), rtol=1e-6, atol=1e-6)


def test_a_batch_of_one_and_two_block_extends_is_one_attention_with_each_rows_own_keys():
    """A step at concurrency: one request's fused commit forward (its finished block and the next) beside requests
    extending one block, over prefixes of different lengths; each row gets what attending alone gives it."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    torch.manual_seed(0)
    block = 4
    prefix_lens, q_lens = torch.tensor([3, 8, 0]), torch.tensor([block, 2 * block, block])
    seq_lens = prefix_lens + q_lens
    req_to_token = torch.randperm(60).view(3, 20)
    k_cache, v_cache = torch.randn(60, 2, 8), torch.randn(60, 2, 8)
    query = torch.randn(int(q_lens.sum()), 6, 8)
    backend = object.__new__(TorchNativeAttnBackend)
    backend.extend_block_size = block
    got = attend_from_extend_tokens_only(None, backend, query, torch.full_like(query, float("nan")), k_cache, v_cache,
                                         req_to_token, torch.arange(3), seq_lens, prefix_lens, q_lens, scaling=0.5,
                                         enable_gqa=True)
    want = []
    for row, (queries, prefix) in enumerate(zip(query.split(q_lens.tolist()), prefix_lens.tolist())):
        slots = req_to_token[row, :prefix + len(queries)]
        sees = torch.arange(len(slots))[None, :] < prefix + block * (torch.arange(len(queries))[:, None] // block + 1)
        want.append(torch.nn.functional.scaled_dot_product_attention(
            queries.movedim(0, 1), k_cache[slots].movedim(0, 1), v_cache[slots].movedim(0, 1), attn_mask=sees,
            scale=0.5, enable_gqa=True).movedim(1, 0))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-6, atol=1e-6)
