"""The conversion choices the paper argues for, on held-out task accuracy (issue #15 item 3): each variant is the main
job's recipe with one thing changed, run through the same NeMo commands from the same AR base and data, then decoded
on the 180 held-out task instances (block 32, threshold 0.95, exact match).

  - WSD against direct conversion: Warmup-Stable-Decay (blocks 1, 4, 32, 64, MDLM 256, 128, 64, 32) against BDLM at
    the final block size 32 throughout, the same token budget (144 steps); each followed by the demo's merge and SFT;
  - the document-level mask against none on packed rows: WSD with `document_mask=false` (every packed row of the
    pretraining data trained as one sequence, attention and positions across its documents), merged, then SFT;
  - complementary masking in SFT on and off, from the same merged WSD model.

    make demo   # once: the AR base and the data
    $(python3 tools/envs.py --path core) -m benchmarks.conversion_ablations

Writes results/conversion_ablations.json (about 25 minutes).
"""

import argparse
import json
from pathlib import Path

from blockdiff_demo.corpus import held_out_tasks
from blockdiff_demo.evaluate import evaluate
from drivers.nemo_cli import run_nemo

ROOT = Path(__file__).resolve().parent.parent
STEP_TOKENS = 8 * 256  # the tiny WSD recipe's batch x seq_len
DIRECT = ["model.recipe.warmup_blocks=[32]", "model.recipe.decay_blocks=[32]",
          f"model.recipe.warmup_tokens={72 * STEP_TOKENS}", f"model.recipe.stable_tokens={STEP_TOKENS}",
          f"model.recipe.decay_tokens={71 * STEP_TOKENS}"]  # 144 steps of BDLM at block 32, as many as WSD's


def nemo(*args: str) -> None:
    run_nemo(*args, timeout=1800, quiet=True)


def convert(out: Path, name: str, overrides: list[str]) -> Path:
    """wsd_cpt with `overrides`, then the demo's top-2 merge; returns the merged model."""
    nemo("llm", "pretrain", "--factory", "dllm_wsd_tiny", f"model.recipe.out_dir={out / name}", *overrides)
    nemo("dllm", "merge", "--factory", "tiny", f"config.run_dir={out / name}", f"config.out_dir={out / name}_merged")
    return out / f"{name}_merged"


def finetune(out: Path, name: str, start: Path, overrides: list[str] = ()) -> Path:
    nemo("llm", "finetune", "--factory", "dllm_sft_tiny", f"model.recipe.init_from={start}",
         f"model.recipe.out_dir={out / name}", *overrides)
    return out / name / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    args = parser.parse_args()
    if not (ROOT / "runs/demo/ar-base/config.json").exists():
        raise SystemExit("runs/demo/ar-base does not exist: run `make demo` first")
    wsd = convert(args.out, "wsd", [])
    direct = convert(args.out, "direct", DIRECT)
    unmasked = convert(args.out, "no_doc_mask", ["model.recipe.document_mask=false"])
    models = {"wsd, merged": wsd, "wsd -> sft": finetune(args.out, "wsd_sft", wsd),
              "direct, merged": direct, "direct -> sft": finetune(args.out, "direct_sft", direct),
              "wsd no doc mask, merged": unmasked,
              "wsd no doc mask -> sft": finetune(args.out, "no_doc_mask_sft", unmasked),
              "wsd -> sft, no complementary": finetune(args.out, "wsd_sft_plain", wsd,
                                                       ["model.recipe.complementary=false"])}
    tasks = held_out_tasks()
    results = {}
    print(f"{len(tasks)} held-out tasks, block 32, threshold 0.95\n{'variant':<30}{'accuracy':>9}{'TPF':>6}")
    for name, model_dir in models.items():
        e = evaluate(ROOT / model_dir, tasks, name=name)
        results[name] = e.summary()
        print(f"{name:<30}{e.accuracy:>9.1%}{e.tpf:>6.2f}", flush=True)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results/conversion_ablations.json").write_text(json.dumps(results, indent=1) + "\n")
    print("written results/conversion_ablations.json")


if __name__ == "__main__":
    main()
