"""Conformance can catch a broken stack: rerun one stack with a deliberate break in its plugin
(conformance/mutations) on one model's cases from the work folder `python -m conformance.run` left, and require the
comparison with the reference records to fail naming that stack. Run by `make test` after the matrix. One model is
enough to show the catch and keeps the rerun to about a minute.

    python3 -m conformance.mutation [--work runs/conformance]     # exit 0 when the break was caught
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from conformance.run import STEP_TIMEOUT, module_command, no_process_left
from tools import envs

# mutation -> the stack it breaks (a name of conformance.run.STACKS) and its runner
MUTATIONS = {"vllm-unsplit-attention": ("vllm-offline", "vllm", ["conformance.runners.vllm_stack", "offline"])}
# The model whose cases the broken stack reruns: the random LLaDA2 at block 8, whose prompts span several blocks and
# whose near-flat logits turn any change in attention into other tokens. The trained dense model's cases miss this
# break (measured: dense-b4, -b8 and -b32 each still all identical under it); the matrix has both for this reason.
MODEL = "llada2-b8"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=envs.ROOT / "runs" / "conformance")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    needed = [work / "cases.json", work / "reference.json"]
    if missing := [str(p) for p in needed if not p.exists()]:
        parser.error(f"run `python3 -m conformance.run --work {work}` first; missing {', '.join(missing)}")
    spec = json.loads(needed[0].read_text())
    cases = work / f"cases-{MODEL}.json"
    cases.write_text(json.dumps({"models": {MODEL: spec["models"][MODEL]},
                                 "cases": [c for c in spec["cases"] if c["model"] == MODEL]}))
    caught = True
    for mutation, (stack, venv, (module, *first)) in MUTATIONS.items():
        records = work / f"mutated-{stack}.json"
        with no_process_left(f"mutation {mutation}") as env:
            env.update(PYTHONPATH=str(Path(__file__).resolve().parent / "mutations"), BLOCKDIFF_MUTATION=mutation)
            subprocess.run(module_command(venv, module, *first, cases, records), cwd=envs.ROOT, env=env, check=True,
                           capture_output=True, timeout=STEP_TIMEOUT)
        compared = subprocess.run(module_command("core", "conformance.compare", cases, needed[1],
                                                 f"{stack}={records}"),
                                  cwd=envs.ROOT, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        named = f"[{stack}]" in compared.stdout
        print(f"conformance: mutation {mutation} of {stack} on {MODEL}: compare exit {compared.returncode}, "
              f"{'names' if named else 'does not name'} {stack}: "
              f"{'caught' if compared.returncode and named else 'MISSED'}")
        caught &= compared.returncode != 0 and named
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
