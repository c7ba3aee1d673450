"""CAP against SFT alone at an equal budget, on held-out task accuracy (issue #15 item 3, "parallel decoding pays";
issue #6 item 5). The demo's CAP stage continues its SFT model for 200 steps with the confidence term; here the same
NeMo command continues the same SFT model for the same 200 steps with lambda 0 (SFT alone: also the "conversion keeps
quality" figure, SFT at 600 steps against the AR base), 0.5 (the demo's), 1 and 2. Each is decoded on the 180
held-out task instances at block 32 over thresholds 0.5-0.99: exact-match accuracy, TPF and tokens/s, one request at
a time, with the AR base's greedy accuracy and tokens/s beside them.

    make demo   # once: the AR base, the data and runs/nemo/sft/hf
    $(python3 tools/envs.py --path core) -m benchmarks.cap_effect

Writes results/cap_effect.{json,png} (about 9 minutes).
"""

import argparse
import json
from pathlib import Path

from benchmarks.conversion_ablations import nemo
from blockdiff_demo.corpus import held_out_tasks
from blockdiff_demo.evaluate import Evaluation, evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
LAMBDAS = (0.0, 0.5, 1.0, 2.0)
THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)


def continue_sft(start: Path, out: Path, confidence_weight: float) -> Path:
    """The demo's CAP stage (`dllm_cap_tiny`: 200 steps from the SFT model) with this lambda."""
    nemo("llm", "finetune", "--factory", "dllm_cap_tiny", f"model.recipe.init_from={start}",
         f"model.recipe.out_dir={out}", f"model.recipe.confidence_weight={confidence_weight}")
    return out / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/cap_effect"))
    args = parser.parse_args()
    base_dir, sft_dir = ROOT / "runs/demo/ar-base", ROOT / "runs/nemo/sft/hf"
    for d in (base_dir, sft_dir):
        if not (d / "config.json").exists():
            raise SystemExit(f"{d} does not exist: run `make demo` first")
    models = {weight: continue_sft(sft_dir, ROOT / args.out / f"lambda_{weight}", weight) for weight in LAMBDAS}
    tasks = held_out_tasks()
    base = evaluate(base_dir, tasks, name="ar-base")
    print(f"{len(tasks)} held-out tasks, block 32, one request at a time; AR base (greedy) {base.accuracy:.1%}, "
          f"{base.tokens_per_second:.0f} tok/s\n{'lambda':>7}{'threshold':>10}{'accuracy':>10}{'TPF':>7}{'tok/s':>8}")
    rows = []
    for weight, model_dir in models.items():
        for threshold in THRESHOLDS:
            e = evaluate(model_dir, tasks, 32, threshold, name=f"lambda {weight}")
            rows.append({"lambda": weight} | e.summary())
            print(f"{weight:>7}{threshold:>10}{e.accuracy:>10.1%}{e.tpf:>7.2f}{e.tokens_per_second:>8.0f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cap_effect.json").write_text(json.dumps(
        {"tasks": f"{len(tasks)} held-out instances of the demo's task family", "start": str(sft_dir.relative_to(ROOT)),
         "steps": 200, "ar_base": base.summary(), "rows": rows}, indent=1) + "\n")
    plot(rows, base)
    print(f"written {RESULTS}/cap_effect.json and .png")


def plot(rows: list[dict], base: Evaluation) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for weight in LAMBDAS:
        mine = [r for r in rows if r["lambda"] == weight]
        ax.plot([r["tpf"] for r in mine], [r["accuracy"] for r in mine], marker="o",
                label="SFT alone (lambda 0)" if weight == 0 else f"CAP, lambda {weight}")
    ax.axhline(base.accuracy, color="gray", linestyle="--", label="AR base (greedy)")
    ax.set(xlabel="tokens per forward (TPF), thresholds 0.99 (left) to 0.5", ylabel="held-out exact-match accuracy")
    ax.legend()
    fig.suptitle("CAP against SFT alone, 200 more steps from the same SFT model")
    fig.tight_layout()
    fig.savefig(RESULTS / "cap_effect.png", dpi=120)


if __name__ == "__main__":
    main()
