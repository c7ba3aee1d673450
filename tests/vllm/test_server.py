"""`blockdiff-vllm-serve` (vLLM's OpenAI-compatible server with this plugin) through the OpenAI client library: the
same tokens as the core reference, usage and accounting fields, streaming one committed block per chunk, concurrent
requests, and 400s that name the bad parameter. One server for the module."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from blockdiff.text import CHAT_TEMPLATE, apply_chat_template
from drivers.servers import abandon_midway, free_port, metric, running_server
from tiny_models import make_tiny_blockdiff_model, reference_decode
from vllm_blockdiff.engine import server_args

MASK = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    model = make_tiny_blockdiff_model(path, "dense")
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("blockdiff-vllm-serve")), str(path), "--served-model-name", "tiny",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1",
           "--port", str(port)]
    with running_server(cmd, port, path / "server.log", {"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        yield {"url": url, "client": client, "model": model, "path": path,
               "tokenizer": AutoTokenizer.from_pretrained(path)}


def reference(server, prompt: list[int], max_tokens: int, threshold: float = 0.95):
    return reference_decode(server["model"], prompt, max_tokens, threshold)


def complete(server, prompt, max_tokens: int, threshold: float = 0.95, **kwargs):
    return server["client"].completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"vllm_xargs": {"threshold": threshold}, "return_token_ids": True}, **kwargs)


def test_completion_matches_the_reference_with_usage_and_accounting(server):
    prompt = [5, 17, 42, 99, 3, 8] * 7  # 42 tokens: one full block and a tail
    out = complete(server, prompt, 45, threshold=0.5)
    want = reference(server, prompt, 45, 0.5)
    choice = out.choices[0]
    assert choice.token_ids == want.tokens and choice.finish_reason == want.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(want.tokens))
    accounting = out.kv_transfer_params["block_diffusion"]
    assert accounting["denoise_forwards"] == want.denoise_forwards
    assert accounting["tpf"] == pytest.approx(len(want.tokens) / want.denoise_forwards)


def test_text_prompt_and_chat_match_the_reference(server):
    tok = server["tokenizer"]
    text = "def f(x):\n    return"
    out = complete(server, text, 20)
    want = reference(server, tok.encode(text), 20)
    assert out.choices[0].token_ids == want.tokens
    messages = [{"role": "user", "content": "class A:"}]
    chat = server["client"].chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                    extra_body={"return_token_ids": True})
    want = reference(server, tok.encode(apply_chat_template(CHAT_TEMPLATE, messages, True)), 20)
    # token ids, not text: a random model's byte-level tokens need not form valid UTF-8
    assert chat.choices[0].token_ids == want.tokens and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens == len(want.tokens)


def test_streaming_sends_one_committed_block_per_chunk(server):
    prompt = list(range(2, 12))  # 10 tokens: the first block holds 22 generated tokens
    want = reference(server, prompt, 70)
    chunks = [c.choices[0] for c in complete(server, prompt, 70, stream=True) if c.choices]
    pieces = [c.token_ids for c in chunks if c.token_ids]
    assert [len(p) for p in pieces] == [22, 32, 16]
    assert sum(pieces, []) == want.tokens
    assert chunks[-1].finish_reason == "length"


def test_eight_concurrent_requests_match_the_reference(server):
    prompts = [[2 + i] * (3 + 9 * i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: complete(server, p, 40, threshold=0.7), prompts))
    for prompt, out in zip(prompts, outs):
        want = reference(server, prompt, 40, 0.7)
        assert out.choices[0].token_ids == want.tokens and out.choices[0].finish_reason == want.finish_reason


@pytest.mark.parametrize("kwargs,needle", [
    ({"top_p": 0.5}, "top_p"),
    ({"logprobs": 2}, "logprobs"),
    ({"n": 2}, "n=2"),
    ({"extra_body": {"vllm_xargs": {"threshold": 2}}}, "threshold must be a number in [0, 1]"),
    ({"extra_body": {"vllm_xargs": {"block_size": 64}}}, "block_size 64 differs from the served block size 32"),
    ({"prompt": [5, MASK, 7]}, "mask token (id 1) at position 1"),
])
def test_bad_requests_get_a_400_naming_the_problem(server, kwargs, needle):
    request = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        server["client"].completions.create(**request)
    assert err.value.status_code == 400 and needle in str(err.value)
    assert complete(server, [5, 6, 7], 3).choices[0].token_ids  # the server goes on serving


def test_a_cancelled_stream_frees_its_kv_cache(server):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400, "stream": True,
            "vllm_xargs": {"threshold": 1.0}}  # one token per step: long-running
    abandon_midway(server["url"], "/v1/completions", body, "vllm:num_requests_running", read_first_event=True)
    deadline = time.time() + 60
    while metric(server["url"], "vllm:num_requests_running") or metric(server["url"], "vllm:kv_cache_usage_perc"):
        assert time.time() < deadline, "the cancelled request still holds KV cache"
        time.sleep(0.5)
    assert complete(server, [5, 6, 7], 3).choices[0].token_ids


# The plugin as flags on the server vLLM users already run (plugins/vllm_blockdiff/README.md shows this command)
OWN_LAUNCHER_FLAGS = ["--scheduler-cls", "vllm_blockdiff.scheduler.BlockDiffusionScheduler",
                      "--worker-cls", "vllm_blockdiff.worker.BlockDiffusionWorker", "--no-enable-prefix-caching",
                      "--no-async-scheduling", "--middleware", "blockdiff.http_guard.RequestGuard"]


def test_vllms_own_launcher_with_the_plugins_flags_serves_block_diffusion(server, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` with the documented flags (the ones `blockdiff-vllm-serve`
    adds) answers with the reference decoder's tokens and accounting, as the console script does."""
    assert OWN_LAUNCHER_FLAGS == server_args()
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(server["path"]),
           "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
           "--host", "127.0.0.1", "--port", str(port), *OWN_LAUNCHER_FLAGS]
    with running_server(cmd, port, tmp_path / "server.log", {"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        prompt = [5, 17, 42, 99, 3, 8] * 7
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=45, temperature=0,
                                        extra_body={"vllm_xargs": {"threshold": 0.5}, "return_token_ids": True})
    want = reference(server, prompt, 45, 0.5)
    assert out.choices[0].token_ids == want.tokens
    assert out.kv_transfer_params["block_diffusion"]["denoise_forwards"] == want.denoise_forwards
