"""Which positions CAP's confidence term covers (issue #15, the CAP early-EOS question), on the models `make demo`
trains, over its held-out task instances formatted as SFT rows (prompt, answer, EOS, then EOS padding to the block).

CAP (Eq. 6) adds lambda times the mean entropy of the masked positions the model already predicts right. A response
row is the answer, its EOS, and the EOS padding that fills the last block; the padding is the easiest thing to be
right about, so it can dominate that mean. For each model this prints, at mask ratio 0.5 (fixed seed): how many
masked response positions are answer tokens (the answer and its EOS) or padding, the accuracy and mean entropy of
each kind, and the share of the confidence term's positions that are padding; and, from the demo's evaluation,
how many held-out outputs are empty (EOS first).

    make demo   # once
    $(python3 tools/envs.py --path core) -m benchmarks.cap_coverage

Writes results/cap_coverage.json.
"""

import argparse
import json
from pathlib import Path

import torch

from blockdiff.batches import make_diffusion_batch
from blockdiff.models import BlockDiffusionSettings, load_model
from blockdiff.noise import MaskBand, pad_to_block_multiple
from blockdiff.objectives import ReferenceForward, noisy_logits
from blockdiff.text import load_tokenizer
from blockdiff_demo.corpus import held_out_tasks

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32


@torch.no_grad()
def coverage(model_dir: Path) -> dict:
    model, cfg = load_model(model_dir)
    settings = BlockDiffusionSettings.from_config(cfg)
    tok = load_tokenizer(model_dir)
    eos = settings.eos_token_ids[0]
    rows, answer_len = [], []
    for task in held_out_tasks():
        prompt, answer = tok.encode(task.prompt).ids, tok.encode(task.answer).ids + [eos]
        rows.append((prompt, pad_to_block_multiple(prompt + answer, BLOCK, eos)))
        answer_len.append(len(answer))
    width = max(len(r) for _, r in rows)
    ids = torch.full((len(rows), width), eos)
    response, padding, doc_ids = (torch.zeros(len(rows), width, dtype=torch.bool) for _ in range(3))
    for i, ((prompt, row), n) in enumerate(zip(rows, answer_len)):
        ids[i, :len(row)] = torch.tensor(row)
        response[i, len(prompt):len(row)] = True
        padding[i, len(prompt) + n:len(row)] = True
        doc_ids[i, len(row):] = 1
    batch = make_diffusion_batch(ids, doc_ids.long(), BLOCK, "bdlm", settings.mask_token_id, MaskBand(0.5, 0.5),
                                 torch.Generator().manual_seed(0), maskable=response)
    logits = noisy_logits(ReferenceForward(model.eval()), batch).float()
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    right = batch.masked & (logits.argmax(-1) == batch.targets)
    out = {}
    for kind, where in (("answer", batch.masked & ~padding), ("padding", batch.masked & padding)):
        out[kind] = {"masked": int(where.sum()), "accuracy": float((right & where).sum() / where.sum()),
                     "entropy": float(entropy[where].mean()),
                     "entropy_when_right": float(entropy[right & where].mean())}
    out["padding_share_of_confidence_term"] = float((right & padding).sum() / right.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    args = parser.parse_args()
    evaluation = json.loads((args.runs / "demo/evaluation.json").read_text())
    results = {}
    print(f"{'model':>6} {'kind':>8} {'masked':>7} {'accuracy':>9} {'entropy':>8} {'H right':>8}")
    for name in ("sft", "cap", "dpo"):
        model_dir = args.runs / "nemo" / name / "hf"
        if not model_dir.exists():
            raise SystemExit(f"{model_dir} does not exist: run `make demo` first")
        r = coverage(model_dir)
        outputs = evaluation["models"][str(Path("runs/nemo") / name / "hf")]["outputs"]
        r["empty_outputs"], r["outputs"] = sum(o == "" for o in outputs), len(outputs)
        results[name] = r
        for kind in ("answer", "padding"):
            k = r[kind]
            print(f"{name:>6} {kind:>8} {k['masked']:>7} {k['accuracy']:>9.1%} {k['entropy']:>8.3f} "
                  f"{k['entropy_when_right']:>8.3f}")
        print(f"{name:>6} padding share of the confidence term's positions "
              f"{r['padding_share_of_confidence_term']:.1%}; "
              f"held-out outputs empty (EOS first): {r['empty_outputs']} of {r['outputs']}")
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results/cap_coverage.json").write_text(json.dumps(results, indent=1) + "\n")
    print("written results/cap_coverage.json")


if __name__ == "__main__":
    main()
