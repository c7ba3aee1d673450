"""SGLang's server with this plugin under load and faults: 64 concurrent clients (half streaming) get what each
request gets alone (16 run at a time, the rest queue); clients that vanish mid-block or
time out free their cache; bad input is a 400 naming the field; the server goes on serving after all of it. SGLang's
own idle-time pool check runs in strict mode, so a leaked KV slot stops the scheduler and fails the next request.
One server for the module, plus one with a KV pool too small for its running requests: blocks wait for KV (the
plugin's `stage_whole_blocks_only`; SGLang 0.5.23 alone kills its scheduler there) and every answer equals the
reference decoder's. The figures go to docs/reliability.md."""

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from blockdiff.models import read_config
from decoding_cases import B, MASK, load_requests, make_served_model, reference
from servers import abandon_midway, check_batch_invariance, free_port, metric, running_server
from sglang_cpu import CPU_ENV, launch_command, post

MAX_RUNNING = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with sglang_server(tmp_path_factory.mktemp("served")) as served:
        yield served


@contextlib.contextmanager
def sglang_server(path, *flags: str):
    model, eos = make_served_model(path, "dense")
    port = free_port()
    cmd = launch_command(path, port, "--context-length", "256", "--dllm-algorithm", "BlockDiff",
                         "--max-running-requests", str(MAX_RUNNING), "--enable-metrics", *flags)
    env = CPU_ENV | {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
    with running_server(cmd, port, path / "server.log", env) as url:
        yield {"url": url, "vocab": read_config(path)["vocab_size"], "log": path / "server.log", "model": model,
               "eos": eos}


def body(request: dict) -> dict:
    sampling = {"temperature": request.get("temperature", 0.0), "max_new_tokens": request["max_tokens"],
                "custom_params": {"threshold": request["threshold"]}}
    if "seed" in request:
        sampling["sampling_seed"] = request["seed"]
    return {"input_ids": request["prompt"], "sampling_params": sampling, "stream": bool(request.get("stream"))}


def generate(server, request: dict) -> dict:
    """One request of the load set through /generate, streamed or not: its tokens and finish reason."""
    req = urllib.request.Request(server["url"] + "/generate", json.dumps(body(request)).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        if not request.get("stream"):
            out = json.loads(response.read())
        else:  # server-sent events; each carries the output so far
            events = [line[len(b"data: "):].strip() for line in response if line.startswith(b"data: ")]
            out = json.loads([e for e in events if e != b"[DONE]"][-1])
            if out["meta_info"]["finish_reason"] is None:
                raise ConnectionError(f"the stream ended before the request finished: {out}")
    return {"tokens": out["output_ids"], "finish_reason": out["meta_info"]["finish_reason"]["type"]}


def wait_until_idle(server, timeout: float = 60) -> None:
    """No request running or queued, and every KV slot back in the pool once the radix cache is flushed."""
    deadline = time.time() + timeout
    while True:
        held = {name: metric(server["url"], name) for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs")}
        if not any(held.values()):
            try:  # refused (400) while an aborted request is still being cleaned up
                urllib.request.urlopen(server["url"] + "/flush_cache", timeout=10)
                held["sglang:token_usage"] = metric(server["url"], "sglang:token_usage")
                if not held["sglang:token_usage"]:
                    return
            except urllib.error.HTTPError as e:
                held["flush_cache"] = e.code
        assert time.time() < deadline, f"the server still holds {held}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def figures():
    found = {}
    yield found
    print("\nSGLang reliability figures:", json.dumps(found))


def test_64_concurrent_clients_get_what_each_gets_alone(server, figures):
    requests = load_requests(server["vocab"], 64, seed=1)
    # two loads: the first sets the allocator's high-water mark; the second must not grow memory
    alone, rss = check_batch_invariance(server["url"], lambda r: generate(server, r), requests, 2,
                                        lambda: wait_until_idle(server))
    assert any(a["finish_reason"] == "stop" for a in alone) and any(a["finish_reason"] == "length" for a in alone)
    log = server["log"].read_text()
    assert "memory leak detected" not in log
    queued = max(int(n) for n in re.findall(r"#queue-req: (\d+)", log))
    assert queued >= len(requests) - MAX_RUNNING - 8, "the 64 requests were meant to queue"
    figures.update(requests=3 * len(requests), concurrent=2 * len(requests),
                   streamed=3 * sum(r["stream"] for r in requests), most_queued=queued,
                   rss_mb=[round(r / 2**20) for r in rss])
    assert rss[1] - rss[0] < 0.02 * rss[0], f"the server grew by {(rss[1] - rss[0]) / 2**20:.0f} MB"


def test_clients_that_vanish_mid_block_free_their_cache(server, figures):
    long = body({"prompt": [9, 10, 11], "threshold": 1.0, "max_tokens": 240})  # one token per step: long-running
    # SGLang keeps dLLM requests out of its running batch (num_running_reqs stays 0) and updates its token gauges
    # lazily: the HTTP layer's count of active /generate requests says a request is in flight
    in_flight = 'sglang:http_requests_active{endpoint="/generate"'
    for stream in [False] * 4 + [True] * 4:  # 4 clients leave while their request runs, 4 after the first block
        abandon_midway(server["url"], "/generate", long | {"stream": stream}, in_flight, read_first_event=stream)
    wait_until_idle(server)
    figures.update(disconnected_streams=4, disconnected_clients=4)
    assert generate(server, {"prompt": [5, 6, 7], "threshold": 0.5, "max_tokens": 5})["tokens"]


BAD_REQUESTS = [
    ({"custom_params": {"block_size": 0}}, "block_size"),
    ({"custom_params": {"block_size": 64}}, "block_size"),
    ({"custom_params": {"threshold": 1.5}}, "threshold"),
    ({"custom_params": {"threshold": -0.1}}, "threshold"),
    ({"custom_params": {"fallback_k": 0}}, "fallback_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"top_p": 0.9}, "top_p"),
    ({"top_k": 5}, "top_k"),
    ({"n": 3}, "n=3 is not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({}, "logprob", {"return_logprob": True}),
    ({}, "input_ids", {"input_ids": []}),
    ({}, "the prompt is empty", {"input_ids": None, "text": ""}),
    ({}, "out of vocabulary", {"input_ids": [5, 10**6]}),
    ({}, "input_ids[1]=-1 is out of vocabulary", {"input_ids": [5, -1]}),
    ({}, "mask token (id 1) at position 1", {"input_ids": [5, MASK, 7]}),
    ({}, "context length", {"input_ids": [5] * 300}),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[1] for c in BAD_REQUESTS])
def test_bad_input_is_a_400_naming_the_field(server, case):
    sampling, needle, top = case[0], case[1], (case[2] if len(case) > 2 else {})
    request = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 5, **sampling}, **top}
    request = {k: v for k, v in request.items() if v is not None}
    with pytest.raises(urllib.error.HTTPError) as err:
        post(server["url"], request)
    message = err.value.read().decode()
    assert 400 <= err.value.code < 500 and needle in message, message


def test_after_all_of_it_the_server_is_idle_and_serving(server, figures):
    wait_until_idle(server)
    assert generate(server, {"prompt": [5, 6, 7], "threshold": 0.5, "max_tokens": 5})["tokens"]
    assert "memory leak detected" not in server["log"].read_text()
    figures.update(bad_inputs=len(BAD_REQUESTS), lost=0)


def test_an_exhausted_kv_pool_makes_requests_wait_and_all_complete(tmp_path, figures):
    with sglang_server(tmp_path, "--max-total-tokens", "512") as served:
        # every request runs to 64 tokens (3-5 blocks) unless it meets an EOS: 16 of them need over 2,000 slots
        requests = [r | {"max_tokens": 64} for r in load_requests(served["vocab"], 32, seed=1)]
        need = sorted(-(-(len(r["prompt"]) + r["max_tokens"]) // B) * B for r in requests)
        assert sum(need[-MAX_RUNNING:]) > 512, "the pool was meant to be too small for the running requests"
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: generate(served, r), requests))
        expected = [{"tokens": r["tokens"], "finish_reason": r["finish_reason"]}
                    for r in reference(served["model"], served["eos"], requests)]
        assert together == expected
        wait_until_idle(served)
        assert generate(served, {"prompt": [5, 6, 7], "threshold": 0.5, "max_tokens": 5})["tokens"]
        assert "memory leak detected" not in served["log"].read_text()
        figures.update(short_pool_tokens=512, short_pool_requests=len(requests),
                       short_pool_need_of_16_running=sum(need[-MAX_RUNNING:]))
