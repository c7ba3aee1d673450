"""Speed against quality with the reference decoder on the SFT model `make demo` trains, on its held-out task
instances (issue #15 item 3; issue #6 item 3).

Item 3, the paper's Figure 4 at toy scale: held-out exact-match accuracy, TPF (tokens per denoising forward) and
tokens/s for thresholds 0.5-0.99 and block sizes 8/16/32/64, on the SFT model, with the AR base's greedy accuracy and
tokens/s as the line to beat. Requests run one at a time (concurrency 1), as in the demo's table. (CAP against SFT
alone: `benchmarks.cap_effect`.)

    make demo   # once: trains runs/demo/ar-base and runs/nemo/sft/hf
    $(python3 tools/envs.py --path core) -m benchmarks.decoding_quality

Writes results/decoding_tradeoff.{json,png}.
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


def show(e: Evaluation) -> None:
    decoding = "AR greedy" if e.block_size is None else f"{e.block_size:>5}{e.threshold:>11}"
    print(f"{e.model:>8} {decoding:>16}{e.accuracy:>10.1%}{e.tpf:>7.2f}{e.tokens_per_second:>8.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    args = parser.parse_args()
    dirs = {"ar-base": args.runs / "demo/ar-base", "sft": args.runs / "nemo/sft/hf"}
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
    setup = {"tasks": f"{len(tasks)} held-out instances of the demo's task family", "ar_base": base.summary()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decoding_tradeoff.json").write_text(
        json.dumps({**setup, "rows": [e.summary() for e in tradeoff]}, indent=1) + "\n")
    plot(tradeoff, base)
    print(f"written {RESULTS}/decoding_tradeoff.json and .png")


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
