"""lm-eval on every stack: the same tasks, the same outputs, the same scores, with the decoding cost beside them.

The model is evaluated by lm-eval with `blockdiff` (the core's reference decoder, in this process), and against
`blockdiff-vllm-serve` and SGLang with `--dllm-algorithm BlockDiff` through lm-eval's own OpenAI-compatible client three
times: as `blockdiff-completions` (that client, keeping each response's accounting), as plain `local-completions` and as
`local-chat-completions` on the expressions task sent as chat (the reference then renders the checkpoint's chat template
itself; outputs and scores only). Each one's outputs must equal the reference's document by document (which makes every
score equal); `blockdiff-completions`' cost metrics must be present, and where no stop string cuts an output (`until:
[]`) its TPF must equal the reference's too (a server may stop decoding at a stop string; the reference decodes on and
cuts the text, as every lm-eval model does). NFE per token is shown, not compared: each stack splits or fuses its
prefill and commit forwards its own way (conformance/README.md).

    $(python3 tools/envs.py --path core) -m conformance.evaluation MODEL_DIR OUT.json [--stacks vllm,sglang] [--limit 8]

Exit 1 on any difference. `make test` runs it (through `conformance.run`) on the matrix's dense model, the wsd_cpt
recipe's 10-step conversion of a random AR base: its outputs are valid text, but it is right about nothing, so there
the check is on outputs and cost, not on a score above 0; `make eval` runs it on the main job's CAP model. An AR
checkpoint (no `block_diffusion` in its config) is served by each stack's own AR path and decoded greedily by the
reference: `make test` checks SmolLM2-135M-Instruct so, through the chat endpoints, beside its conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

import lm_eval_blockdiff.models  # noqa: F401  (registers the models)
from blockdiff.models import read_config
from drivers.servers import free_port, running_server
from drivers.stack_servers import COMMANDS, ENV
from lm_eval_blockdiff import TASKS_DIR

TASKS = ["blockdiff_expressions", "blockdiff_word_problems", "blockdiff_humaneval"]
CHAT_TASKS = ["blockdiff_expressions"]  # also as chat: lm-eval's chat history, each side's chat template
SCORES = ("exact_match", "pass@1")
COSTS = ("tpf", "nfe_per_token", "tokens_per_second")
CONTEXT = 2048  # tokens: HumanEval's longest prompt in the toy tokenizers (1,260) and its 128 answer tokens


def evaluate(model: str, model_args: dict, tasks: list[str], limit: int | None, chat: bool = False) -> dict:
    """lm-eval's `simple_evaluate` on this plugin's tasks, samples kept; `chat`: prompts as chat messages."""
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR)), confirm_run_unsafe_code=True,
                                   apply_chat_template=chat)


def summary(results: dict) -> dict:
    """Per task: each score and cost metric, and every document's output text."""
    out = {}
    for task, metrics in results["results"].items():
        row = {m: metrics[f"{m},none"] for m in SCORES + COSTS if f"{m},none" in metrics}
        row["outputs"] = [s["filtered_resps"][0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
        row["cuts_at_stop_strings"] = bool(results["configs"][task]["generation_kwargs"]["until"])
        out[task] = row
    return out


def differences(stack: str, got: dict, want: dict, accounting: bool) -> list[str]:
    problems = []
    for task, ref in want.items():
        row = got[task]
        for i, (a, b) in enumerate(zip(row["outputs"], ref["outputs"])):
            if a != b:
                problems.append(f"[{stack}] {task} doc {i}: output {a!r} != reference {b!r}")
        problems += [f"[{stack}] {task}: {m} {row.get(m)} != reference {ref[m]}" for m in SCORES
                     if m in ref and row.get(m) != ref[m]]
        if not accounting:  # lm-eval's own clients: the text only
            continue
        problems += [f"[{stack}] {task}: no {m} in lm-eval's results" for m in COSTS[:2] if m not in row]
        if not ref["cuts_at_stop_strings"] and not math.isclose(row.get("tpf", math.nan), ref["tpf"], rel_tol=1e-9):
            problems.append(f"[{stack}] {task}: tpf {row.get('tpf')} != reference {ref['tpf']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stacks", default="vllm,sglang")
    parser.add_argument("--limit", type=int, default=8, help="documents per task (0: all)")
    parser.add_argument("--chat-only", action="store_true",
                        help="only the chat rows: the checkpoint's template through each server's chat endpoint")
    args = parser.parse_args(argv)
    model = args.model.resolve()
    limit = args.limit or None
    reference = {"pretrained": str(model)}
    block_diffusion = "block_diffusion" in read_config(model)
    rows = {"reference/chat": summary(evaluate("blockdiff", reference, CHAT_TASKS, limit, chat=True))}
    if not args.chat_only:
        rows["reference"] = summary(evaluate("blockdiff", reference, TASKS, limit))
    for stack in args.stacks.split(","):
        port = free_port()
        log = args.out.parent / f"lm-eval-{stack}-server.log"
        command = COMMANDS[stack](model, port, block_diffusion, CONTEXT)
        with running_server(command, port, log, ENV[stack], timeout=600) as url:
            served = {"model": "m", "max_retries": 1, "tokenizer_backend": None}
            completions = {**served, "base_url": f"{url}/v1/completions"}
            if not args.chat_only:
                rows[stack] = summary(evaluate("blockdiff-completions", completions, TASKS, limit))
                rows[f"{stack}/local-completions"] = summary(evaluate("local-completions", completions, TASKS,
                                                                      limit))
            rows[f"{stack}/local-chat-completions"] = summary(evaluate(
                "local-chat-completions", {**served, "base_url": f"{url}/v1/chat/completions"}, CHAT_TASKS, limit,
                chat=True))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'stack':<30}{'task':<26}{'score':>7}{'TPF':>7}{'NFE/tok':>8}{'tok/s':>8}")
    for stack, tasks in rows.items():
        for task, row in tasks.items():
            score = next(row[m] for m in SCORES if m in row)
            print(f"{stack:<30}{task:<26}{score:>7.3f}{row.get('tpf', math.nan):>7.2f}"
                  f"{row.get('nfe_per_token', math.nan):>8.2f}{row.get('tokens_per_second', math.nan):>8.0f}")
    problems = [p for name, row in rows.items() if not name.startswith("reference")
                for p in differences(name, row, rows["reference/chat" if name.endswith("chat-completions")
                                                     else "reference"], accounting="/" not in name)]
    print("\n".join(problems) if problems else "lm-eval: every stack gave the reference's outputs and scores")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
