"""How many PyTorch operators one denoising forward runs, on SGLang's server and in the reference decoder, and how much
of the forward's time is inside them (issue #16 item 2: name what a forward costs beyond its arithmetic).

The `cap` model `make demo` trains gets the first `REQUESTS` held-out task instances one at a time at threshold 1.0
(a forward for every position of a block): in the reference decoder under `torch.profiler`, each model call marked,
and on SGLang's server under SGLang's own profiler (`/start_profile`, `SGLANG_TORCH_PROFILER_DIR`, CPU activities,
Python frames). A forward is the reference's model call, or the outermost frame of SGLang's model file (its
`ForCausalLM.forward`, the LM head included, as in the reference). Per forward: the top-level operator calls (those no
other operator called), the CPU ms inside them, the forward's wall under the profiler, the operators that took the
most time (every operator's calls in the JSON); and the time inside the layers' attention with its KV-cache write
and read, with the top-level operator calls made there and their time (`REFERENCE_PARTS`, `SGLANG_PARTS`; on SGLang
also inside the plugin's own attention hook, which runs within SGLang's attention). Both profiles record Python
frames (`with_stack`), whose cost the profiler adds to every Python call and operator, so the walls are inflated
alike: compare the walls with each other, not with a run without the profiler. Accuracy is exact match of each
stack's outputs. vLLM is not profiled here: its cost per forward was within 1.1x of the reference's at one request in
`benchmarks.step_breakdown`'s runs.

    make demo   # once: trains runs/nemo/cap/hf
    $(python3 tools/envs.py --path core) -m benchmarks.operator_count

Writes results/operator_count.json (about 4 minutes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from benchmarks.serving_throughput import RESULTS, STACKS, exact_match
from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS, block_aligned_budget
from drivers.servers import free_port, running_server

ROOT = Path(__file__).resolve().parent.parent
REQUESTS, THRESHOLD = 20, 1.0
FORWARD_MARK = "model forward"  # the reference's model calls, as a profiler annotation
SGLANG_MODEL_FILES = "sglang/srt/models/"


def forward_operators(events: list[dict], is_forward: Callable[[dict], bool],
                      parts: dict[str, Callable[[dict], bool]]) -> dict:
    """From a Chrome trace's complete events: the forwards (outermost events `is_forward` accepts), the operator
    calls made inside them that no other operator made, with the time inside those, and for each of `parts` (events
    a predicate accepts, such as a layer's attention) the time inside its outermost events and the top-level operator
    calls made inside them, with their time (also by operator)."""
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            by_thread[(e["pid"], e["tid"])].append(e)
    forwards, forward_us, calls, operator_us = 0, 0.0, Counter(), Counter()
    part_us, part_calls, part_operator_us = Counter(), defaultdict(Counter), defaultdict(Counter)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))  # an enclosing event before the events it encloses
        stack: list[dict] = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            in_forward = any(is_forward(s) for s in stack)
            in_parts = [name for name, is_part in parts.items() if any(is_part(s) for s in stack)] if in_forward else []
            if is_forward(e) and not in_forward:
                forwards, forward_us = forwards + 1, forward_us + e["dur"]
            elif e.get("cat") == "cpu_op" and in_forward and not any(s.get("cat") == "cpu_op" for s in stack):
                calls[e["name"]] += 1
                operator_us[e["name"]] += e["dur"]
                for name in in_parts:
                    part_calls[name][e["name"]] += 1
                    part_operator_us[name][e["name"]] += e["dur"]
            if in_forward:
                part_us.update({name: e["dur"] for name, is_part in parts.items()
                                if is_part(e) and name not in in_parts})
            stack.append(e)
    if not forwards:
        raise SystemExit("the trace holds no model forward")

    def by_operator(calls: Counter, us: Counter, most: int | None = None) -> dict:
        return {name: {"ms": t / 1e3 / forwards, "calls": calls[name] / forwards} for name, t in us.most_common(most)}

    return {"forwards": forwards, "operator_calls": sum(calls.values()) / forwards,
            "operator_ms": sum(operator_us.values()) / 1e3 / forwards, "forward_ms": forward_us / 1e3 / forwards,
            "parts": {name: {"ms": part_us[name] / 1e3 / forwards,
                             "operator_calls": sum(part_calls[name].values()) / forwards,
                             "operator_ms": sum(part_operator_us[name].values()) / 1e3 / forwards,
                             "operators": by_operator(part_calls[name], part_operator_us[name])}
                      for name in parts},
            "slowest": by_operator(calls, operator_us, 6),
            "calls": {name: n / forwards for name, n in calls.most_common()}}


def reference_trace(model: Path, requests: list[tuple[list[int], int]], out: Path
                    ) -> tuple[list[dict], list[list[int]]]:
    """The reference decoder's profile over `requests`, and its outputs."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from blockdiff.decoding import DecodeParams, ReferenceDecoder
    from blockdiff.models import BlockDiffusionSettings, load_model

    net, cfg = load_model(model)
    net.eval()

    class Marked:
        def __call__(self, *args, **kwargs):
            with record_function(FORWARD_MARK):
                return net(*args, **kwargs)

        def new_cache(self, *args, **kwargs):
            return net.new_cache(*args, **kwargs)

    settings = BlockDiffusionSettings.from_config(cfg)
    decoder = ReferenceDecoder(Marked(), settings.mask_token_id, settings.eos_token_ids)

    def decode_all() -> list[list[int]]:
        return [decoder.generate([prompt], [DecodeParams(budget, settings.block_size, THRESHOLD)])[0].tokens
                for prompt, budget in requests]

    with torch.inference_mode():
        decode_all()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:  # as SGLang's profiler
            outputs = decode_all()
    prof.export_chrome_trace(str(out))
    return json.loads(out.read_text())["traceEvents"], outputs


def sglang_trace(model: Path, requests: list[tuple[list[int], int]], out_dir: Path
                 ) -> tuple[list[dict], list[list[int]]]:
    """SGLang's profile of its scheduler over `requests` (its model runs there), and the server's outputs."""
    command, send, env = STACKS["sglang"]
    port = free_port()
    log = RESULTS / "serving_logs" / "sglang-cap-operators.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.trace.json.gz"):
        old.unlink()
    with running_server(command(model, port, True), port, log, {**env, "SGLANG_TORCH_PROFILER_DIR": str(out_dir)},
                        timeout=600) as url:
        send(url, requests[0], True, THRESHOLD)  # warm-up
        control(url, "/start_profile", {"activities": ["CPU"], "output_dir": str(out_dir)})
        outputs = [send(url, request, True, THRESHOLD)[0] for request in requests]
        control(url, "/stop_profile", {})
        deadline = time.time() + 300  # SGLang writes the trace after answering
        while time.time() < deadline:
            for path in out_dir.glob("*.trace.json.gz"):
                try:
                    return json.loads(gzip.open(path).read())["traceEvents"], outputs
                except (EOFError, OSError, json.JSONDecodeError):  # still being written
                    pass
            time.sleep(2)
    raise SystemExit(f"SGLang wrote no profile to {out_dir} within 300 s (see {log})")


