"""Speed against quality with the reference decoder on the models `make demo` trains, on its held-out task instances
(issue #15 item 3; issue #6 items 3 and 5).

Item 3, the paper's Figure 4 at toy scale: held-out exact-match accuracy, TPF (tokens per denoising forward) and
tokens/s for thresholds 0.5-0.99 and block sizes 8/16/32/64, on the SFT model, with the AR base's greedy accuracy and
tokens/s as the line to beat. Item 5, CAP's effect: the same measures for `sft` and `cap` (equal budgets from the same
converted model) at block 32. Requests run one at a time (concurrency 1), as in the demo's table.

    make demo   # once: trains runs/demo/ar-base and runs/nemo/{sft,cap}/hf
    $(python3 tools/envs.py --path core) -m benchmarks.decoding_quality

Writes results/decoding_tradeoff.{json,png} and results/cap_effect.json.
"""

import argparse
import json
from pathlib import Path

from blockdiff_demo.corpus import held_out_tasks
from blockdiff_demo.evaluate import Evaluation, evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
BLOCK_SIZES = (8, 16, 32, 64)
CAP_THRESHOLDS = (0.5, 0.7, 0.95)  # block 32; SFT's rows come from the sweep above


def show(e: Evaluation) -> None:
    decoding = "AR greedy" if e.block_size is None else f"{e.block_size:>5}{e.threshold:>11}"
    print(f"{e.model:>8} {decoding:>16}{e.accuracy:>10.1%}{e.tpf:>7.2f}{e.tokens_per_second:>8.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    args = parser.parse_args()
    dirs = {"ar-base": args.runs / "demo/ar-base", "sft": args.runs / "nemo/sft/hf", "cap": args.runs / "nemo/cap/hf"}
    for d in dirs.values():
        if not (d / "config.json").exists():
            raise SystemExit(f"{d} does not exist: run `make demo` first")
    tasks = held_out_tasks()
    print(f"{len(tasks)} held-out tasks, exact match, one request at a time\n"
          f"{'model':>8} {'block  threshold':>16}{'accuracy':>10}{'TPF':>7}{'tok/s':>8}")
    base = evaluate(dirs["ar-base"], tasks, name="ar-base")
    show(base)
    tradeoff = []
    for block in BLOCK_SIZES:
        for threshold in THRESHOLDS:
            tradeoff.append(evaluate(dirs["sft"], tasks, block, threshold, name="sft"))
            show(tradeoff[-1])
    cap = {"sft": [e for e in tradeoff if e.block_size == 32 and e.threshold in CAP_THRESHOLDS],
           "cap": [evaluate(dirs["cap"], tasks, 32, t, name="cap") for t in CAP_THRESHOLDS]}
    for e in cap["cap"]:
        show(e)
    setup = {"tasks": f"{len(tasks)} held-out instances of the demo's task family", "ar_base": base.summary()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decoding_tradeoff.json").write_text(
        json.dumps({**setup, "rows": [e.summary() for e in tradeoff]}, indent=1) + "\n")
    (RESULTS / "cap_effect.json").write_text(
        json.dumps({**setup, "block_size": 32, **{n: [e.summary() for e in es] for n, es in cap.items()}}, indent=1) + "\n")
    plot(tradeoff, base)
    print(f"written {RESULTS}/decoding_tradeoff.json, .png and cap_effect.json")


def plot(rows: list[Evaluation], base: Evaluation) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, quality) = plt.subplots(1, 2, figsize=(10, 4))
    for block in BLOCK_SIZES:
        mine = [r for r in rows if r.block_size == block]
        speed.plot([r.threshold for r in mine], [r.tpf for r in mine], marker="o", label=f"block {block}")
        quality.plot([r.threshold for r in mine], [r.accuracy for r in mine], marker="o", label=f"block {block}")
    quality.axhline(base.accuracy, color="gray", linestyle="--", label="AR base (greedy)")
    speed.set(xlabel="threshold", ylabel="tokens per forward (TPF)")
    quality.set(xlabel="threshold", ylabel="held-out exact-match accuracy")
    for ax in (speed, quality):
        ax.legend()
    fig.suptitle("Threshold and block size on the tiny SFT model (reference decoder, held-out tasks)")
    fig.tight_layout()
    fig.savefig(RESULTS / "decoding_tradeoff.png", dpi=120)


if __name__ == "__main__":
    main()
