"""The commit forward fused into the next block's first denoising step, against a commit forward of its own (issue
#16 item 1), in the reference decoder and in SGLang's server with this plugin, on the CAP model `make demo` trains.

The 180 held-out task instances, threshold 0.95, block sizes 8, 16 and 32 (the answers are 2-15 tokens, so with small
blocks most requests finish several blocks and pay commit forwards), one request at a time and 16 at once (the
reference: batches of 16; SGLang: 16 concurrent requests); the same requests decoded fused and unfused
(`ReferenceDecoder(fuse_commit=...)`; two SGLang servers side by side with `fuse_commit: true` / `false` and the block
size in `--dllm-algorithm-config`; the one not measured is paused, as an idle SGLang scheduler polls and would take a
core), three times each, alternating. Reported: held-out accuracy (the outputs are asserted identical), forwards per
request (`nfe`) for each path, tokens/s median (min-max) and the fused path's gain.

    make demo   # once: trains runs/nemo/cap/hf
    $(python3 tools/envs.py --path core) -m benchmarks.fused_commit [--stacks reference,sglang]

Writes results/fused_commit.json (about 6 minutes; the reference alone about 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from benchmarks.serving_throughput import exact_match
from blockdiff.serving import ACCOUNTING_KEY
from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS, block_aligned_budget
from drivers.servers import free_port, paused, running_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
BLOCK_SIZES, BATCHES, REPEATS, THRESHOLD = (8, 16, 32), (1, 16), 3, 0.95
STACKS = ("reference", "sglang")

Decode = Callable[[int], list]  # batch or concurrency -> one result per prompt (tokens, finish, denoise_forwards, nfe)


def span(speed: dict) -> str:
    return f"{speed['median']:.0f} ({speed['min']:.0f}-{speed['max']:.0f})"


def compare(stack: str, block: int, batch: int, decoders: dict[bool, Decode], score: Callable[[list], float]) -> dict:
    """Both paths over every prompt, alternating, `REPEATS` times; a row of the table."""
    speeds, results = {True: [], False: []}, {}
    for _ in range(REPEATS):
        for fused, decode in decoders.items():
            start = time.perf_counter()
            results[fused] = decode(batch)
            speeds[fused].append(sum(len(r.tokens) for r in results[fused]) / (time.perf_counter() - start))
    if [(r.tokens, r.finish_reason, r.denoise_forwards) for r in results[True]] != \
            [(r.tokens, r.finish_reason, r.denoise_forwards) for r in results[False]]:
        raise SystemExit(f"{stack}, block {block}, batch {batch}: the fused and unfused outputs differ")
    row = {"stack": stack, "block_size": block, "batch": batch, "accuracy": score(results[True]),
           "nfe_per_request": {k: sum(r.nfe for r in v) / len(v) for k, v in
                               (("fused", results[True]), ("unfused", results[False]))},
           "tokens_per_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                            for k, v in (("fused", speeds[True]), ("unfused", speeds[False]))}}
    row["gain"] = row["tokens_per_s"]["fused"]["median"] / row["tokens_per_s"]["unfused"]["median"]
    fused, unfused = (span(row["tokens_per_s"][k]) for k in ("fused", "unfused"))
    print(f"{stack:>10}{block:>6}{batch:>6}{row['accuracy']:>10.1%}{row['nfe_per_request']['fused']:>15.2f}"
          f"{row['nfe_per_request']['unfused']:>9.2f}{fused:>24}{unfused:>22}{row['gain']:>6.2f}x", flush=True)
    return row


def reference_rows(path: Path, prompts: list[list[int]], score: Callable[[list], float]) -> list[dict]:
    from blockdiff.decoding import DecodeParams, ReferenceDecoder
    from blockdiff.models import BlockDiffusionSettings, load_model

    net, cfg = load_model(path)
    net.eval()
    settings = BlockDiffusionSettings.from_config(cfg)
    rows = []
    for block in BLOCK_SIZES:
        params = [DecodeParams(block_aligned_budget(len(p), MAX_ANSWER_TOKENS, block), block, THRESHOLD)
                  for p in prompts]
        decoders = {fused: in_batches(ReferenceDecoder(net, settings.mask_token_id, settings.eos_token_ids,
                                                       fuse_commit=fused), prompts, params) for fused in (True, False)}
        rows += [compare("reference", block, batch, decoders, score) for batch in BATCHES]
    return rows


def in_batches(decoder, prompts: list[list[int]], params: list) -> Decode:
    return lambda size: [r for i in range(0, len(prompts), size)
                         for r in decoder.generate(prompts[i:i + size], params[i:i + size])]


def sglang_generate(url: str, prompt: list[int], max_tokens: int) -> SimpleNamespace:
    from benchmarks.serving_throughput import post

    sampling = {"temperature": 0, "max_new_tokens": max_tokens, "custom_params": {"threshold": THRESHOLD}}
    out = post(url + "/generate", {"input_ids": prompt, "sampling_params": sampling})
    accounting = out["meta_info"][ACCOUNTING_KEY][0]
    return SimpleNamespace(tokens=out["output_ids"], finish_reason=out["meta_info"]["finish_reason"]["type"],
                           denoise_forwards=accounting["denoise_forwards"], nfe=accounting["nfe"])


def sglang_rows(path: Path, prompts: list[list[int]], score: Callable[[list], float]) -> list[dict]:
    from drivers.stack_servers import ENV, dllm_algorithm_flags, sglang_command

    logs = RESULTS / "serving_logs"
    rows = []
    for block in BLOCK_SIZES:
        budgets = [block_aligned_budget(len(p), MAX_ANSWER_TOKENS, block) for p in prompts]
        with contextlib.ExitStack() as servers:
            urls = {}
            for fused in (True, False):
                config = logs / f"sglang-fused-commit-{str(fused).lower()}-b{block}.yaml"
                port = free_port()
                command = [*sglang_command(path, port, True),
                           *dllm_algorithm_flags(config, block_size=block, fuse_commit=fused)]
                urls[fused] = servers.enter_context(running_server(command, port, config.with_suffix(".log"),
                                                                   ENV["sglang"], timeout=600))
                sglang_generate(urls[fused], prompts[0], budgets[0])  # warm-up
            decoders = {fused: concurrently(url, [u for u in urls.values() if u != url], list(zip(prompts, budgets)))
                        for fused, url in urls.items()}
            rows += [compare("sglang", block, batch, decoders, score) for batch in BATCHES]
    return rows


def concurrently(url: str, others: list[str], requests: list[tuple[list[int], int]]) -> Decode:
    """The requests to the server at `url`, `concurrency` at a time, the `others` paused meanwhile."""
    def decode(concurrency: int) -> list:
        with paused(others), ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda request: sglang_generate(url, *request), requests))
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"any of {', '.join(STACKS)}")
    args = parser.parse_args()
    from blockdiff.text import EOS, load_tokenizer, special_id
    from blockdiff_demo.corpus import held_out_tasks

    stacks = args.stacks.split(",")
    if unknown := set(stacks) - set(STACKS):
        raise SystemExit(f"--stacks: unknown {', '.join(sorted(unknown))} (known: {', '.join(STACKS)})")
    path = args.runs / "nemo/cap/hf"
    if not (path / "config.json").exists():
        raise SystemExit(f"{path} does not exist: run `make demo` first")
    tok = load_tokenizer(path)
    eos = special_id(tok, EOS)
    tasks = held_out_tasks()
    prompts = [tok.encode(t.prompt).ids for t in tasks]

    def score(results: list) -> float:
        return exact_match(tasks, [r.tokens for r in results], tok.decode, eos)

    print(f"{'stack':>10}{'block':>6}{'batch':>6}{'accuracy':>10}{'nfe/req fused':>15}{'unfused':>9}"
          f"{'tok/s fused (min-max)':>24}{'unfused (min-max)':>22}{'gain':>7}")
    measure = {"reference": reference_rows, "sglang": sglang_rows}
    rows = [row for stack in stacks for row in measure[stack](path, prompts, score)]
    setup = {"model": "runs/nemo/cap/hf", "tasks": f"{len(tasks)} held-out instances", "threshold": THRESHOLD,
             "repeats": REPEATS, "machine": "2-core CPU, fp32", "outputs_identical": True,
             "stacks": {"reference": "the core's ReferenceDecoder, batches of `batch`",
                        "sglang": "SGLang's server with --dllm-algorithm BlockDiff, `batch` concurrent requests"}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_commit.json").write_text(json.dumps({**setup, "rows": rows}, indent=1) + "\n")
    print(f"written {RESULTS / 'fused_commit.json'}")


if __name__ == "__main__":
    main()
