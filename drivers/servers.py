"""A serving stack's HTTP server as a test fixture: started once, waited for on /health, its log in the failure
message, and its whole process group stopped at the end (servers spawn engine processes)."""

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from drivers.processes import group_stats

_PROCESS_GROUPS: dict[str, int] = {}  # base URL -> the server's process group, for group_rss

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEALTH_PROBE_TIMEOUT = 60  # seconds; the overall `timeout` still bounds the wait


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 300) -> Iterator[str]:
    """Run `cmd` (which must listen on 127.0.0.1:`port`); yields its base URL once /health answers."""
    log = open(log_path, "w")
    # A process group of its own (stopped as one) but the caller's session: on a kernel with scheduler autogroups a
    # new session is a scheduling group of its own, and vLLM-CPU's sched_yield spin then starves the clients for
    # seconds (docs/environments.md).
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            process_group=0)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                # SGLang answers /health by generating one token (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION), which on a
                # block-diffusion server denoises a whole block: its log had one every 3 s for SmolLM2-135M on this
                # CPU (2026-12-07 evening), and a probe that gave up after 2 s never saw the server up
                urllib.request.urlopen(url + "/health", timeout=HEALTH_PROBE_TIMEOUT)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"{cmd[0]} not up in {timeout:.0f} s:\n{log_path.read_text()[-4000:]}") from None
                time.sleep(1)
        _PROCESS_GROUPS[url] = proc.pid
        yield url
    finally:
        _PROCESS_GROUPS.pop(url, None)
        if proc.poll() is None:  # a server that exited by itself has no group left to stop
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def paused(urls: list[str]) -> Iterator[None]:
    """The servers at `urls` stopped (SIGSTOP to each process group, waited for) until the block ends: an idle SGLang
    scheduler polls, and takes CPU from a server measured beside it."""
    for url in urls:
        os.killpg(_PROCESS_GROUPS[url], signal.SIGSTOP)
    deadline = time.time() + 10
    while any(fields[0] not in "TZ" for url in urls for fields in group_stats(_PROCESS_GROUPS[url]).values()):
        if time.time() > deadline:
            raise RuntimeError(f"the servers at {urls} did not stop in 10 s")
        time.sleep(0.01)
    try:
        yield
    finally:
        for url in urls:
            os.killpg(_PROCESS_GROUPS[url], signal.SIGCONT)


def group_pids(url: str) -> list[int]:
    """The processes of the server at `url` (API server, engine, workers)."""
    return sorted(group_stats(_PROCESS_GROUPS[url]))


def group_rss(url: str) -> int:
    """Resident bytes of every process of the server at `url` (API server, engine, workers), read from /proc."""
    stats = group_stats(_PROCESS_GROUPS[url]).values()
    return sum(int(fields[21]) * os.sysconf("SC_PAGE_SIZE") for fields in stats)  # field 24 of stat


def metric(url: str, name: str) -> float:
    """The sum over labels of Prometheus metric `name` on the server's /metrics page; `name` may end with leading
    labels to select on (`'sglang:http_requests_active{endpoint="/generate"'`)."""
    prefix = name if "{" in name else name + "{"
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    if not values:  # a renamed or unlabelled metric must fail the check that reads it, not read as 0
        raise LookupError(f"no metric {name!r} on {url}/metrics")
    return sum(values)


def check_batch_invariance(url: str, send, requests: list[dict], passes: int, settle) -> tuple[list[dict], list[int]]:
    """Serve each request alone, then all at once `passes` times (each pass must equal the lone answers, then
    `settle()` waits for the server to go idle). Returns the lone answers and the server's RSS after each pass."""
    alone = [send(r) for r in requests]
    rss = []
    for _ in range(passes):
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(send, requests))
        assert together == alone
        settle()
        rss.append(group_rss(url))
    return alone, rss


def abandon_midway(url: str, path: str, body: dict, running_metric: str, read_first_event: bool = False) -> None:
    """A client that vanishes while its request is known to be in flight: POST `body` to `path`, then, streaming
    (`read_first_event`), read the first event (a committed block, so the request runs) and drop the connection
    without reading the rest; not streaming, drop it once the server's `running_metric` is positive (it counts the
    request running, or its KV in use). A loaded server can finish a short request between two polls of the metric;
    then the client did not leave mid-request, so it tries again (at most 5 times). No timing guesses."""
    host, port = url.removeprefix("http://").split(":")
    for _ in range(5):
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        if read_first_event:
            response = conn.getresponse()
            assert response.status == 200, response.read()[:500]
            while not (line := response.readline()).startswith(b"data: "):
                assert line, "the stream ended before its first event"
            conn.close()
            return
        deadline = time.time() + 60
        while metric(url, running_metric) <= 0:
            if select.select([conn.sock], [], [], 0)[0]:  # answered before it was ever seen running
                response = conn.getresponse()
                assert response.status == 200, response.read()[:500]
                response.read()
                break
            assert time.time() < deadline, f"the request never showed up in {running_metric} nor was answered"
            time.sleep(0.02)
        else:
            conn.close()
            return
        conn.close()
    raise AssertionError(f"5 requests finished before {running_metric} ever counted them: none was left mid-flight")
