"""This project's SGLang plugin against SGLang's own dLLM path on the same LLaDA2.0-architecture model (issue #16
item 3).

SGLang ships block-diffusion decoding for `LLaDA2MoeModelLM` (`--dllm-algorithm LowConfidence`). To race it on a
model that is right about something, the `cap` model `make demo` trains is written in LLaDA2.0's layout
(`dense_qwen3_as_llada2`: every layer dense, RoPE over the whole head; the core's logits are bit-identical to the
Qwen3 original, tests/core/test_llada2_moe.py) and served by SGLang's own LLaDA2 model code twice, once per algorithm,
both at the checkpoint's block 32 and threshold 0.95, the same flags otherwise (radix cache on). The first 72
held-out task instances go at concurrency 1, 4 and 16, three times each after a warm-up; tokens/s median (min-max),
held-out accuracy, TPF where the algorithm reports it, and the plugin's tokens/s over LowConfidence's.

    make demo   # once: trains runs/nemo/cap/hf
    $(python3 tools/envs.py --path core) -m benchmarks.peer_engines

Writes results/peer_engines.json (about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from benchmarks.serving_throughput import CONCURRENCY, REPEATS, REQUESTS, RESULTS, exact_match, post, timed
from blockdiff.serving import ACCOUNTING_KEY
from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS, block_aligned_budget
from drivers.servers import free_port, running_server
from tools import envs

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ("BlockDiff", "LowConfidence")  # this project's plugin, SGLang's own


def write_llada2_copy(model: Path, out: Path) -> Path:
    """`model` (a Qwen3 block-diffusion checkpoint) as a LLaDA2MoeModelLM directory at `out`, tokenizer included."""
    from blockdiff.models import load_model, save_weights
    from blockdiff.models.llada2_moe import dense_qwen3_as_llada2

    net, cfg = load_model(model)
    save_weights(*dense_qwen3_as_llada2(net.state_dict(), cfg), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, out / name)
    return out


def command(model: Path, port: int, algorithm: str) -> list[str]:
    from drivers.sglang_cpu import CPU_FLAGS

    return [str(envs.venv_python("sglang")), "-m", "sglang.launch_server", "--model-path", str(model), "--port",
            str(port), "--context-length", "512", "--max-running-requests", "16", "--max-total-tokens", "16384",
            "--dllm-algorithm", algorithm, *CPU_FLAGS]


def send(url: str, request: tuple[list[int], int]) -> tuple[list[int], int | None]:
    prompt, max_tokens = request
    out = post(url + "/generate", {"input_ids": prompt, "sampling_params": {"temperature": 0,
                                                                             "max_new_tokens": max_tokens}})
    accounting = (out["meta_info"].get(ACCOUNTING_KEY) or [{}])[0]  # LowConfidence reports none
    return out["output_ids"], accounting.get("denoise_forwards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    args = parser.parse_args()
    from blockdiff.text import EOS, load_tokenizer, special_id
    from blockdiff_demo.corpus import held_out_tasks

    source = args.runs / "nemo/cap/hf"
    if not (source / "config.json").exists():
        raise SystemExit(f"{source} does not exist: run `make demo` first")
    model = write_llada2_copy(source, args.runs / "peers/cap_llada2")
    tok = load_tokenizer(model)
    eos = special_id(tok, EOS)
    tasks = held_out_tasks()[:REQUESTS]
    requests = [(p, block_aligned_budget(len(p), MAX_ANSWER_TOKENS, 32))
                for p in (tok.encode(t.prompt).ids for t in tasks)]
    rows = []
    for algorithm in ALGORITHMS:
        print(f"[sglang] {algorithm} ...", flush=True)
        port = free_port()
        log = RESULTS / "serving_logs" / f"sglang-{algorithm}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with running_server(command(model, port, algorithm), port, log, {"SGLANG_USE_CPU_ENGINE": "1"},
                            timeout=600) as url:
            send(url, requests[0])  # warm-up
            for c in CONCURRENCY:
                runs = [timed(lambda r, url=url: send(url, r), requests, c) for _ in range(REPEATS)]
                speeds = [sum(len(ids) for ids, _ in outs) / wall for outs, wall in runs]
                outs = runs[0][0]
                forwards = [f for _, f in outs if f is not None]
                tokens = sum(len(ids) for ids, _ in outs)
                rows.append({"algorithm": algorithm, "concurrency": c, "output_tokens": tokens,
                             "tokens_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
                             "runs": speeds, "tpf": tokens / sum(forwards) if len(forwards) == len(outs) else None,
                             "accuracy": exact_match(tasks, [ids for ids, _ in outs], tok.decode, eos),
                             "outputs": [ids for ids, _ in outs],
                             "repeats_identical": all([i for i, _ in o] == [i for i, _ in outs] for o, _ in runs)})
    report(rows)


def report(rows: list[dict]) -> None:
    theirs = {r["concurrency"]: r for r in rows if r["algorithm"] == "LowConfidence"}
    print(f"\n{'algorithm':>14}{'conc':>6}{'tokens':>8}{'tok/s (min-max)':>22}{'TPF':>7}{'accuracy':>10}"
          f"{'vs LowConfidence':>18}")
    for r in rows:
        other = theirs[r["concurrency"]]
        r["vs_low_confidence"] = r["tokens_per_s"] / other["tokens_per_s"]
        r["same_outputs_as_low_confidence"] = r["outputs"] == other["outputs"]
        tpf = f"{r['tpf']:.2f}" if r["tpf"] is not None else "-"
        speed = f"{r['tokens_per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f})"
        print(f"{r['algorithm']:>14}{r['concurrency']:>6}{r['output_tokens']:>8}{speed:>22}{tpf:>7}"
              f"{r['accuracy']:>10.1%}{r['vs_low_confidence']:>17.2f}x"
              + ("" if r["repeats_identical"] else "  (runs differ)"))
    same = all(r["same_outputs_as_low_confidence"] for r in rows)
    print(f"outputs identical between the two algorithms: {same}")
    for r in rows:
        del r["outputs"]
    setup = {"model": "runs/nemo/cap/hf written as LLaDA2MoeModelLM (runs/peers/cap_llada2)", "engine": "sglang 0.5.23",
             "requests_per_level": REQUESTS, "repeats": REPEATS, "threshold": 0.95, "block_size": 32,
             "machine": "2-core CPU, fp32", "outputs_identical": same}
    (RESULTS / "peer_engines.json").write_text(json.dumps({**setup, "rows": rows}, indent=1) + "\n")
    print(f"written {RESULTS / 'peer_engines.json'}")


if __name__ == "__main__":
    main()
