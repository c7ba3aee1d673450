"""This project's vLLM plugin over the conformance cases (vllm venv), offline (`LLM`) or through
`blockdiff-vllm-serve` with the OpenAI client. One engine per served model, in its own process; a batch is one
`generate` call offline, concurrent requests on the server (chat cases through its chat endpoint, so offline runs
none).

    python -m conformance.runners.vllm_stack {offline,server} CASES.json OUT.json
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blockdiff.serving import ACCOUNTING_KEY
from conformance.compare import NO_CHAT_ENDPOINT, is_chat
from conformance.run import model_time

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def record(token_ids, finish_reason, accounting) -> dict:
    return {"tokens": list(token_ids), "finish_reason": finish_reason,
            "denoise_forwards": accounting["denoise_forwards"], "nfe": accounting["nfe"]}


def offline(path: str, cases: list[dict]) -> dict:
    from drivers.vllm_engine import make_llm, run_batches

    results = run_batches(make_llm(path), [case["batch"] for case in cases])
    return {case["id"]: batch for case, batch in zip(cases, results)}


def server(path: str, cases: list[dict]) -> dict:
    import openai

    from drivers.servers import free_port, running_server

    port = free_port()
    cmd = [str(Path(sys.executable).with_name("blockdiff-vllm-serve")), path, "--served-model-name", "m", "--dtype",
           "float32", "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)]
    records = {}
    with running_server(cmd, port, Path(path) / "vllm-server.log", ENV) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def complete(r):
            sent = {"model": "m", "max_tokens": r["max_tokens"], "temperature": 0,
                    "extra_body": {"vllm_xargs": {"threshold": r["threshold"]}, "return_token_ids": True}}
            if "messages" in r:  # vLLM renders the checkpoint's chat template itself
                out = client.chat.completions.create(messages=r["messages"], **sent)
            else:
                out = client.completions.create(prompt=r["prompt"], **sent)
            return record(out.choices[0].token_ids, out.choices[0].finish_reason,
                          out.kv_transfer_params[ACCOUNTING_KEY])

        for case in cases:
            with ThreadPoolExecutor(len(case["batch"])) as pool:
                records[case["id"]] = list(pool.map(complete, case["batch"]))
    return records


def main() -> None:
    mode, cases_path, out_path, *one = sys.argv[1:]
    spec = json.loads(Path(cases_path).read_text())
    # chat cases go through chat endpoints: offline they are recorded as not run, which the comparison shows
    runs = [c for c in spec["cases"] if mode == "server" or not is_chat(c)]
    not_run = {c["id"]: NO_CHAT_ENDPOINT for c in spec["cases"] if c not in runs}
    if one:  # a single model, in this process
        name = one[0]
        run = offline if mode == "offline" else server
        records = run(spec["models"][name], [c for c in runs if c["model"] == name])
        Path(out_path).write_text(json.dumps(records))
        return
    records = dict(not_run)
    for name in dict.fromkeys(c["model"] for c in runs):
        part = Path(out_path).with_suffix(f".{name}.json")
        with model_time(name):
            done = subprocess.run([sys.executable, "-m", __spec__.name, mode, cases_path, str(part), name],
                                  env={**os.environ, **ENV}, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"vllm {mode} failed on {name}:\n{done.stderr[-3000:]}")
        records.update(json.loads(part.read_text()))
    Path(out_path).write_text(json.dumps(records))


if __name__ == "__main__":
    main()
