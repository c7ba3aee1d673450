"""The request guard both servers run behind, driven as the ASGI server drives it."""

import asyncio
import json

from blockdiff.http_guard import MAX_BODY_BYTES_ENV, RequestGuard, scrub


def call(guard: RequestGuard, body_parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[dict, list]:
    """One POST through `guard`; returns what the app received and what went back to the client."""
    seen, sent = {}, []
    incoming = [{"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
                for i, part in enumerate(body_parts)]

    async def app(scope, receive, send):
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    guard.app = app
    asyncio.run(guard({"type": "http", "method": "POST", "path": "/generate", "headers": headers}, receive, send))
    return seen, sent


def answer(sent: list) -> tuple[int, dict]:
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_an_announced_large_body_is_refused_before_a_byte_is_read():
    guard = RequestGuard(None, limit=100)
    seen, sent = call(guard, [], [(b"content-length", b"20000000")])
    status, error = answer(sent)
    assert (status, seen) == (413, {}) and MAX_BODY_BYTES_ENV in error["error"]["message"]


def test_an_unannounced_large_body_is_refused_once_past_the_limit():
    seen, sent = call(RequestGuard(None, limit=100), [b"x" * 60] * 5, [])
    assert answer(sent)[0] == 413 and seen == {}


def test_json_that_is_not_an_object_and_the_plugins_check_are_400s_naming_the_field():
    def check(path, body):
        return ("sampling_params", "sampling_params must be an object") if body.get("sampling_params") == 1 else None

    guard = RequestGuard(None, check=check, limit=20000)
    for body, field, needle in [(b"[1]", "body", "got a JSON array"), (b"{", "body", "not valid JSON"),
                                (b"[" * 5000 + b"]" * 5000, "body", "nests too deeply"),
                                (b'{"sampling_params": 1}', "sampling_params", "must be an object")]:
        seen, sent = call(guard, [body], [])
        status, error = answer(sent)
        assert (status, error["error"]["param"], seen) == (400, field, {}) and needle in error["error"]["message"]


def test_a_good_body_reaches_the_app_whole():
    body = json.dumps({"text": "def f", "sampling_params": {"max_new_tokens": 3}}).encode()
    seen, sent = call(RequestGuard(None, check=lambda path, parsed: None), [body[:5], body[5:]], [])
    assert seen == {"body": body} and sent[0]["status"] == 200


def test_error_answers_leave_without_server_files():
    leaked = {"message": 'bad max_tokens\n\n  File "/root/venv/site-packages/x/http_server.py", line 1860, in f\n'
                         "    POST /v1/completions\nsee /usr/lib/python3.11/json/decoder.py", "code": 400}
    assert json.loads(scrub(json.dumps(leaked).encode())) == {"message": "bad max_tokens\nsee ", "code": 400}
