"""The toy-scale main job: train a tiny AR model on the standard library mixed with a task family that has checkable
answers (`tasks.py`) and write the recipes' JSONL data (`base`), convert it to block diffusion with a short core-only
Warmup-Stable-Decay run (`convert`), then score models on the held-out tasks: exact-match accuracy beside TPF and
tokens/s (`evaluate`). `make demo` uses `base`, runs the conversion and post-training as NeMo recipes on Megatron,
and ends with `evaluate` over the AR base and every stage's model. `base --arch llada2_moe` makes the same base as
LLaDA2.0's MoE architecture instead (`runs/demo/moe-base`, the `moe_tiny` recipes' start; `make demo-moe`).

    python -m blockdiff_demo [all|base|convert|evaluate MODEL...] [--out runs/demo] [--scale quick] [--arch ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from blockdiff.models import (
    BlockDiffusionSettings,
    build_model,
    init_weights,
    load_model,
    save_model,
    tiny_dense_config,
    tiny_llada2_config,
    with_block_diffusion,
)
from blockdiff.objectives import ReferenceForward, heldout_accuracy
from blockdiff.schedules import WSDSchedule
from blockdiff.text import EOS, MASK, load_tokenizer, pack_documents, save_tokenizer, special_id, train_tokenizer
from blockdiff_demo.corpus import (
    VALIDATION_EVERY,
    held_out_tasks,
    pretraining_texts,
    stdlib_fingerprint,
    write_recipe_data,
)
from blockdiff_demo.evaluate import evaluate, table
from blockdiff_demo.tasks import is_exact
from blockdiff_demo.train import OptimConfig, train_ar, train_wsd

# phase_steps: each WSD phase's token budget in training steps (Stable gets twice that). eval_tasks: how many
# held-out task instances `evaluate` decodes with each model.
SCALES = {
    "default": dict(vocab=2048, seq_len=256, ar_steps=1500, phase_steps=50, batch=8, eval_tasks=180),
    "quick": dict(vocab=512, seq_len=64, ar_steps=30, phase_steps=3, batch=4, eval_tasks=9),
}


def build_data(out: Path, vocab: int, seq_len: int
               ) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokenizer (trained on the pretraining corpus once) and the corpus packed into rows: (tokenizer dir, train
    ids, train doc ids, the first 32 validation rows and their doc ids), held out as the recipes hold out."""
    tok_dir = out / "tokenizer"
    texts = pretraining_texts()
    if not (tok_dir / "tokenizer.json").exists():
        save_tokenizer(train_tokenizer(texts, vocab), tok_dir, model_max_length=4096)
    tok = load_tokenizer(tok_dir)
    eos = special_id(tok, EOS)
    encoded = [e.ids for e in tok.encode_batch(texts)]
    held_out = [i % VALIDATION_EVERY == VALIDATION_EVERY - 1 for i in range(len(encoded))]
    ids, doc_ids = pack_documents([e for e, v in zip(encoded, held_out) if not v], seq_len, eos)
    val_ids, val_doc = pack_documents([e for e, v in zip(encoded, held_out) if v], seq_len, eos)
    return tok_dir, ids, doc_ids, val_ids[:32], val_doc[:32]


