"""The door of a block-diffusion server: an ASGI middleware both serving plugins put in front of their stack's app.

Before the stack reads or parses a request it refuses, without touching the engine:
- a body over the size limit: 413, from the announced Content-Length before a byte of the body is read, or as soon
  as an unannounced (chunked) body passes the limit, so a huge body costs neither memory nor other requests' time;
- a body that is not a JSON object (invalid JSON, an array, a string, nesting too deep): 400;
- whatever the plugin's `check` finds wrong with the object's fields: 400 naming the field.
Everything else reaches the app untouched, its body replayed as received; an error the app answers (4xx, 5xx) leaves
without the server's file paths and stack frames that some stacks put in their messages. Multipart and form bodies (file
uploads) are only size-checked. Pure ASGI: no stack import.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

MAX_BODY_BYTES_ENV = "BLOCKDIFF_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 128k-token prompt as input_ids is about 0.8 MB of JSON

# a stack frame ('File "/x/y.py", line 3, in f' and the source line under it), or a path to a source file
SERVER_FILES = re.compile(r'\s*File "[^"]*", line \d+, in [^\n]*(\n {4,}[^\n]*)?|(/[\w.+-]+)+\.py\b')

# (path, parsed body) -> (field, message) when the body is refused, else None
BodyCheck = Callable[[str, dict], "tuple[str, str] | None"]


def max_body_bytes() -> int:
    """The limit: `BLOCKDIFF_MAX_BODY_BYTES` (bytes) or 1 MiB."""
    raw = os.environ.get(MAX_BODY_BYTES_ENV, str(DEFAULT_MAX_BODY_BYTES))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_BODY_BYTES_ENV} must be a positive number of bytes, got {raw!r}")
    return int(raw)


def error_body(status: int, field: str | None, message: str) -> bytes:
    """OpenAI's error shape, which vLLM's and SGLang's own 400s use too."""
    kind = {400: "BadRequestError", 413: "RequestTooLargeError"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": field, "code": status}}).encode()


class RequestGuard:
    """ASGI middleware: `RequestGuard(app, check)`; see the module docstring."""

    def __init__(self, app: Callable[..., Awaitable[None]], check: BodyCheck | None = None,
                 limit: int | None = None) -> None:
        self.app, self.check = app, check
        self.limit = max_body_bytes() if limit is None else limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        declared = headers.get("content-length")
        if declared is not None and not declared.strip().isdigit():
            return await refuse(send, 400, "Content-Length", f"Content-Length {declared!r} is not a byte count")
        if declared is not None and int(declared) > self.limit:
            return await refuse(send, 413, "body", too_large(int(declared), self.limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await refuse(send, 413, "body", too_large(size, self.limit, announced=False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get("content-type", "")
        if not content_type.startswith(("multipart/", "application/x-www-form-urlencoded")):
            problem = self.problem(scope["path"], body)
            if problem is not None:
                return await refuse(send, 400, *problem)

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:  # after the body the app only waits for the client to leave
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, scrubbing(send))

    def problem(self, path: str, body: bytes) -> tuple[str, str] | None:
        try:
            parsed: Any = json.loads(body)
        except RecursionError:
            return "body", "the request body nests too deeply"
        except ValueError as e:  # includes UnicodeDecodeError and over-long integer literals
            return "body", f"the request body is not valid JSON: {e}"
        if not isinstance(parsed, dict):
            return "body", f"the request body must be a JSON object, got a JSON {json_type(parsed)}"
        return self.check(path, parsed) if self.check is not None else None


def scrubbing(send: Callable) -> Callable:
    """`send` for the app: error answers (status >= 400, small) are held whole and leave without server files."""
    held: dict = {}

    async def send_scrubbed(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held.update(start=message, body=b"")
            return
        if message["type"] != "http.response.body" or "start" not in held:
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = scrub(held["body"])
        headers = [(k, v) for k, v in held["start"].get("headers", ()) if k.lower() != b"content-length"]
        await send({**held["start"], "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        held.clear()

    return send_scrubbed


def scrub(body: bytes) -> bytes:
    """An error body without stack frames and source paths: in every string of a JSON body, or in plain text."""
    try:
        return json.dumps(_scrubbed(json.loads(body))).encode()
    except ValueError:
        return SERVER_FILES.sub("", body.decode("utf-8", "replace")).encode()


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return SERVER_FILES.sub("", value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    return value


def too_large(size: int, limit: int, announced: bool = True) -> str:
    what = f"{size} bytes" if announced else f"over {limit} bytes"
    return f"the request body is {what}; this server accepts at most {limit} ({MAX_BODY_BYTES_ENV})"


def json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


async def refuse(send: Callable, status: int, field: str | None, message: str) -> None:
    body = error_body(status, field, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
