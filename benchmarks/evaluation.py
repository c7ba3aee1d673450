"""lm-eval over the main job's models (issue #18 item 5): every model `make demo` leaves (the AR base and each
stage's block-diffusion model) on this plugin's three offline tasks, full sets, through lm-eval's own evaluator with
the `blockdiff` model (the core's reference decoder, one request at a time; block 32, threshold 0.95 from each
checkpoint; the AR base greedily); then the CAP model through lm-eval's OpenAI client against the vLLM and SGLang
servers (conformance.evaluation, every document), which must give the reference's outputs and scores.

    make demo   # once: trains runs/demo/ar-base and runs/nemo/*
    make eval   # or: $(python3 tools/envs.py --path core) -m benchmarks.evaluation [--servers vllm,sglang]

Prints the table and writes results/evaluation.json and results/lm_eval_servers.json; docs/evaluation.md holds a
run's figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from conformance import evaluation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
MODELS = {"ar-base": "runs/demo/ar-base", "wsd_merged": "runs/nemo/wsd_merged", "sft": "runs/nemo/sft/hf",
          "cap": "runs/nemo/cap/hf", "dpo": "runs/nemo/dpo/hf"}


def table(rows: dict[str, dict]) -> str:
    head = "| model | task | score | TPF | NFE per token | tokens/s |\n|---|---|---:|---:|---:|---:|"
    lines = [head]
    for model, tasks in rows.items():
        for task, row in tasks.items():
            score = next(row[m] for m in evaluation.SCORES if m in row)
            lines.append(f"| {model} | {task} | {score:.1%} | {row['tpf']:.2f} | {row['nfe_per_token']:.2f} | "
                         f"{row['tokens_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="vllm,sglang", help="stacks that serve the CAP model ('' for none)")
    args = parser.parse_args(argv)
    missing = [d for d in MODELS.values() if not (ROOT / d / "config.json").exists()]
    if missing:
        raise SystemExit(f"evaluation: {missing} not found; run `make demo` first")
    RESULTS.mkdir(exist_ok=True)
    rows, start = {}, time.time()
    for name, directory in MODELS.items():
        results = evaluation.evaluate("blockdiff", {"pretrained": str(ROOT / directory)}, evaluation.TASKS, None)
        rows[name] = {task: {k: v for k, v in row.items() if k != "outputs"}
                      for task, row in evaluation.summary(results).items()}
        print(f"evaluation: {name} done ({time.time() - start:.0f} s)", flush=True)
    (RESULTS / "evaluation.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    if args.servers:
        code = evaluation.main([str(ROOT / MODELS["cap"]), str(RESULTS / "lm_eval_servers.json"), "--stacks",
                                args.servers, "--limit", "0"])
        if code:
            raise SystemExit("evaluation: a server's outputs differ from the reference's (see above)")


if __name__ == "__main__":
    main()
