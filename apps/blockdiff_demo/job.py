"""The toy-scale main job: train a tiny AR model on the standard library and write the recipes' JSONL data (`base`),
convert it to block diffusion with a short core-only Warmup-Stable-Decay run (`convert`), then decode HumanEval prompts
with the reference decoder and print the completions with their tokens per forward (`decode`). `make demo` uses
`base`, runs the conversion and post-training as NeMo recipes on Megatron, and ends with `decode`.

    python -m blockdiff_demo [all|base|convert|decode MODEL...] [--out runs/demo] [--scale quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff.models import (
    BlockDiffusionSettings,
    build_model,
    init_weights,
    load_model,
    save_model,
    tiny_dense_config,
    with_block_diffusion,
)
from blockdiff.objectives import ReferenceForward, heldout_accuracy
from blockdiff.schedules import WSDSchedule
from blockdiff.text import EOS, MASK, load_tokenizer, pack_documents, save_tokenizer, special_id, train_tokenizer
from blockdiff_demo.corpus import humaneval_prompts, stdlib_documents, write_recipe_data
from blockdiff_demo.train import OptimConfig, train_ar, train_wsd

# phase_steps: each WSD phase's token budget in training steps (Stable gets twice that). max_tokens: the most tokens
# generated per prompt; each request stops at the block boundary at or below it, so no block is cut.
SCALES = {
    "default": dict(vocab=2048, seq_len=256, ar_steps=500, phase_steps=50, batch=8, prompts=8, max_tokens=64),
    "quick": dict(vocab=512, seq_len=64, ar_steps=30, phase_steps=3, batch=4, prompts=2, max_tokens=16),
}


def build_data(out: Path, vocab: int, seq_len: int
               ) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tok_dir = out / "tokenizer"
    docs = stdlib_documents()
    if not (tok_dir / "tokenizer.json").exists():
        save_tokenizer(train_tokenizer([d.text for d in docs], vocab), tok_dir, model_max_length=4096)
    tok = load_tokenizer(tok_dir)
    eos = special_id(tok, EOS)
    encoded = tok.encode_batch([d.text for d in docs])
    train = [e.ids for e, d in zip(encoded, docs) if not d.is_validation]
    val = [e.ids for e, d in zip(encoded, docs) if d.is_validation]
    ids, doc_ids = pack_documents(train, seq_len, eos)
    val_ids, val_doc = pack_documents(val, seq_len, eos)
    return tok_dir, ids, doc_ids, val_ids[:32], val_doc[:32]


def block_aligned_budget(prompt_len: int, max_tokens: int, block_size: int) -> int:
    """The largest output length <= max_tokens that ends on a block boundary (at least one token), so that TPF is not
    diluted by a last block whose tail is decoded and then cut."""
    budget = max_tokens - (prompt_len + max_tokens) % block_size
    return budget if budget >= 1 else max_tokens


def copy_tokenizer(src: Path, model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((src / name).read_bytes())


def make_base(out: Path, s: dict) -> Path:
    """Data, tokenizer and the tiny AR base at `out/ar-base`."""
    print(f"[base] data: standard-library corpus and a {s['vocab']}-token BPE tokenizer", flush=True)
    tok_dir, ids, doc_ids, _, _ = build_data(out, s["vocab"], s["seq_len"])
    tok = load_tokenizer(tok_dir)
    eos = special_id(tok, EOS)
    print(f"       {ids.numel():,} training tokens in {ids.shape[0]} rows of {s['seq_len']}", flush=True)
    ar_dir = out / "ar-base"
    print(f"[base] AR pretraining of the tiny base -> {ar_dir}", flush=True)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), eos_token_id=eos, pad_token_id=eos)
    model = init_weights(build_model(cfg), seed=0)
    losses = train_ar(model, ids, doc_ids, s["ar_steps"], s["batch"])
    save_model(model, cfg, ar_dir)
    copy_tokenizer(tok_dir, ar_dir)
    print(f"       AR loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
    files = write_recipe_data(out / "data")
    print(f"[base] the recipes' data: {', '.join(str(p) for p in files.values())}", flush=True)
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


def decode(model_dirs: list[Path], s: dict, threshold: float, out: Path, show: bool = True) -> dict[str, float]:
    """Decode HumanEval prompts with each model (reference decoder, KV cache); print the last model's completions,
    and each model's TPF at `threshold` and at 0.5. Writes out/decode.json; returns TPF at `threshold` by model."""
    tpfs, record = {}, {}
    for model_dir in model_dirs:
        model, cfg = load_model(model_dir)
        settings = BlockDiffusionSettings.from_config(cfg)
        tok = load_tokenizer(model_dir)
        decoder = ReferenceDecoder(model, settings.mask_token_id, settings.eos_token_ids)
        budget = s["seq_len"] - s["max_tokens"]  # the model was trained on rows of seq_len: keep prompt + output in
        prompts = [tok.encode(p).ids[-budget:] for p in humaneval_prompts()[: s["prompts"]]]
        params = [DecodeParams(max_tokens=block_aligned_budget(len(p), s["max_tokens"], settings.block_size),
                               block_size=settings.block_size, threshold=threshold) for p in prompts]
        t0 = time.time()
        results = decoder.generate(prompts, params)
        wall = time.time() - t0
        if show and model_dir == model_dirs[-1]:
            for i, (prompt, r) in enumerate(zip(prompts, results)):
                print(f"\n--- HumanEval/{i}: {len(r.tokens)} tokens, {r.denoise_forwards} denoising forwards, "
                      f"TPF {r.tpf:.2f}, finish {r.finish_reason}\n{tok.decode(prompt[-120:])}"
                      f"\033[1m{tok.decode(r.tokens)}\033[0m")
        fast = decoder.generate(prompts, [replace(p, threshold=0.5) for p in params])
        tokens = sum(len(r.tokens) for r in results)
        tpfs[str(model_dir)] = tokens / sum(r.denoise_forwards for r in results)
        record[str(model_dir)] = dict(
            threshold=threshold, block_size=settings.block_size, tpf=tpfs[str(model_dir)], output_tokens=tokens,
            tokens_per_second=tokens / wall,
            tpf_at_threshold_0_5=sum(len(r.tokens) for r in fast) / sum(r.denoise_forwards for r in fast),
            requests=[dict(task=i, prompt_tokens=len(p), max_tokens=q.max_tokens, tokens=r.tokens,
                           finish_reason=r.finish_reason, denoise_forwards=r.denoise_forwards, nfe=r.nfe, tpf=r.tpf)
                      for i, (p, q, r) in enumerate(zip(prompts, params, results))])
    (out / "decode.json").write_text(json.dumps(record, indent=1) + "\n")
    print()
    for name, r in record.items():
        print(f"TPF at threshold {threshold}, block {r['block_size']}: {r['tpf']:.2f} tokens per forward "
              f"({r['output_tokens']} tokens, {r['tokens_per_second']:.1f} tokens/s on this CPU); at threshold 0.5: "
              f"{r['tpf_at_threshold_0_5']:.2f}  [{name}]")
    return tpfs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", default="all", choices=["all", "base", "convert", "decode"],
                        help="all (default): base, convert, decode on the core alone")
    parser.add_argument("models", nargs="*", type=Path, help="decode: block-diffusion HF directories")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args(argv)
    s = SCALES[args.scale]
    torch.manual_seed(0)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step in ("all", "base"):
        make_base(args.out, s)
    if args.step in ("all", "convert"):
        convert(args.out, s, args.threshold)
    if args.step == "all":
        decode([args.out / "dllm"], s, args.threshold, args.out)
    if args.step == "decode":
        if not args.models:
            parser.error("decode needs at least one model directory")
        decode(args.models, s, args.threshold, args.out)
    print(f"Total {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
