"""Speed against quality with the reference decoder on the models `make demo` trains (issue #6, items 3 and 5).

Item 3, the paper's Figure 4 at toy scale: TPF (tokens per denoising forward) and quality for thresholds 0.1-0.99 and
block sizes 8/16/32/64, on the SFT model. Item 5, CAP's effect: the same measures for `sft` and `cap` (equal
budgets from the same converted model) at block 32.

Quality, two measures, both on HumanEval prompts:
  - agreement: the share of output positions equal to the same model's one-token-per-step decode (threshold 1, so
    every step commits only its single most confident token): what committing several tokens per step costs;
  - AR match: the share of output positions equal to the greedy continuation of the AR base the model was converted
    from.
and the held-out masked-token accuracy at mask ratio 0.5 (a property of the model, not of the threshold).

    make demo   # once: trains runs/demo/ar-base and runs/nemo/{sft,cap}/hf
    $(python3 tools/envs.py --path core) -m benchmarks.decoding_quality

Writes results/decoding_tradeoff.{json,png} and results/cap_effect.json.
"""

import argparse
import json
from pathlib import Path

import torch

from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff.masks import block_causal_mask
from blockdiff.models import BlockDiffusionSettings, load_model
from blockdiff.objectives import ReferenceForward, heldout_accuracy
from blockdiff.text import load_tokenizer
from blockdiff_demo.corpus import humaneval_prompts
from blockdiff_demo.evaluate import block_aligned_budget
from blockdiff_demo.job import SCALES, build_data

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.95, 0.99)  # below 0.5 too: where a toy model's confidences lie
BLOCK_SIZES = (8, 16, 32, 64)
SCALE = SCALES["default"]


def load(model_dir: Path):
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} does not exist: run `make demo` first")
    model, cfg = load_model(model_dir)
    return model.eval(), BlockDiffusionSettings.from_config(cfg)


def prompts_for(model_dir: Path, count: int, max_tokens: int) -> list[list[int]]:
    tok = load_tokenizer(model_dir)
    budget = SCALE["seq_len"] - max_tokens  # the models were trained on rows of seq_len
    return [tok.encode(p).ids[-budget:] for p in humaneval_prompts()[:count]]


@torch.no_grad()
def greedy_ar(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        n = len(ids)
        logits = model(torch.tensor([ids]), torch.arange(n)[None], block_causal_mask(n, 1)[None])
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def match(outputs: list[list[int]], references: list[list[int]]) -> float:
    """Share of reference positions the output reproduces (positions past an output's end count as misses)."""
    same = sum(sum(a == b for a, b in zip(out, ref)) for out, ref in zip(outputs, references))
    return same / sum(len(ref) for ref in references)


def decode(decoder, prompts, max_tokens: int, block_size: int, threshold: float) -> tuple[list[list[int]], float]:
    """Each output ends on a block boundary at or below max_tokens, so no block is decoded and then cut (which would
    dilute TPF)."""
    params = [DecodeParams(block_aligned_budget(len(p), max_tokens, block_size), block_size, threshold)
              for p in prompts]
    results = decoder.generate(prompts, params)
    tpf = sum(len(r.tokens) for r in results) / sum(r.denoise_forwards for r in results)
    return [r.tokens for r in results], tpf


def measure(model_dir: Path, prompts, ar_outputs, max_tokens: int, block_sizes, thresholds) -> list[dict]:
    model, settings = load(model_dir)
    decoder = ReferenceDecoder(model, settings.mask_token_id, settings.eos_token_ids)
    rows = []
    for block in block_sizes:
        sequential, _ = decode(decoder, prompts, max_tokens, block, 1.0)
        ar_budgeted = [a[:block_aligned_budget(len(p), max_tokens, block)] for p, a in zip(prompts, ar_outputs)]
        for threshold in thresholds:
            outputs, tpf = decode(decoder, prompts, max_tokens, block, threshold)
            rows.append({"block_size": block, "threshold": threshold, "tpf": tpf,
                         "agreement": match(outputs, sequential),
                         "ar_match": match(outputs, ar_budgeted),
                         "output_tokens": sum(map(len, outputs))})
            print(f"{model_dir.parent.name:>5}{block:>7}{threshold:>11}{tpf:>7.2f}{rows[-1]['agreement']:>11.1%}"
                  f"{rows[-1]['ar_match']:>10.1%}{rows[-1]['output_tokens']:>8}", flush=True)
    return rows


def accuracy(model_dir: Path, data_dir: Path) -> float:
    model, settings = load(model_dir)
    _, _, _, val_ids, val_doc = build_data(data_dir, SCALE["vocab"], SCALE["seq_len"])
    return heldout_accuracy(ReferenceForward(model), val_ids, val_doc, settings.block_size, settings.mask_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    sft_dir, cap_dir, ar_dir = args.runs / "nemo/sft/hf", args.runs / "nemo/cap/hf", args.runs / "demo/ar-base"
    prompts = prompts_for(sft_dir, args.prompts, args.max_tokens)
    ar_model, _ = load_model(ar_dir)
    ar_outputs = [greedy_ar(ar_model.eval(), p, args.max_tokens) for p in prompts]
    print(f"{'model':>5}{'block':>7}{'threshold':>11}{'TPF':>7}{'agreement':>11}{'AR match':>10}{'tokens':>8}")
    tradeoff = measure(sft_dir, prompts, ar_outputs, args.max_tokens, BLOCK_SIZES, THRESHOLDS)
    cap = {name: {"rows": measure(d, prompts, ar_outputs, args.max_tokens, (32,), (0.5, 0.7, 0.95)),
                  "heldout_masked_accuracy": accuracy(d, args.runs / "demo")}
           for name, d in (("sft", sft_dir), ("cap", cap_dir))}
    for name, r in cap.items():
        print(f"{name}: held-out masked-token accuracy {r['heldout_masked_accuracy']:.1%}")
    setup = {"prompts": f"HumanEval 0-{args.prompts - 1}", "max_tokens": args.max_tokens,
             "quality": "agreement = match with the same model at threshold 1; ar_match = match with the AR base"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decoding_tradeoff.json").write_text(
        json.dumps({**setup, "model": str(sft_dir.relative_to(ROOT) if sft_dir.is_relative_to(ROOT) else sft_dir),
                    "rows": tradeoff}, indent=1) + "\n")
    (RESULTS / "cap_effect.json").write_text(json.dumps({**setup, "block_size": 32, **cap}, indent=1) + "\n")
    plot(tradeoff)
    print(f"written {RESULTS}/decoding_tradeoff.json, .png and cap_effect.json")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, quality) = plt.subplots(1, 2, figsize=(10, 4))
    for block in BLOCK_SIZES:
        mine = [r for r in rows if r["block_size"] == block]
        speed.plot([r["threshold"] for r in mine], [r["tpf"] for r in mine], marker="o", label=f"block {block}")
        quality.plot([r["tpf"] for r in mine], [r["agreement"] for r in mine], marker="o", label=f"block {block}")
    speed.set(xlabel="threshold", ylabel="tokens per forward (TPF)")
    quality.set(xlabel="tokens per forward (TPF)", ylabel="agreement with one-token-per-step decoding")
    for ax in (speed, quality):
        ax.legend()
    fig.suptitle("Threshold and block size on the tiny SFT model (reference decoder, HumanEval prompts)")
    fig.tight_layout()
    fig.savefig(RESULTS / "decoding_tradeoff.png", dpi=120)


if __name__ == "__main__":
    main()
