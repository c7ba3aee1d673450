"""Run the conformance matrix: build the cases, run every stack in its own venv, print the comparison table; then
lm-eval on the reference and the servers among the stacks (conformance.evaluation).

    python3 -m conformance.run                     # every stack; exit 1 on any mismatch
    python3 -m conformance.run --stacks vllm-offline --work /tmp/conf

Standard library only (like tools/test.py): each step runs, from the repo root, a module of this package in the venv
tools/envs.py builds for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tools import envs, leftover_processes

# stack name -> (venv, runner module and its first arguments)
STACKS = {
    "vllm-offline": ("vllm", ["conformance.runners.vllm_stack", "offline"]),
    "vllm-server": ("vllm", ["conformance.runners.vllm_stack", "server"]),
    "sglang": ("sglang", ["conformance.runners.sglang_stack"]),
}


STEP_TIMEOUT = 20 * 60  # seconds; a step still running then has hung (CI must not hang)
MODEL_TIME = "conformance:   "  # how a step's output line giving one model's time begins; `step` shows those lines


def module_command(venv: str, module: str, *args) -> list[str]:
    return [str(envs.ensure(venv)), "-m", module, *map(str, args)]


@contextmanager
def no_process_left(what: str) -> Iterator[dict[str, str]]:
    """The environment to run step `what` in; processes the step leaves running are named and killed after it, and
    fail the run (tools/leftover_processes: a server left behind would hold the cores the next step needs)."""
    mark, env = leftover_processes.marked_environment("conformance")
    try:
        yield env
    finally:
        left = leftover_processes.kill_left_running(mark)
        for pid, command in left.items():
            print(f"conformance: {what} left process {pid} running (killed): {command[:300]}", flush=True)
    if left:
        sys.exit(f"conformance: {what} left {len(left)} process(es) running")


def step(what: str, cmd: list[str]) -> None:
    start = time.time()
    with no_process_left(what) as env:
        try:
            done = subprocess.run(cmd, cwd=envs.ROOT, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            sys.exit(f"conformance: {what} still running after {STEP_TIMEOUT} s, stopped:\n"
                     f"{(e.stdout or b'')[-2000:]!r}")
    if done.returncode != 0:
        sys.exit(f"conformance: {what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"conformance: {what} ({time.time() - start:.0f} s)", flush=True)
    print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith(MODEL_TIME)), end="", flush=True)


@contextmanager
def model_time(name: str) -> Iterator[None]:
    """Prints how long the body took for model `name`, as the line `step` shows under its step (run inside a step)."""
    start = time.time()
    yield
    print(f"{MODEL_TIME}{name} ({time.time() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated, from: " + ", ".join(STACKS))
    parser.add_argument("--work", type=Path, default=envs.ROOT / "runs" / "conformance")
    args = parser.parse_args(argv)
    stacks = args.stacks.split(",")
    unknown = set(stacks) - STACKS.keys()
    if unknown:
        parser.error(f"unknown stacks {sorted(unknown)}; choose from {', '.join(STACKS)}")
    work = args.work.resolve()
    cases = work / "cases.json"
    step("cases built (the wsd_cpt recipe's dense model at blocks 4/8/32, a random LLaDA2 at 4/8, a LLaDA2 through "
         "every recipe stage at 32; SmolLM2 converted by wsd_cpt and sft, its first step at TP 1 and 3)",
         module_command("core", "conformance.cases", work, envs.ensure("nemo")))
    step("reference decoder", module_command("core", "conformance.runners.reference", cases, work / "reference.json"))
    step("training: Megatron losses vs the core's",
         module_command("nemo", "conformance.runners.training", work / "training.json"))
    for stack in stacks:
        venv, (module, *first) = STACKS[stack]
        step(stack, module_command(venv, module, *first, cases, work / f"{stack}.json"))
    compare = module_command("core", "conformance.compare", cases, work / "reference.json",
                             f"training={work / 'training.json'}", *[f"{s}={work / f'{s}.json'}" for s in stacks])
    matrix = subprocess.run(compare, cwd=envs.ROOT, timeout=STEP_TIMEOUT).returncode
    servers = [name for stack, name in (("vllm-server", "vllm"), ("sglang", "sglang")) if stack in stacks]
    if not servers:
        return matrix
    # the recipe's dense model with its own EOS only: dense-b32's second EOS ends every output at once
    evaluated = evaluation("the wsd_cpt recipe's dense model", work / "wsd_cpt" / "hf", work / "lm_eval.json",
                           "--stacks", ",".join(servers))
    # the real checkpoint's AR original on each stack's own AR path, its chat template through each server's chat
    # endpoint (the converted model is a case of the matrix above)
    chatted = evaluation("SmolLM2's AR original, chat only", work / "smollm2" / "ar",
                         work / "lm_eval_smollm2_ar_chat.json", "--stacks", ",".join(servers), "--chat-only",
                         "--limit", "4")
    return matrix or evaluated or chatted


def evaluation(what: str, *args) -> int:
    """conformance.evaluation (lm-eval on the reference and the servers), its table shown as it runs; its exit code."""
    print(f"conformance: lm-eval on the reference and the servers ({what})", flush=True)
    start = time.time()
    with no_process_left(f"lm-eval ({what})") as env:
        code = subprocess.run(module_command("core", "conformance.evaluation", *args), cwd=envs.ROOT, env=env,
                              timeout=STEP_TIMEOUT).returncode
    print(f"conformance: lm-eval ({what}) exit {code} ({time.time() - start:.0f} s)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
