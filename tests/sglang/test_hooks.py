"""The scheduler hook that drops the KV of a request's ended last block, on stand-ins for SGLang's request and pools
(the served path is tests/sglang/test_blockdiff.py::test_a_prompt_that_continues_an_output_reads_no_stale_kv), and the
CPU attention hook against SGLang's own torch-native attention (served: the conformance matrix)."""

from types import SimpleNamespace

import pytest
import torch

from sglang_blockdiff.hooks import attend_from_extend_queries_only, drop_stale_block_kv


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


def attention_case(prefix: int, extend: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    """A pool holding one request's prefix and extend KV at scattered slots, and the extend's queries."""
    torch.manual_seed(prefix + extend)
    k_cache, v_cache = torch.randn(100, kv_heads, dim), torch.randn(100, kv_heads, dim)
    req_to_token = torch.zeros(2, 100, dtype=torch.long)
    req_to_token[1, : prefix + extend] = torch.randperm(100)[: prefix + extend]
    return (torch.randn(extend, heads, dim), k_cache, v_cache, req_to_token, torch.tensor([1]),
            torch.tensor([prefix + extend]), torch.tensor([prefix]), torch.tensor([extend]))


@pytest.mark.parametrize("prefix", [0, 32, 45])
def test_non_causal_extend_attends_from_its_own_queries_as_sglangs_padded_queries_do(prefix):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    query, *pools = attention_case(prefix, 32)
    sglang_own = TorchNativeAttnBackend._run_sdpa_forward_extend(None, query, torch.empty_like(query), *pools,
                                                                  enable_gqa=True, causal=False)
    ours = attend_from_extend_queries_only(None, None, query, torch.empty_like(query), *pools, enable_gqa=True,
                                           causal=False)
    torch.testing.assert_close(ours, sglang_own, rtol=1e-5, atol=1e-6)


def test_causal_attention_is_sglangs_own():
    calls = []
    query, *pools = attention_case(32, 32)
    out = attend_from_extend_queries_only(lambda *a, **k: calls.append(k["causal"]) or "sglang's", None, query,
                                          torch.empty_like(query), *pools, enable_gqa=True, causal=True)
    assert out == "sglang's" and calls == [True]
