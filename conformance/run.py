"""Run the conformance matrix: build the cases, run every stack in its own venv, print the comparison table.

    python3 conformance/run.py                     # every stack; exit 1 on any mismatch
    python3 conformance/run.py --stacks vllm-offline --work /tmp/conf

Standard library only (like tools/test.py): each step runs in the venv tools/envs.py builds for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
import envs  # noqa: E402

# stack name -> (venv, runner command after the python)
STACKS = {
    "vllm-offline": ("vllm", [HERE / "runners" / "vllm_stack.py", "offline"]),
    "vllm-server": ("vllm", [HERE / "runners" / "vllm_stack.py", "server"]),
    "sglang": ("sglang", [HERE / "runners" / "sglang_stack.py"]),
}


def python(venv: str) -> str:
    return str(envs.ensure(venv))


STEP_TIMEOUT = 20 * 60  # seconds; a step still running then has hung (CI must not hang)


def step(what: str, cmd: list) -> None:
    start = time.time()
    try:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        sys.exit(f"conformance: {what} still running after {STEP_TIMEOUT} s, stopped:\n{(e.stdout or b'')[-2000:]!r}")
    if done.returncode != 0:
        sys.exit(f"conformance: {what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"conformance: {what} ({time.time() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated, from: " + ", ".join(STACKS))
    parser.add_argument("--work", type=Path, default=HERE.parent / "runs" / "conformance")
    args = parser.parse_args(argv)
    stacks = args.stacks.split(",")
    unknown = set(stacks) - STACKS.keys()
    if unknown:
        parser.error(f"unknown stacks {sorted(unknown)}; choose from {', '.join(STACKS)}")
    work = args.work.resolve()
    cases = work / "cases.json"
    step("cases built (the wsd_cpt recipe's dense model, a random LLaDA2, block sizes 4/8/32)",
         [python("core"), HERE / "cases.py", work, python("nemo")])
    step("reference decoder", [python("core"), HERE / "runners" / "reference.py", cases, work / "reference.json"])
    step("training: Megatron losses vs the core's", [python("nemo"), HERE / "runners" / "training.py",
                                                     work / "training.json"])
    for stack in stacks:
        venv, cmd = STACKS[stack]
        step(stack, [python(venv), *cmd, cases, work / f"{stack}.json"])
    return subprocess.run([python("core"), HERE / "compare.py", cases, work / "reference.json",
                           f"training={work / 'training.json'}", *[f"{s}={work / f'{s}.json'}" for s in stacks]]
                          ).returncode


if __name__ == "__main__":
    sys.exit(main())