def control(url: str, endpoint: str, body: dict) -> None:
    request = urllib.request.Request(url + endpoint, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=300).read()


def is_reference_forward(event: dict) -> bool:
    return event.get("cat") == "user_annotation" and event["name"] == FORWARD_MARK


def is_sglang_forward(event: dict) -> bool:
    return event.get("cat") == "python_function" and SGLANG_MODEL_FILES in event["name"]


def frame(file: str, *functions: str) -> Callable[[dict], bool]:
    """A Python frame of any of `functions` in a file whose path ends with `file` (the profiler names it
    `path(line): function`)."""
    def is_frame(event: dict) -> bool:
        name = event["name"]
        return (event.get("cat") == "python_function" and f"{file}(" in name
                and any(name.endswith(f"): {function}") for function in functions))
    return is_frame


# Each layer's attention with its KV-cache write and read: the reference's cache update and attention function,
# SGLang's RadixAttention (its pool write, its torch-native backend and, inside that, the plugin's hook).
ATTENTION = "attention with its KV cache"
PLUGIN_HOOK = "the plugin's attention hook"
REFERENCE_PARTS = {ATTENTION: frame("blockdiff/models/layers.py", "update", "attention")}
SGLANG_PARTS = {ATTENTION: frame("sglang/srt/layers/radix_attention.py", "forward"),
                PLUGIN_HOOK: frame("sglang_blockdiff/hooks.py", "attend_from_extend_tokens_only")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    args = parser.parse_args()
    from blockdiff.text import EOS, load_tokenizer, special_id
    from blockdiff_demo.corpus import held_out_tasks

    model = args.runs / "nemo/cap/hf"
    if not (model / "config.json").exists():
        raise SystemExit(f"{model} does not exist: run `make demo` first")
    tok = load_tokenizer(model)
    eos = special_id(tok, EOS)
    tasks = held_out_tasks()[:REQUESTS]
    prompts = [tok.encode(t.prompt).ids for t in tasks]
    requests = [(p, block_aligned_budget(len(p), MAX_ANSWER_TOKENS, 32)) for p in prompts]
    traces = RESULTS / "operator_traces"
    traces.mkdir(parents=True, exist_ok=True)
    rows = {}
    for stack, (events, outputs), is_forward, parts in [
            ("reference", reference_trace(model, requests, traces / "reference.json"), is_reference_forward,
             REFERENCE_PARTS),
            ("SGLang", sglang_trace(model, requests, traces / "sglang"), is_sglang_forward, SGLANG_PARTS)]:
        rows[stack] = {"accuracy": exact_match(tasks, outputs, tok.decode, eos),
                       **forward_operators(events, is_forward, parts)}
    print(f"the first {REQUESTS} held-out requests one at a time, threshold {THRESHOLD}; per model forward:")
    print("| stack | accuracy | forwards | operator calls | CPU ms in operators | forward ms under the profiler | "
          "slowest operators: ms (calls) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for stack, r in rows.items():
        most = ", ".join(f"{name.removeprefix('aten::')} {o['ms']:.2f} ({o['calls']:.0f})"
                         for name, o in r["slowest"].items())
        print(f"| {stack} | {r['accuracy']:.1%} | {r['forwards']} | {r['operator_calls']:.0f} | "
              f"{r['operator_ms']:.2f} | {r['forward_ms']:.2f} | {most} |")
    print("\n| stack | part of the forward | ms under the profiler | operator calls | CPU ms in operators | "
          "operators: ms (calls) |\n|---|---|---:|---:|---:|---|")
    for stack, r in rows.items():
        for part, o in r["parts"].items():
            most = ", ".join(f"{name.removeprefix('aten::')} {p['ms']:.3f} ({p['calls']:.0f})"
                             for name, p in o["operators"].items())
            print(f"| {stack} | {part} | {o['ms']:.2f} | {o['operator_calls']:.0f} | {o['operator_ms']:.2f} | {most} |")
    (RESULTS / "operator_count.json").write_text(json.dumps(
        {"model": str(model), "requests": f"the first {REQUESTS} held-out task instances", "threshold": THRESHOLD,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
