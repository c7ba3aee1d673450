"""A soak of one server: concurrent clients mixing streaming, non-streaming, abandoned and bad requests for a long
time, counting every fault a client did not cause. Run outside CI (the suites' `soak` marker):

    SOAK_SECONDS=600 python3 tools/test.py vllm -- -m soak -s
    SOAK_SECONDS=600 python3 tools/test.py sglang -- -m soak -s
"""

import collections
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import server_checks
from drivers.servers import group_rss

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CLIENTS = 16

# an action: (name, fn(rng)); fn raises on a fault the client did not cause (a wrong answer, a 5xx, a dropped link)
Action = tuple[str, Callable[[random.Random], None]]


def load(seconds: float, clients: int, actions: list[Action]) -> tuple[collections.Counter, list[str]]:
    """`clients` threads each doing random actions until `seconds` pass. Returns actions done and faults."""
    deadline, done, faults, lock = time.time() + seconds, collections.Counter(), [], threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.time() < deadline:
            name, act = rng.choice(actions)
            try:
                act(rng)
            except Exception as e:  # noqa: BLE001 - every fault is counted and reported, not raised in a thread
                with lock:
                    faults.append(f"{name}: {e!r}"[:400])
            else:
                with lock:
                    done[name] += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return done, faults


def soak(actions: list[Action], rss: Callable[[], int], settle: Callable[[], None]) -> dict:
    """A warm-up of a tenth of the time (the allocators' high-water marks), the server's idle RSS, the soak, the
    idle RSS again. Returns the figures for docs/reliability.md."""
    load(SECONDS / 10, CLIENTS, actions)
    settle()
    before = rss()
    start = time.time()
    done, faults = load(SECONDS, CLIENTS, actions)
    settle()
    after = rss()
    return {"seconds": round(time.time() - start), "clients": CLIENTS, "actions": dict(done),
            "requests": sum(done.values()), "faults": len(faults), "first_faults": faults[:5],
            "rss_mb_before": round(before / 2**20), "rss_mb_after": round(after / 2**20),
            "rss_growth_pct": round(100 * (after - before) / before, 2)}


def soak_server(url: str, requests: list[dict], answer: Callable[[dict], object], leave_mid_block: Callable[[], None],
                refused: list[tuple[str, object, int, str]], settle: Callable[[], None]) -> dict:
    """Soak the server at `url`: load requests (each must equal its lone `answer`), a client that leaves mid-block,
    bad requests (path, body, status, what the answer says). Asserts no fault and RSS growth under 5%."""
    alone = [answer(r) for r in requests]

    def answered_as_alone(rng: random.Random) -> None:
        i = rng.randrange(len(requests))
        assert answer(requests[i]) == alone[i], f"request {i} differs from its lone answer"

    def bad(rng: random.Random) -> None:
        path, body, status, needle = rng.choice(refused)
        got, payload = server_checks.send(url, path, body)
        assert got == status and needle in payload.decode(), payload[:300]

    found = soak([("alone", answered_as_alone), ("left", lambda rng: leave_mid_block()), ("bad", bad)],
                 lambda: group_rss(url), settle)
    assert found["faults"] == 0 and found["rss_growth_pct"] < 5, found
    return found
