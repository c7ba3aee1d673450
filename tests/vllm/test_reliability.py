"""`blockdiff-vllm-serve` under load and faults: 64 concurrent clients (half streaming) get what each request gets
alone while a KV cache too small for them forces preemptions; clients that vanish mid-block or time out free their
cache; bad input is a 400 naming the field; and the server goes on serving after all of it. One server for the
module; the figures go to docs/reliability.md."""

import json
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from blockdiff.models import read_config
from decoding_cases import MASK, load_requests, make_served_model
from servers import abandon_midway, check_batch_invariance, free_port, metric, running_server

KV_PAGES = 24  # pages of 32 tokens: the 64 requests need ~200 together, one request at most 8 (256 tokens)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    make_served_model(path, "dense")
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("blockdiff-vllm-serve")), str(path), "--served-model-name", "tiny",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--block-size", "32", "--num-gpu-blocks-override",
           str(KV_PAGES), "--host", "127.0.0.1", "--port", str(port)]
    # oneDNN keeps a compiled kernel per GEMM shape (up to 1024, bounded): off, so RSS shows what requests hold
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    # no keep-alive: a connection the server closes as idle just as the client reuses it is a client-side race
    http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=600)
    with running_server(cmd, port, path / "server.log", env) as url:
        yield {"url": url, "vocab": read_config(path)["vocab_size"],
               "client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)}


def complete(server, request: dict, **client_kwargs) -> dict:
    """One request of the load set through the OpenAI client, streamed or not: its tokens and finish reason."""
    extra = {"vllm_xargs": {"threshold": request["threshold"]}, "return_token_ids": True}
    kwargs = {"model": "tiny", "prompt": request["prompt"], "max_tokens": request["max_tokens"],
              "temperature": request.get("temperature", 0.0), "seed": request.get("seed"), "extra_body": extra}
    client = server["client"].with_options(**client_kwargs) if client_kwargs else server["client"]
    if not request.get("stream"):
        choice = client.completions.create(**kwargs).choices[0]
        return {"tokens": choice.token_ids, "finish_reason": choice.finish_reason}
    tokens, finish = [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            tokens += choice.token_ids or []
            finish = choice.finish_reason or finish
    return {"tokens": tokens, "finish_reason": finish}


def wait_until_idle(server, timeout: float = 60) -> None:
    """No request running or waiting and no KV page held, or fail naming what is still held."""
    deadline = time.time() + timeout
    while True:
        held = {name: metric(server["url"], name) for name in
                ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")}
        if not any(held.values()):
            return
        assert time.time() < deadline, f"the server still holds {held}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def figures():
    """What the module measured, printed at its end for docs/reliability.md."""
    found = {}
    yield found
    print("\nvLLM reliability figures:", json.dumps(found))


def test_64_concurrent_clients_get_what_each_gets_alone(server, figures):
    requests = load_requests(server["vocab"], 64, seed=1)
    preempted_before = metric(server["url"], "vllm:num_preemptions_total")
    # three loads: the first sets the allocator's high-water mark; later ones must not grow memory
    alone, rss = check_batch_invariance(server["url"], lambda r: complete(server, r), requests, 3,
                                        lambda: wait_until_idle(server))
    assert any(a["finish_reason"] == "stop" for a in alone) and any(a["finish_reason"] == "length" for a in alone)
    preemptions = metric(server["url"], "vllm:num_preemptions_total") - preempted_before  # how many: timing
    growth = rss[-1] - rss[0]
    figures.update(requests=4 * len(requests), concurrent=3 * len(requests),
                   streamed=4 * sum(r["stream"] for r in requests), preemptions=int(preemptions),
                   rss_mb=[round(r / 2**20) for r in rss])
    assert growth < 0.02 * rss[0], f"the server grew by {growth / 2**20:.0f} MB between identical loads"


def test_an_exhausted_kv_cache_preempts_and_recovers(server, figures):
    """8 requests that each grow to 8 pages, on 24: all are admitted (2 pages each at first), so however they
    interleave the cache runs out and vLLM must preempt; each still gets what it gets alone."""
    requests = [{"prompt": [9, 10, 11 + i], "threshold": 1.0, "max_tokens": 240} for i in range(8)]
    preempted_before = metric(server["url"], "vllm:num_preemptions_total")
    check_batch_invariance(server["url"], lambda r: complete(server, r), requests, 1, lambda: wait_until_idle(server))
    preemptions = metric(server["url"], "vllm:num_preemptions_total") - preempted_before
    assert preemptions > 0, "the KV cache was meant to run out; nothing was preempted"
    figures.update(exhaustion_requests=2 * len(requests), exhaustion_preemptions=int(preemptions))


def test_clients_that_vanish_mid_block_free_their_cache(server, figures):
    long = {"model": "tiny", "prompt": [9, 10, 11], "max_tokens": 240, "vllm_xargs": {"threshold": 1.0}}
    for _ in range(4):  # non-streaming clients that leave while their request runs
        abandon_midway(server["url"], "/v1/completions", long, "vllm:num_requests_running")
    for _ in range(4):  # streaming clients that read the first committed block and leave during the second
        abandon_midway(server["url"], "/v1/completions", long | {"stream": True}, "vllm:num_requests_running",
                       read_first_event=True)
    wait_until_idle(server)
    figures.update(disconnected_streams=4, disconnected_clients=4)
    assert complete(server, {"prompt": [5, 6, 7], "threshold": 0.5, "max_tokens": 5})["tokens"]


BAD_REQUESTS = [
    ({"extra_body": {"vllm_xargs": {"block_size": 0}}}, "block_size"),
    ({"extra_body": {"vllm_xargs": {"block_size": 64}}}, "block_size"),
    ({"extra_body": {"vllm_xargs": {"threshold": 1.5}}}, "threshold"),
    ({"extra_body": {"vllm_xargs": {"threshold": -0.1}}}, "threshold"),
    ({"extra_body": {"vllm_xargs": {"fallback_k": 0}}}, "fallback_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.9}, "top_p"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"n": 3}, "n=3"),
    ({"logprobs": 1}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": []}, "at least one prompt"),
    ({"prompt": ""}, "prompt or prompt_embeds must be provided and non-empty"),
    ({"prompt": [5, 10**6]}, "out of vocabulary"),
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [5, MASK, 7]}, "mask token (id 1) at position 1"),
    ({"prompt": [5] * 300}, "maximum context length is 256"),
]


@pytest.mark.parametrize("change,needle", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_bad_input_is_a_400_naming_the_field(server, change, needle):
    request = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5, **change}
    with pytest.raises(openai.BadRequestError) as err:
        server["client"].completions.create(**request)
    assert err.value.status_code == 400 and needle in str(err.value), str(err.value)


def test_after_all_of_it_the_server_is_idle_and_serving(server, figures):
    wait_until_idle(server)
    assert complete(server, {"prompt": [5, 6, 7], "threshold": 0.5, "max_tokens": 5})["tokens"]
    figures.update(bad_inputs=len(BAD_REQUESTS), lost=0)
