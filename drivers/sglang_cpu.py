"""How the sglang suite (and the conformance runner) launches SGLang's server on this CPU (see
docs/environments.md) and sends it block-diffusion requests."""

import json
import sys
import urllib.request
from pathlib import Path

from blockdiff.serving import ACCOUNTING_KEY

CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
             "--dtype", "float32", "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill",
             "disabled", "--skip-server-warmup", "--host", "127.0.0.1"]


def launch_command(model: Path, port: int, *flags: str) -> list[str]:
    """The server on `model` with `flags`; its KV pool capped at 16,384 slots unless `flags` say otherwise (on CPU
    SGLang sizes it from free RAM: 15.8M slots, 15 GB and a minute to allocate for a toy model)."""
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--port", str(port),
            "--max-total-tokens", "16384", *flags, *CPU_FLAGS]


def post(url: str, body: dict, endpoint: str = "/generate") -> dict:
    req = urllib.request.Request(url + endpoint, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())


def generate(url: str, request: dict) -> dict:
    """POST /generate for a request of the shared cases (prompt, threshold, max_tokens, optional temperature and
    seed); returns the reference's fields, `nfe`, and SGLang's meta_info."""
    sampling = {"temperature": request.get("temperature", 0.0), "max_new_tokens": request["max_tokens"],
                "custom_params": {"threshold": request["threshold"]}}
    if "seed" in request:
        sampling["sampling_seed"] = request["seed"]
    out = post(url, {"input_ids": request["prompt"], "sampling_params": sampling})
    meta = out["meta_info"]
    accounting = (meta.get(ACCOUNTING_KEY) or [{}])[0]  # empty for SGLang's own algorithms
    return {"tokens": out["output_ids"], "finish_reason": meta["finish_reason"]["type"],
            "denoise_forwards": accounting.get("denoise_forwards"), "nfe": accounting.get("nfe"), "meta": meta}


def chat(url: str, request: dict) -> dict:
    """POST /v1/chat/completions for a chat request of the shared cases (messages, threshold, max_tokens), greedy:
    SGLang renders the checkpoint's chat template; returns the reference's fields and `nfe`."""
    out = post(url, {"model": "m", "messages": request["messages"], "max_tokens": request["max_tokens"],
                     "temperature": 0, "custom_params": {"threshold": request["threshold"]}, "return_token_ids": True},
               "/v1/chat/completions")
    choice, accounting = out["choices"][0], out["metadata"][ACCOUNTING_KEY]
    return {"tokens": choice["response_token_ids"], "finish_reason": choice["finish_reason"],
            "denoise_forwards": accounting["denoise_forwards"], "nfe": accounting["nfe"]}
