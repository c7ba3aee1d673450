"""Decoding throughput per stack, block diffusion against AR in the same engine, and concurrency, with held-out
accuracy beside every figure (issue #6 items 1 and 6, issue #15 item 3 "faster than AR in the same engine").

For each stack: the AR base `make demo` trains (plain AR decoding, the engine's own), and the block-diffusion `sft`
and `cap` models converted from it (block 32, threshold 0.95), each served alone with the same prefix-cache setting
(vLLM: off, as the plugin needs; SGLang: its radix cache, on for both); then the first 72 held-out task
instances (8 per family) sent at concurrency 1, 4 and 16, three times each after one warm-up request. Reported per
row: output tokens/s as the median of the three runs with min and max, TPF (tokens per denoising forward, from each
response's accounting), held-out exact-match accuracy of the outputs, and the block-diffusion / AR ratio of the
medians at each concurrency. The reference decoder (the core, PyTorch, KV cache; AR through the core's
`greedy_ar_decode`) runs the same requests as batches of 1, 4 and 16.

    make demo   # once: trains runs/demo/ar-base and runs/nemo/{sft,cap}/hf
    $(python3 tools/envs.py --path core) -m benchmarks.serving_throughput [--stacks reference,vllm,sglang]

Writes results/serving_throughput.{json,png} (about 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import Request, urlopen

from blockdiff.serving import ACCOUNTING_KEY
from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS
from blockdiff_demo.tasks import Task, is_exact
from drivers.servers import free_port, running_server
from drivers.stack_servers import ENV, sglang_command, vllm_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
CONCURRENCY = (1, 4, 16)
LOG_DIR = RESULTS / "serving_logs"
REQUESTS, REPEATS, THRESHOLD = 72, 3, 0.95

Sent = tuple[list[int], int | None]  # output token ids, denoising forwards (None for AR)


def post(url: str, body: dict) -> dict:
    request = Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urlopen(request, timeout=600).read())


def vllm_send(url: str, request: tuple[list[int], int], block_diffusion: bool, threshold: float = THRESHOLD) -> Sent:
    prompt, max_tokens = request
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    if block_diffusion:
        body["vllm_xargs"] = {"threshold": threshold}
    out = post(url + "/v1/completions", body)
    forwards = (out.get("kv_transfer_params") or {}).get("block_diffusion", {}).get("denoise_forwards")
    return out["choices"][0]["token_ids"], forwards


def sglang_send(url: str, request: tuple[list[int], int], block_diffusion: bool, threshold: float = THRESHOLD
                ) -> Sent:
    prompt, max_tokens = request
    sampling = {"temperature": 0, "max_new_tokens": max_tokens}
    if block_diffusion:
        sampling["custom_params"] = {"threshold": threshold}
    out = post(url + "/generate", {"input_ids": prompt, "sampling_params": sampling})
    accounting = (out["meta_info"].get(ACCOUNTING_KEY) or [{}])[0]
    return out["output_ids"], accounting.get("denoise_forwards")


STACKS = {"vllm": (vllm_command, vllm_send, ENV["vllm"]), "sglang": (sglang_command, sglang_send, ENV["sglang"])}


Run = tuple[list[Sent], float]  # one pass over the requests: every response, wall seconds


def timed(send, requests: list[tuple[list[int], int]], concurrency: int) -> Run:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(send, requests))
    return outs, time.perf_counter() - start


def serve_and_measure(stack: str, model: Path, block_diffusion: bool, requests) -> dict[int, list[Run]]:
    command, send, env = STACKS[stack]
    port = free_port()
    log = LOG_DIR / f"{stack}-{model.parent.name if model.name == 'hf' else model.name}.log"
    with running_server(command(model, port, block_diffusion), port, log, env, timeout=600) as url:
        send(url, requests[0], block_diffusion)  # warm-up
        return {c: [timed(lambda r: send(url, r, block_diffusion), requests, c) for _ in range(REPEATS)]
                for c in CONCURRENCY}


def reference_measure(model: Path, requests, eos: int) -> dict[int, list[Run]]:
    from blockdiff.decoding import DecodeParams, ReferenceDecoder, greedy_ar_decode
    from blockdiff.models import BlockDiffusionSettings, load_model

    net, cfg = load_model(model)
    net.eval()
    prompts = [p for p, _ in requests]
    if "block_diffusion" in cfg:
        settings = BlockDiffusionSettings.from_config(cfg)
        decoder = ReferenceDecoder(net, settings.mask_token_id, settings.eos_token_ids)
        params = [DecodeParams(n, settings.block_size, THRESHOLD) for _, n in requests]

        def batch(i: int, j: int) -> list[Sent]:
            return [(r.tokens, r.denoise_forwards) for r in decoder.generate(prompts[i:j], params[i:j])]
    else:

        def batch(i: int, j: int) -> list[Sent]:
            return [(r.tokens, None) for r in greedy_ar_decode(net, prompts[i:j], MAX_ANSWER_TOKENS, (eos,))]
    batch(0, 1)  # warm-up
    runs = {}
    for c in CONCURRENCY:
        runs[c] = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            outs = [sent for i in range(0, len(requests), c) for sent in batch(i, i + c)]
            runs[c].append((outs, time.perf_counter() - start))
    return runs


def exact_match(tasks: list[Task], outputs: list[list[int]], decode, eos: int) -> float:
    """Held-out accuracy: the share of `outputs` (token ids; `eos` dropped, the rest decoded) that answer their task
    exactly."""
    texts = [decode([t for t in ids if t != eos]) for ids in outputs]
    return sum(is_exact(task, text) for task, text in zip(tasks, texts)) / len(tasks)


def summarize(runs: list[Run], tasks: list[Task], decode, eos: int) -> dict:
    """Median, min and max tokens/s over the runs; TPF and accuracy of the first run's outputs, and whether every
    run gave the same tokens."""
    speeds = [sum(len(ids) for ids, _ in outs) / wall for outs, wall in runs]
    outs = runs[0][0]
    forwards = [f for _, f in outs if f is not None]
    tokens = sum(len(ids) for ids, _ in outs)
    return {"output_tokens": tokens, "tokens_per_s": statistics.median(speeds), "min": min(speeds),
            "max": max(speeds), "runs": speeds, "tpf": tokens / sum(forwards) if len(forwards) == len(outs) else None,
            "accuracy": exact_match(tasks, [ids for ids, _ in outs], decode, eos),
            "repeats_identical": all([ids for ids, _ in o] == [ids for ids, _ in outs] for o, _ in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    parser.add_argument("--stacks", default="reference,vllm,sglang")
    args = parser.parse_args()
    from blockdiff.text import EOS, load_tokenizer, special_id
    from blockdiff_demo.corpus import held_out_tasks
    from blockdiff_demo.evaluate import block_aligned_budget

    models = {"ar": args.runs / "demo/ar-base", "sft": args.runs / "nemo/sft/hf", "cap": args.runs / "nemo/cap/hf"}
    for path in models.values():
        if not (path / "config.json").exists():
            raise SystemExit(f"{path} does not exist: run `make demo` first")
    tok = load_tokenizer(models["sft"])
    eos = special_id(tok, EOS)
    tasks = held_out_tasks()[:REQUESTS]
    prompts = [tok.encode(t.prompt).ids for t in tasks]
    # as the demo's evaluation: block-diffusion outputs end on a block boundary, AR stops at EOS within the budget
    budgets = {"ar": [(p, MAX_ANSWER_TOKENS) for p in prompts],
               "bd": [(p, block_aligned_budget(len(p), MAX_ANSWER_TOKENS, 32)) for p in prompts]}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    results = []
    for stack in args.stacks.split(","):
        for name, path in models.items():
            print(f"[{stack}] {name} ...", flush=True)
            requests = budgets["ar" if name == "ar" else "bd"]
            runs = (reference_measure(path, requests, eos) if stack == "reference"
                    else serve_and_measure(stack, path, name != "ar", requests))
            results += [{"stack": stack, "model": name, "concurrency": c, **summarize(r, tasks, tok.decode, eos)}
                        for c, r in runs.items()]
    report(results)


def report(results: list[dict]) -> None:
    ar = {(r["stack"], r["concurrency"]): r["tokens_per_s"] for r in results if r["model"] == "ar"}
    for r in results:
        base = ar.get((r["stack"], r["concurrency"]))
        r["vs_ar"] = r["tokens_per_s"] / base if base and r["model"] != "ar" else None
    print(f"\n{'stack':>10}{'model':>6}{'conc':>6}{'tokens':>8}{'tok/s (min-max)':>22}{'TPF':>7}{'accuracy':>10}"
          f"{'vs AR':>8}")
    for r in results:
        tpf = f"{r['tpf']:.2f}" if r["tpf"] is not None else "-"
        vs = f"{r['vs_ar']:.2f}x" if r["vs_ar"] is not None else "-"
        speed = f"{r['tokens_per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f})"
        print(f"{r['stack']:>10}{r['model']:>6}{r['concurrency']:>6}{r['output_tokens']:>8}{speed:>22}{tpf:>7}"
              f"{r['accuracy']:>10.1%}{vs:>8}" + ("" if r["repeats_identical"] else "  (runs differ)"))
    setup = {"requests_per_level": REQUESTS, "repeats": REPEATS, "max_tokens": MAX_ANSWER_TOKENS,
             "threshold": THRESHOLD, "block_size": 32, "prompts": f"the first {REQUESTS} held-out task instances",
             "machine": "2-core CPU, fp32"}
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
                ax.errorbar([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o",
                            yerr=[[r["tokens_per_s"] - r["min"] for r in mine],
                                  [r["max"] - r["tokens_per_s"] for r in mine]],
                            label=f"{model} ({mine[0]['accuracy']:.0%} right)", capsize=3)
        ax.set(title=stack, xlabel="concurrent requests", ylabel="output tokens/s", xscale="log")
        ax.legend()
    fig.suptitle("Held-out tasks: block diffusion (block 32, threshold 0.95) against AR, median of 3, min-max bars")
    fig.tight_layout()
    fig.savefig(RESULTS / "serving_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