def copy_tokenizer(src: Path, model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((src / name).read_bytes())


# The base's architecture -> its directory under `out`: a dense Qwen3, or LLaDA2.0's MoE (3 layers, the first dense;
# 8 experts, top-2 in 4 groups), the two architectures the recipes train on Megatron.
BASES = {"qwen3": "ar-base", "llada2_moe": "moe-base"}


def base_config(arch: str, vocab_size: int, eos: int, mask: int) -> dict:
    if arch == "llada2_moe":
        cfg = tiny_llada2_config(vocab_size, mask_token_id=mask, eos_token_id=eos)
        del cfg["block_diffusion"]  # an AR base: the WSD stage makes it a block-diffusion model
        return cfg
    return tiny_dense_config(vocab_size=vocab_size, eos_token_id=eos, pad_token_id=eos)


def make_base(out: Path, s: dict, arch: str = "qwen3") -> Path:
    """Data, tokenizer and the tiny AR base of architecture `arch` at `out/<BASES[arch]>`."""
    print(f"[base] data: standard-library corpus with the task family, a {s['vocab']}-token BPE tokenizer", flush=True)
    print(f"       the standard library read: {stdlib_fingerprint()}", flush=True)
    tok_dir, ids, doc_ids, _, _ = build_data(out, s["vocab"], s["seq_len"])
    tok = load_tokenizer(tok_dir)
    eos = special_id(tok, EOS)
    print(f"       {ids.numel():,} training tokens in {ids.shape[0]} rows of {s['seq_len']}", flush=True)
    ar_dir = out / BASES[arch]
    print(f"[base] AR pretraining of the tiny {arch} base -> {ar_dir}", flush=True)
    cfg = base_config(arch, tok.get_vocab_size(), eos, special_id(tok, MASK))
    model = init_weights(build_model(cfg), seed=0)
    losses = train_ar(model, ids, doc_ids, s["ar_steps"], s["batch"])
    save_model(model, cfg, ar_dir)
    copy_tokenizer(tok_dir, ar_dir)
    print(f"       AR loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
    files = write_recipe_data(out / "data")
    print(f"[base] the recipes' data: {', '.join(str(p) for p in files.values())}", flush=True)
    base = evaluate(ar_dir, held_out_tasks(s["eval_tasks"]), name=BASES[arch])
    print(f"[base] held-out task accuracy of the AR base (greedy, exact match): {base.accuracy:.1%} "
          f"({base.tokens_per_second:.0f} tokens/s)", flush=True)
    return ar_dir


def convert(out: Path, s: dict, threshold: float) -> Path:
    """The core-only WSD conversion of `out/ar-base` into `out/dllm` (the NeMo recipe does this on Megatron)."""
    ar_dir, dllm_dir = out / "ar-base", out / "dllm"
    model, cfg = load_model(ar_dir)
    tok = load_tokenizer(ar_dir)
    eos, mask_id = special_id(tok, EOS), special_id(tok, MASK)
    _, ids, doc_ids, val_ids, val_doc = build_data(out, s["vocab"], s["seq_len"])
    settings = BlockDiffusionSettings(mask_token_id=mask_id, eos_token_ids=(eos,), block_size=32, threshold=threshold)
    step_tokens = s["batch"] * s["seq_len"]
    schedule = WSDSchedule.build(s["seq_len"], warmup_tokens=s["phase_steps"] * step_tokens,
                                 stable_tokens=2 * s["phase_steps"] * step_tokens,
                                 decay_tokens=s["phase_steps"] * step_tokens, final_block=settings.block_size)
    print(f"[convert] WSD conversion to block diffusion: "
          f"{' -> '.join(str(p.block_size) for p in schedule.phases)} -> {dllm_dir}", flush=True)
    acc_before = heldout_accuracy(ReferenceForward(model), val_ids, val_doc, settings.block_size, mask_id)
    history = train_wsd(model, ids, doc_ids, schedule, s["batch"], mask_id, OptimConfig(lr=2e-3, warmup_steps=5))
    save_model(model, with_block_diffusion(cfg, settings), dllm_dir)
    copy_tokenizer(ar_dir, dllm_dir)
    acc_after = heldout_accuracy(ReferenceForward(model), val_ids, val_doc, settings.block_size, mask_id)
    print(f"          diffusion loss {history[0][1]:.3f} -> {history[-1][1]:.3f}; held-out masked-token accuracy "
          f"at t=0.5: {acc_before:.1%} (AR base) -> {acc_after:.1%} (chance {1 / tok.get_vocab_size():.2%})",
          flush=True)
    return dllm_dir


def stage_name(model_dir: Path) -> str:
    """runs/nemo/sft/hf -> sft, runs/demo/ar-base -> ar-base."""
    return model_dir.parent.name if model_dir.name == "hf" else model_dir.name


def evaluate_models(model_dirs: list[Path], s: dict, threshold: float, out: Path, show: int = 6) -> list:
    """Held-out accuracy, TPF and tokens/s of each model (AR greedy or block 32 at `threshold`), printed as a table
    with the last model's first `show` completions; written to out/evaluation.json."""
    tasks = held_out_tasks(s["eval_tasks"])
    evaluations = [evaluate(d, tasks, threshold=threshold, name=stage_name(d)) for d in model_dirs]
    last = evaluations[-1]
    print(f"\nHeld-out tasks, {last.model}'s completions (prompt, then the output in bold, then whether it is right):")
    for task, output in list(zip(tasks, last.outputs))[:show]:
        verdict = "right" if is_exact(task, output) else "wrong: " + task.answer
        print(f"{task.prompt}\033[1m{output}\033[0m    {verdict}")
    print(f"\n{len(tasks)} held-out tasks, exact match; one request at a time on this CPU\n{table(evaluations)}")
    (out / "evaluation.json").write_text(json.dumps(
        {"tasks": [asdict(t) | {"prompt": t.prompt, "answer": t.answer} for t in tasks],
         "models": {str(d): asdict(e) for d, e in zip(model_dirs, evaluations)}}, indent=1) + "\n")
    return evaluations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", default="all", choices=["all", "base", "convert", "evaluate"],
                        help="all (default): base, convert, evaluate on the core alone")
    parser.add_argument("models", nargs="*", type=Path, help="evaluate: HF directories (AR or block diffusion)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--arch", choices=sorted(BASES), default="qwen3", help="base: the AR base's architecture")
    args = parser.parse_args(argv)
    if args.arch != "qwen3" and args.step != "base":
        parser.error(f"--arch {args.arch} makes a base only (`base --arch {args.arch}`); "
                     f"{args.step} uses the qwen3 base")
    s = SCALES[args.scale]
    torch.manual_seed(0)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step in ("all", "base"):
        make_base(args.out, s, args.arch)
    if args.step in ("all", "convert"):
        convert(args.out, s, args.threshold)
    if args.step == "all":
        evaluate_models([args.out / "ar-base", args.out / "dllm"], s, args.threshold, args.out)
    if args.step == "evaluate":
        if not args.models:
            parser.error("evaluate needs at least one model directory")
        evaluate_models(args.models, s, args.threshold, args.out)
    print(f"Total {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
