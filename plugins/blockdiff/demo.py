"""The main job at toy scale, on the core alone: train a tiny AR model on the standard library, convert it to block
diffusion with a short Warmup-Stable-Decay run, then decode HumanEval prompts with the reference decoder and print the
completions with their tokens per forward (TPF).

    python -m blockdiff.demo [--out runs/demo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from blockdiff.data import EOS, MASK, humaneval_prompts, load_tokenizer, pack_documents, save_tokenizer, special_id, \
    stdlib_documents, train_tokenizer
from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff.models import BlockDiffusionSettings, build_model, init_weights, load_model, save_model, \
    tiny_dense_config, with_block_diffusion
from blockdiff.schedules import WSDSchedule
from blockdiff.train import OptimConfig, heldout_accuracy, train_ar, train_wsd

# phase_steps: each WSD phase's token budget in training steps (Stable gets twice that). max_tokens: the most tokens
# generated per prompt; each request stops at the block boundary at or below it, so no block is cut.
SCALES = {
    "default": dict(vocab=2048, seq_len=256, ar_steps=800, phase_steps=50, batch=8, prompts=8, max_tokens=64),
    "quick": dict(vocab=512, seq_len=64, ar_steps=30, phase_steps=3, batch=4, prompts=2, max_tokens=16),
}


def build_data(out: Path, vocab: int, seq_len: int) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


def copy_tokenizer(tok_dir: Path, model_dir: Path) -> None:
    for f in tok_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args(argv)
    s = SCALES[args.scale]
    torch.manual_seed(0)
    start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] data: standard-library corpus and a {s['vocab']}-token BPE tokenizer", flush=True)
    tok_dir, ids, doc_ids, val_ids, val_doc = build_data(out, s["vocab"], s["seq_len"])
    tok = load_tokenizer(tok_dir)
    eos, mask_id = special_id(tok, EOS), special_id(tok, MASK)
    print(f"      {ids.numel():,} training tokens in {ids.shape[0]} rows of {s['seq_len']}", flush=True)

    ar_dir = out / "ar-base"
    print(f"[2/4] AR pretraining of the tiny base -> {ar_dir}", flush=True)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), eos_token_id=eos, pad_token_id=eos)
    model = init_weights(build_model(cfg), seed=0)
    losses = train_ar(model, ids, doc_ids, s["ar_steps"], s["batch"])
    save_model(model, cfg, ar_dir)
    copy_tokenizer(tok_dir, ar_dir)
    print(f"      AR loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)

    settings = BlockDiffusionSettings(mask_token_id=mask_id, eos_token_ids=(eos,), block_size=32,
                                      threshold=args.threshold)
    step_tokens = s["batch"] * s["seq_len"]
    schedule = WSDSchedule.build(s["seq_len"], warmup_tokens=s["phase_steps"] * step_tokens,
                                 stable_tokens=2 * s["phase_steps"] * step_tokens,
                                 decay_tokens=s["phase_steps"] * step_tokens, final_block=settings.block_size)
    dllm_dir = out / "dllm"
    print(f"[3/4] WSD conversion to block diffusion: "
          f"{' -> '.join(str(p.block_size) for p in schedule.phases)} -> {dllm_dir}", flush=True)
    acc_before = heldout_accuracy(model, val_ids, val_doc, settings.block_size, mask_id)
    history = train_wsd(model, ids, doc_ids, schedule, s["batch"], mask_id, OptimConfig(lr=2e-3, warmup_steps=5))
    dllm_cfg = with_block_diffusion(cfg, settings)
    save_model(model, dllm_cfg, dllm_dir)
    copy_tokenizer(tok_dir, dllm_dir)
    acc_after = heldout_accuracy(model, val_ids, val_doc, settings.block_size, mask_id)
    print(f"      diffusion loss {history[0][1]:.3f} -> {history[-1][1]:.3f}; held-out masked-token accuracy at "
          f"t=0.5: {acc_before:.1%} (AR base) -> {acc_after:.1%} (chance {1 / tok.get_vocab_size():.2%})", flush=True)

    print(f"[4/4] decoding {s['prompts']} HumanEval prompts: block {settings.block_size}, threshold "
          f"{settings.threshold}, reference decoder with KV cache", flush=True)
    model, _ = load_model(dllm_dir)
    decoder = ReferenceDecoder(model, mask_id, (eos,))
    budget = s["seq_len"] - s["max_tokens"]  # the model was trained on rows of seq_len: keep prompt + output inside
    prompts = [tok.encode(p).ids[-budget:] for p in humaneval_prompts()[: s["prompts"]]]
    params = [DecodeParams(max_tokens=block_aligned_budget(len(p), s["max_tokens"], settings.block_size),
                           block_size=settings.block_size, threshold=settings.threshold) for p in prompts]
    t0 = time.time()
    results = decoder.generate(prompts, params)
    wall = time.time() - t0
    report = []
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        text = tok.decode(r.tokens)
        print(f"\n--- HumanEval/{i}: {len(r.tokens)} tokens, {r.denoise_forwards} denoising forwards, "
              f"TPF {r.tpf:.2f}, finish {r.finish_reason}\n{tok.decode(prompt[-120:])}\033[1m{text}\033[0m")
        report.append(dict(task=i, prompt_tokens=len(prompt), max_tokens=params[i].max_tokens, tokens=r.tokens, finish_reason=r.finish_reason,
                           denoise_forwards=r.denoise_forwards, nfe=r.nfe, tpf=r.tpf))
    out_tokens = sum(len(r.tokens) for r in results)
    tpf = out_tokens / sum(r.denoise_forwards for r in results)
    summary = dict(threshold=settings.threshold, block_size=settings.block_size, tpf=tpf, output_tokens=out_tokens,
                   decode_seconds=wall, masked_token_accuracy=acc_after, total_seconds=time.time() - start)
    lower = [replace(p, threshold=0.5) for p in params]
    fast = decoder.generate(prompts, lower)
    summary["tpf_at_threshold_0.5"] = sum(len(r.tokens) for r in fast) / sum(r.denoise_forwards for r in fast)
    (out / "decode.json").write_text(json.dumps(dict(summary=summary, requests=report), indent=1) + "\n")
    print(f"\nTPF at threshold {settings.threshold}, block {settings.block_size}: {tpf:.2f} tokens per forward "
          f"({out_tokens} tokens, {out_tokens / wall:.1f} tokens/s on this CPU); at threshold 0.5 for comparison: "
          f"{summary['tpf_at_threshold_0.5']:.2f}. Model: {dllm_dir}. Total {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
