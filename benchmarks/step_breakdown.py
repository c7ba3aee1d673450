"""Where a block-diffusion server's time goes, against the reference decoder on the same model and requests (issue #16
item 2: profile first), and what the engines' own AR path costs against the reference's on the same machine.

Each stack serves the `cap` model `make demo` trains (block 32) and its AR base, and gets the first 72 held-out task
instances at concurrency 1, 4 and 16, over and over for at least `SECONDS`, `REPEATS` times, and then as long again
while py-spy samples every process of the server (API server, engine core, workers, detokenizer) at `RATE` Hz. Wall
times are the median of the repeats (min and max beside): on these 2 cores the samplers take CPU from the server, more
from a server of more processes, so the run under py-spy gives only the breakdown of CPU time, and its wall (column
`spied`) is reported beside. The `cap` model gets them twice: at threshold 0.95 (about 1.6 denoising forwards per
request) and at threshold 1.0 (one token per forward: a forward for every position of a block), so that a stack's cost
per request splits into a part per denoising forward and a part per request (HTTP, tokenizing, admission): with wall
time per request W and denoising forwards per request n at the two thresholds, per forward S = (W1 - W0) / (n1 - n0)
and per request F = W0 - n0 S. Each sample is put in the first category whose frames it holds: attention metadata,
model forward, sampling/commit (the plugin's denoising step: logits, propose, commit; for AR the engine's sampler),
input preparation, scheduler, HTTP/tokenize/detokenize (any sample of the API server or detokenizer process), IPC and
waiting (message queues, spin waits), other; the model forward's samples again by the layer part their innermost
frame names (`MODEL_PARTS`: attention, linear, norms, rotary, ...). Reported per request: wall ms, and CPU ms per
category (samples / rate / requests; the processes share 2 cores, so CPU ms can exceed wall ms). The reference
decoder (block diffusion, and the core's `greedy_ar_decode` for AR) runs the same requests in batches of 1, 4 and 16 in
this process, `REPEATS` times, its model forward timed apart from the rest. The same requests take the same forwards
on every stack (conformance), so a stack's wall against the reference's is the ratio of their costs. `vllm-uni` is the
vLLM server with `--distributed-executor-backend uni`: the model runs in the engine-core process, without the worker
process and the shared-memory queue vLLM's default puts between them. `vllm-step` is the vLLM server with the plugin's
in-step denoising loop off (`VLLM_BLOCKDIFF_DENOISE_LOOP=0`: one denoising forward per engine step), on the `cap` model
only (its AR path is `vllm`'s); `sglang-step` the same for SGLang (`denoise_loop: false`: one denoising forward per
scheduler step). Not run unless named: `sglang-sync`, SGLang with its synchronous block scheduling (`--no-dllm-fdfo`;
`cap` only), and `sglang-core0`, SGLang with its threads bound to core 0 (`SGLANG_CPU_OMP_THREADS_BIND=0`).

    make demo   # once: trains runs/demo/ar-base and runs/nemo/cap/hf
    $(python3 tools/envs.py --path core) -m benchmarks.step_breakdown [--stacks vllm,vllm-step,vllm-uni,sglang,...]

Writes results/step_breakdown.json (19 minutes with `--stacks vllm,vllm-step,sglang`). Needs py-spy (the
core env's `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.serving_throughput import CONCURRENCY, REPEATS, REQUESTS, RESULTS, STACKS, THRESHOLD, exact_match, timed
from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS, block_aligned_budget
from drivers.servers import free_port, group_pids, running_server
from drivers.stack_servers import dllm_algorithm_flags, sglang_command, vllm_command
from vllm_blockdiff.engine import DENOISE_LOOP_ENV

ROOT = Path(__file__).resolve().parent.parent
SECONDS, RATE = 6.0, 100
# (model, threshold): the cap model at the served threshold and at 1.0 (one token per forward), the AR base
WORKLOADS: list[tuple[str, float | None]] = [("cap", THRESHOLD), ("cap", 1.0), ("ar", None)]

# (category, frame substrings): a sample goes to the first category any of whose substrings one of its frames holds
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention metadata", ("_build_attention_metadata", "block_causal_metadata", "init_forward_metadata")),
    ("model forward", ("GPUModelRunner._model_forward", "ModelRunner.forward (")),
    # the plugins' denoising step, or the engine's own AR sampling
    ("sampling/commit", ("BlockDiffusionRunnerMixin.sample_tokens", "BlockDiff.step", "GPUModelRunner.sample_tokens",
                         "ModelRunner.sample (")),
    ("input preparation", ("GPUModelRunner._prepare_inputs", "GPUModelRunner._update_states",
                           "ScheduleBatch.prepare_for_", "ForwardBatch.init_new")),
    ("scheduler", ("Scheduler.schedule", "Scheduler.update_from_output", "Scheduler.get_next_batch_to_run",
                   "Scheduler.process_batch_result", "Scheduler.process_input_requests")),
    ("IPC and waiting", ("shm_broadcast", "zmq/", "sched_yield", "recv_pyobj", "Condition.wait", "Queue.get")),
]
FRONTEND = "HTTP/tokenize/detokenize"
# The model forward's samples split by the layer part of their innermost frame that names one (vLLM's and SGLang's
# layers live in files of these names; py-spy runs with --full-filenames, as it would otherwise cut a path to its
# shortest unique suffix, which differs between engines); "rest of the model" is the model files' own code between.
MODEL_PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("layers/attention/", "attention/backends/", "radix_attention.py")),
    ("linear", ("layers/linear.py", "quantization/unquant.py")),
    ("norms", ("layernorm.py",)),
    ("rotary", ("rotary_embedding",)),
    ("activation", ("layers/activation.py",)),
    ("layer plumbing", ("layer_boundary/",)),  # SGLang's residual and communication stages between layers
    ("embedding and logits", ("vocab_parallel_embedding.py", "logits_processor.py")),
]
COLUMNS = [name for name, _ in CATEGORIES[:-1]] + [FRONTEND] + [CATEGORIES[-1][0], "other"]


def vllm_uni_command(model: Path, port: int, block_diffusion: bool) -> list[str]:
    return [*vllm_command(model, port, block_diffusion), "--distributed-executor-backend", "uni"]


def sglang_sync_command(model: Path, port: int, block_diffusion: bool) -> list[str]:
    return [*sglang_command(model, port, block_diffusion), "--no-dllm-fdfo"]


def sglang_step_command(model: Path, port: int, block_diffusion: bool) -> list[str]:
    config = RESULTS / "serving_logs" / "sglang-step.yaml"
    return [*sglang_command(model, port, block_diffusion), *dllm_algorithm_flags(config, denoise_loop=False)]


SERVERS = {**STACKS, "vllm-uni": (vllm_uni_command, *STACKS["vllm"][1:]),
           "vllm-step": (*STACKS["vllm"][:2], {**STACKS["vllm"][2], DENOISE_LOOP_ENV: "0"}),
           "sglang-sync": (sglang_sync_command, *STACKS["sglang"][1:]),
           "sglang-step": (sglang_step_command, *STACKS["sglang"][1:]),
           "sglang-core0": (*STACKS["sglang"][:2], {**STACKS["sglang"][2], "SGLANG_CPU_OMP_THREADS_BIND": "0"})}
# stacks that differ from another only in block diffusion
BLOCK_DIFFUSION_ONLY = {"vllm-step", "sglang-sync", "sglang-step"}


def samples(raw: str) -> Iterator[tuple[str, int]]:
    """py-spy's raw lines, `frames count`. A frame name py-spy read mid-update can hold a newline (seen once in
    SGLang's scheduler: `(` and then `:-1029315712);Mapping.get ... 2` on the next line): such a sample goes on until
    a line ends in its count."""
    pending = ""
    for line in raw.splitlines():
        frames, _, count = (pending + line).rpartition(" ")
        if count.isdigit():
            yield frames, int(count)
            pending = ""
        else:
            pending += line + "\n"


def categorize(frames: str, frontend: bool) -> str:
    if frontend:
        return FRONTEND
    for name, needles in CATEGORIES:
        if any(needle in frames for needle in needles):
            return name
    return "other"


def model_part(frames: str) -> str:
    """The layer part a model-forward sample was in: the innermost of its frames that names one (py-spy's raw lines
    list frames outermost first, separated by ';')."""
    for frame in reversed(frames.split(";")):
        for name, needles in MODEL_PARTS:
            if any(needle in frame for needle in needles):
                return name
    return "rest of the model"


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: it comes with the core env's `bench` extra (python3 tools/envs.py core)")
    return found


def is_frontend(pid: int, root: int) -> bool:
    """The API server (the group's first process) and SGLang's detokenizer serve HTTP, tokenize and detokenize."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return pid == root or "detokenizer" in command


def passes(send, requests: list, concurrency: int) -> tuple[int, int, float, list[list[int]]]:
    """Send `requests` at `concurrency`, whole passes for at least SECONDS. Returns requests answered, their denoising
    forwards (0 for AR), wall seconds and the first pass's output tokens."""
    answered, forwards, first, start = 0, 0, None, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        sent, _ = timed(send, requests, concurrency)
        first = first or [ids for ids, _ in sent]
        answered += len(sent)
        forwards += sum(f or 0 for _, f in sent)
    return answered, forwards, time.perf_counter() - start, first


def profiled_passes(url: str, send, requests: list, concurrency: int, out: Path
                    ) -> tuple[Counter, Counter, float]:
    """`passes` while py-spy samples every server process. Returns CPU seconds per request by category, and of the
    model forward by layer part (`model_part`), and wall seconds per request, all under the profiler (it takes CPU
    from the server on these 2 cores: module docstring)."""
    pids = group_pids(url)
    spies = {pid: subprocess.Popen([py_spy(), "record", "-p", str(pid), "-o", str(out.with_suffix(f".{pid}.txt")),
                                    "-f", "raw", "-r", str(RATE), "-d", "3600", "--nonblocking",
                                    "--full-filenames"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids}
    spied = time.perf_counter()
    time.sleep(1)  # py-spy attaches
    answered, _, wall, _ = passes(send, requests, concurrency)
    for spy in spies.values():  # all at once: each writes what it sampled and exits
        spy.send_signal(signal.SIGINT)
    # the samples also cover py-spy's attaching before the requests: scale to the requests' share
    sampled = time.perf_counter() - spied
    seconds, parts = Counter(), Counter()
    for pid, spy in spies.items():
        spy.wait(timeout=60)
        trace = out.with_suffix(f".{pid}.txt")
        if not trace.exists():  # a process with no Python frames to sample (multiprocessing's resource tracker)
            continue
        frontend = is_frontend(pid, pids[0])
        for frames, count in samples(trace.read_text()):
            category = categorize(frames, frontend)
            seconds[category] += count / RATE
            if category == "model forward":
                parts[model_part(frames)] += count / RATE
        trace.unlink()
    scale = wall / sampled / answered
    return (Counter({k: v * scale for k, v in seconds.items()}), Counter({k: v * scale for k, v in parts.items()}),
            wall / answered)


class TimedModel:
    """The model, with the seconds its forwards take added up (the decoders call it and its `new_cache`)."""

    def __init__(self, model) -> None:
        self.model, self.seconds = model, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)


def reference_breakdown(model: Path, requests: list, threshold: float | None, eos: int,
                        right: Callable[[list[list[int]]], float]) -> dict[int, dict]:
    """The reference decoder on `requests` in batches of each concurrency: block diffusion at `threshold`, or with
    None the core's `greedy_ar_decode` on an AR model; its model forward timed apart from the rest (the per-request
    rules: sampling/commit, or AR's argmax). `right(outputs)` is the held-out accuracy of a list of outputs."""
    from blockdiff.decoding import DecodeParams, ReferenceDecoder, greedy_ar_decode
    from blockdiff.models import BlockDiffusionSettings, load_model

    net, cfg = load_model(model)
    timed = TimedModel(net.eval())
    prompts = [p for p, _ in requests]
    if threshold is not None:
        settings = BlockDiffusionSettings.from_config(cfg)
        decoder = ReferenceDecoder(timed, settings.mask_token_id, settings.eos_token_ids)
        params = [DecodeParams(n, settings.block_size, threshold) for _, n in requests]

        def batch(i: int, j: int) -> list:
            return decoder.generate(prompts[i:j], params[i:j])
    else:

        def batch(i: int, j: int) -> list:
            return greedy_ar_decode(timed, prompts[i:j], MAX_ANSWER_TOKENS, (eos,))
    accuracy = right([r.tokens for i in range(0, len(requests), 16) for r in batch(i, i + 16)])  # and warm-up

    def measured(c: int) -> dict:
        timed.seconds, answered, forwards, start = 0.0, 0, 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            results = [r for i in range(0, len(requests), c) for r in batch(i, i + c)]
            answered += len(results)
            forwards += sum(r.denoise_forwards for r in results) if threshold is not None else 0
        wall = time.perf_counter() - start
        return {"wall_ms": 1e3 * wall / answered, "denoise_forwards": forwards / answered, "accuracy": accuracy,
                "cpu_ms": {"model forward": 1e3 * timed.seconds / answered,
                           "sampling/commit": 1e3 * (wall - timed.seconds) / answered}}
    return {c: median_of_repeats(lambda c=c: measured(c)) for c in CONCURRENCY}


def median_of_repeats(measure: Callable[[], dict]) -> dict:
    """The row of REPEATS runs of `measure` whose `wall_ms` is the median, with the runs' min and max beside it."""
    runs = sorted((measure() for _ in range(REPEATS)), key=lambda row: row["wall_ms"])
    return {**runs[len(runs) // 2], "wall_ms_min": runs[0]["wall_ms"], "wall_ms_max": runs[-1]["wall_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    parser.add_argument("--stacks", default="vllm,vllm-step,vllm-uni,sglang,sglang-step",
                        help=f"any of {', '.join(SERVERS)}")
    args = parser.parse_args()
    from blockdiff.text import EOS, load_tokenizer, special_id
    from blockdiff_demo.corpus import held_out_tasks

    models = {"cap": args.runs / "nemo/cap/hf", "ar": args.runs / "demo/ar-base"}
    for path in models.values():
        if not (path / "config.json").exists():
            raise SystemExit(f"{path} does not exist: run `make demo` first")
    py_spy()
    tok = load_tokenizer(models["cap"])
    eos = special_id(tok, EOS)
    tasks = held_out_tasks()[:REQUESTS]
    prompts = [tok.encode(t.prompt).ids for t in tasks]

    def right(outputs: list[list[int]]) -> float:
        return exact_match(tasks, outputs, tok.decode, eos)

    # as serving_throughput: block-diffusion budgets end on a block boundary, AR stops at EOS within the budget
    budgets = {"cap": [(p, block_aligned_budget(len(p), MAX_ANSWER_TOKENS, 32)) for p in prompts],
               "ar": [(p, MAX_ANSWER_TOKENS) for p in prompts]}
    rows = [{"stack": "reference", "model": name, "threshold": t, "concurrency": c, **r}
            for name, t in WORKLOADS
            for c, r in reference_breakdown(models[name], budgets[name], t, eos, right).items()]
    for stack in args.stacks.split(","):
        command, send, env = SERVERS[stack]
        for name, path in models.items():
            if name == "ar" and stack in BLOCK_DIFFUSION_ONLY:
                continue
            port = free_port()
            log = RESULTS / "serving_logs" / f"{stack}-{name}-breakdown.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with running_server(command(path, port, name != "ar"), port, log, env, timeout=600) as url:
                send(url, budgets[name][0], name != "ar")  # warm-up
                for t in [t for n, t in WORKLOADS if n == name]:
                    def one(request, url=url, send=send, t=t):  # AR (t None) sends no threshold
                        return send(url, request, t is not None, t or THRESHOLD)

                    def measured(c: int, one=one, requests=budgets[name]) -> dict:
                        answered, forwards, wall, outputs = passes(one, requests, c)
                        return {"wall_ms": 1e3 * wall / answered, "denoise_forwards": forwards / answered,
                                "accuracy": right(outputs)}

                    for c in CONCURRENCY:
                        row = median_of_repeats(lambda c=c: measured(c))
                        seconds, parts, profiled_wall = profiled_passes(url, one, budgets[name], c,
                                                                        RESULTS / f"step_breakdown_{stack}_{name}")
                        rows.append({"stack": stack, "model": name, "threshold": t, "concurrency": c, **row,
                                     "profiled_wall_ms": 1e3 * profiled_wall,
                                     "cpu_ms": {k: 1e3 * v for k, v in seconds.items()},
                                     "model_forward_cpu_ms": {k: 1e3 * v for k, v in parts.items()}})
    report(rows)


def per_forward_split(rows: list[dict]) -> list[dict]:
    """Per stack and concurrency, the `cap` rows at the two thresholds as cost per denoising forward S and per request
    F (module docstring), S against the reference's."""
    bd = {(r["stack"], r["threshold"], r["concurrency"]): r for r in rows if r["model"] == "cap"}
    low, high = (t for n, t in WORKLOADS if n == "cap")
    split = []
    for (stack, t, c), r0 in bd.items():
        if t != low:
            continue
        r1 = bd[stack, high, c]
        per_forward = (r1["wall_ms"] - r0["wall_ms"]) / (r1["denoise_forwards"] - r0["denoise_forwards"])
        split.append({"stack": stack, "concurrency": c, "per_forward_ms": per_forward,
                      "per_request_ms": r0["wall_ms"] - r0["denoise_forwards"] * per_forward})
    reference = {s["concurrency"]: s["per_forward_ms"] for s in split if s["stack"] == "reference"}
    for s in split:
        s["per_forward_vs_reference"] = s["per_forward_ms"] / reference[s["concurrency"]]
    return split


def report(rows: list[dict]) -> None:
    reference = {(r["model"], r["threshold"], r["concurrency"]): r["wall_ms"]
                 for r in rows if r["stack"] == "reference"}
    header = "".join(f"{name[:12]:>13}" for name in COLUMNS)
    print("\nper request, ms (CPU ms per category, under py-spy; wall ms, without it; wall against the reference on the"
          " same workload; wall under py-spy)")
    print(f"{'stack':>10}{'model':>6}{'thr':>5}{'right':>7}{'conc':>5}{'fwd':>6}{header}{'wall':>8}{'min-max':>14}"
          f"{'vs ref':>8}{'spied':>8}")
    for r in rows:
        r["vs_reference"] = r["wall_ms"] / reference[r["model"], r["threshold"], r["concurrency"]]
        cells = "".join(f"{r['cpu_ms'][name]:>13.2f}" if name in r["cpu_ms"] else f"{'-':>13}" for name in COLUMNS)
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"{r['stack']:>10}{r['model']:>6}{threshold:>5}{r['accuracy']:>7.1%}{r['concurrency']:>5}"
              f"{r['denoise_forwards']:>6.1f}"
              f"{cells}{r['wall_ms']:>8.2f}{r['wall_ms_min']:>7.2f}-{r['wall_ms_max']:<6.2f}{r['vs_reference']:>7.2f}x"
              f"{r.get('profiled_wall_ms', r['wall_ms']):>8.2f}")
    parts = [name for name, _ in MODEL_PARTS] + ["rest of the model"]
    print("\nthe model forward's CPU ms per request by layer part (under py-spy)")
    print(f"{'stack':>10}{'model':>6}{'thr':>5}{'conc':>5}" + "".join(f"{name[:12]:>13}" for name in parts))
    for r in rows:
        if "model_forward_cpu_ms" in r:
            threshold = "-" if r["threshold"] is None else f"{r['threshold']:g}"
            print(f"{r['stack']:>10}{r['model']:>6}{threshold:>5}{r['concurrency']:>5}"
                  + "".join(f"{r['model_forward_cpu_ms'].get(name, 0.0):>13.2f}" for name in parts))
    split = per_forward_split(rows)
    print("\ncap, cost per denoising forward S and per request F, ms (from the two thresholds)")
    print(f"{'stack':>10}{'conc':>5}{'S':>8}{'S vs ref':>10}{'F':>8}")
    for s in split:
        print(f"{s['stack']:>10}{s['concurrency']:>5}{s['per_forward_ms']:>8.2f}{s['per_forward_vs_reference']:>9.2f}x"
              f"{s['per_request_ms']:>8.2f}")
    setup = {"models": {"cap": "runs/nemo/cap/hf", "ar": "runs/demo/ar-base"},
             "requests": f"the first {REQUESTS} held-out task instances", "workloads": WORKLOADS, "block_size": 32,
             "max_tokens": MAX_ANSWER_TOKENS, "seconds_per_level": SECONDS, "repeats": REPEATS, "py_spy_rate_hz": RATE,
             "machine": "2-core CPU, fp32"}
    (RESULTS / "step_breakdown.json").write_text(json.dumps({**setup, "rows": rows, "per_forward": split}, indent=1)
                                                 + "\n")
    print(f"written {RESULTS / 'step_breakdown.json'}")


if __name__ == "__main__":
    main()
