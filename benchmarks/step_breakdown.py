"""Where a block-diffusion server's time goes, against the reference decoder on the same model and requests (issue #16
item 2: profile first).

Each stack serves the `cap` model `make demo` trains (block 32, threshold 0.95) and gets the first 72 held-out task
instances at concurrency 1, 4 and 16, over and over for `SECONDS`, while py-spy samples every process of the server
(API server, engine core, workers, detokenizer) at `RATE` Hz. Each sample is put in the first category whose frames
it holds: attention metadata, model forward, sampling/commit (the plugin's denoising step: logits, propose, commit),
input preparation, scheduler, HTTP/tokenize/detokenize (any sample of the API server or detokenizer process), IPC
and waiting (message queues, spin waits), other. Reported per request: wall ms, and CPU ms per category (samples /
rate / requests; the processes share 2 cores, so CPU ms can exceed wall ms). The reference decoder runs the same
requests in batches of 1, 4 and 16 in this process, its model forward timed apart from the rest (the per-request
rules, which are sampling/commit). The last column is each stack's wall time per request against the reference's:
the same requests take the same denoising forwards everywhere (conformance), so it is the ratio of the cost per
denoising forward. `vllm-uni` is the vLLM plugin's server with `--distributed-executor-backend uni`: the model runs in
the engine-core process, without the worker process and the shared-memory queue vLLM's default puts between them.

    make demo   # once: trains runs/nemo/cap/hf
    $(python3 tools/envs.py --path core) -m benchmarks.step_breakdown [--stacks vllm,vllm-uni,sglang]

Writes results/step_breakdown.json (about 3 minutes). Needs py-spy (the core env's `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.serving_throughput import CONCURRENCY, REQUESTS, RESULTS, STACKS, THRESHOLD
from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS, block_aligned_budget
from drivers.servers import free_port, group_pids, running_server
from drivers.stack_servers import vllm_command

ROOT = Path(__file__).resolve().parent.parent
SECONDS, RATE = 6.0, 100

# (category, frame substrings): a sample goes to the first category any of whose substrings one of its frames holds
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention metadata", ("_build_attention_metadata", "block_causal_metadata", "init_forward_metadata")),
    ("model forward", ("GPUModelRunner._model_forward", "ModelRunner.forward (")),
    ("sampling/commit", ("BlockDiffusionRunnerMixin.sample_tokens", "BlockDiff.step")),
    ("input preparation", ("GPUModelRunner._prepare_inputs", "GPUModelRunner._update_states",
                           "ScheduleBatch.prepare_for_", "ForwardBatch.init_new")),
    ("scheduler", ("Scheduler.schedule", "Scheduler.update_from_output", "Scheduler.get_next_batch_to_run",
                   "Scheduler.process_batch_result", "Scheduler.process_input_requests")),
    ("IPC and waiting", ("shm_broadcast", "zmq/", "sched_yield", "recv_pyobj", "Condition.wait", "Queue.get")),
]
FRONTEND = "HTTP/tokenize/detokenize"
COLUMNS = [name for name, _ in CATEGORIES[:-1]] + [FRONTEND] + [CATEGORIES[-1][0], "other"]


def vllm_uni_command(model: Path, port: int, block_diffusion: bool) -> list[str]:
    return [*vllm_command(model, port, block_diffusion), "--distributed-executor-backend", "uni"]


SERVERS = {**STACKS, "vllm-uni": (vllm_uni_command, *STACKS["vllm"][1:])}


def categorize(frames: str, frontend: bool) -> str:
    if frontend:
        return FRONTEND
    for name, needles in CATEGORIES:
        if any(needle in frames for needle in needles):
            return name
    return "other"


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: it comes with the core env's `bench` extra (python3 tools/envs.py core)")
    return found


def is_frontend(pid: int, root: int) -> bool:
    """The API server (the group's first process) and SGLang's detokenizer serve HTTP, tokenize and detokenize."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return pid == root or "detokenizer" in command


def profiled_load(url: str, send, requests: list, concurrency: int, out: Path) -> tuple[Counter, int, float]:
    """Send `requests` at `concurrency` for SECONDS while py-spy samples every server process. Returns CPU seconds per
    category, requests answered, wall seconds."""
    pids = group_pids(url)
    spies = {pid: subprocess.Popen([py_spy(), "record", "-p", str(pid), "-o", str(out.with_suffix(f".{pid}.txt")),
                                    "-f", "raw", "-r", str(RATE), "-d", str(int(SECONDS) + 2), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids}
    time.sleep(1)  # py-spy attaches
    answered, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        with ThreadPoolExecutor(concurrency) as pool:
            answered += len(list(pool.map(send, requests)))
    wall = time.perf_counter() - start
    seconds = Counter()
    for pid, spy in spies.items():
        spy.wait(timeout=60)
        trace = out.with_suffix(f".{pid}.txt")
        if not trace.exists():  # a process with no Python frames to sample (multiprocessing's resource tracker)
            continue
        frontend = is_frontend(pid, pids[0])
        for line in trace.read_text().splitlines():
            frames, _, count = line.rpartition(" ")
            seconds[categorize(frames, frontend)] += int(count) / RATE
        trace.unlink()
    # the samples cover SECONDS + 2 while requests ran for `wall`: scale to the requests' share
    return Counter({k: v * wall / (SECONDS + 2) for k, v in seconds.items()}), answered, wall


def reference_breakdown(model: Path, requests: list) -> dict[int, dict]:
    from blockdiff.decoding import DecodeParams, ReferenceDecoder
    from blockdiff.models import BlockDiffusionSettings, load_model

    net, cfg = load_model(model)
    net.eval()
    settings = BlockDiffusionSettings.from_config(cfg)

    class TimedDecoder(ReferenceDecoder):
        forward_seconds = 0.0

        def _forward(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._forward(*args, **kwargs)
            TimedDecoder.forward_seconds += time.perf_counter() - start
            return out

    decoder = TimedDecoder(net, settings.mask_token_id, settings.eos_token_ids)
    prompts = [p for p, _ in requests]
    params = [DecodeParams(n, settings.block_size, THRESHOLD) for _, n in requests]
    decoder.generate(prompts[:1], params[:1])  # warm-up
    rows = {}
    for c in CONCURRENCY:
        TimedDecoder.forward_seconds, answered, start = 0.0, 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            for i in range(0, len(requests), c):
                decoder.generate(prompts[i:i + c], params[i:i + c])
            answered += len(requests)
        wall = time.perf_counter() - start
        rows[c] = {"wall_ms": 1e3 * wall / answered,
                   "cpu_ms": {"model forward": 1e3 * TimedDecoder.forward_seconds / answered,
                              "sampling/commit": 1e3 * (wall - TimedDecoder.forward_seconds) / answered}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    parser.add_argument("--stacks", default="vllm,vllm-uni,sglang", help=f"any of {', '.join(SERVERS)}")
    args = parser.parse_args()
    from blockdiff.text import load_tokenizer
    from blockdiff_demo.corpus import held_out_tasks

    model = args.runs / "nemo/cap/hf"
    if not (model / "config.json").exists():
        raise SystemExit(f"{model} does not exist: run `make demo` first")
    py_spy()
    tok = load_tokenizer(model)
    prompts = [tok.encode(t.prompt).ids for t in held_out_tasks()[:REQUESTS]]
    requests = [(p, block_aligned_budget(len(p), MAX_ANSWER_TOKENS, 32)) for p in prompts]
    rows = [{"stack": "reference", "concurrency": c, **r} for c, r in reference_breakdown(model, requests).items()]
    for stack in args.stacks.split(","):
        command, send, env = SERVERS[stack]
        port = free_port()
        log = RESULTS / "serving_logs" / f"{stack}-breakdown.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with running_server(command(model, port, True), port, log, env, timeout=600) as url:
            def one(request, url=url, send=send):
                return send(url, request, True)

            one(requests[0])  # warm-up
            for c in CONCURRENCY:
                seconds, answered, wall = profiled_load(url, one, requests, c, RESULTS / f"step_breakdown_{stack}")
                rows.append({"stack": stack, "concurrency": c, "wall_ms": 1e3 * wall / answered,
                             "cpu_ms": {k: 1e3 * v / answered for k, v in seconds.items()}})
    report(rows)


def report(rows: list[dict]) -> None:
    reference = {r["concurrency"]: r["wall_ms"] for r in rows if r["stack"] == "reference"}
    header = "".join(f"{name[:12]:>13}" for name in COLUMNS)
    print("\nper request, ms (CPU ms per category; wall ms; wall against the reference at the same concurrency)")
    print(f"{'stack':>10}{'conc':>5}{header}{'wall':>8}{'vs ref':>8}")
    for r in rows:
        r["vs_reference"] = r["wall_ms"] / reference[r["concurrency"]]
        cells = "".join(f"{r['cpu_ms'][name]:>13.2f}" if name in r["cpu_ms"] else f"{'-':>13}" for name in COLUMNS)
        print(f"{r['stack']:>10}{r['concurrency']:>5}{cells}{r['wall_ms']:>8.2f}{r['vs_reference']:>7.2f}x")
    setup = {"model": "runs/nemo/cap/hf", "requests": f"the first {REQUESTS} held-out task instances",
             "threshold": THRESHOLD, "block_size": 32, "seconds_per_level": SECONDS, "py_spy_rate_hz": RATE,
             "machine": "2-core CPU, fp32"}
    (RESULTS / "step_breakdown.json").write_text(json.dumps({**setup, "rows": rows}, indent=1) + "\n")
    print(f"written {RESULTS / 'step_breakdown.json'}")


if __name__ == "__main__":
    main()
