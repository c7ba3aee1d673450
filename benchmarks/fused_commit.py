"""The commit forward fused into the next block's first denoising step, against a commit forward of its own (issue
#16 item 1), in the reference decoder on the CAP model `make demo` trains.

The 180 held-out task instances, threshold 0.95, block sizes 8, 16 and 32 (the answers are 2-15 tokens, so with small
blocks most requests finish several blocks and pay commit forwards), one request at a time and in batches of 16;
the same requests decoded with `ReferenceDecoder(fuse_commit=True)` and `(fuse_commit=False)`, three times each,
alternating. Reported: held-out accuracy (the outputs are asserted identical), forwards per request (`nfe`) for each
path, tokens/s median (min-max) and the fused path's gain.

    make demo   # once: trains runs/nemo/cap/hf
    $(python3 tools/envs.py --path core) -m benchmarks.fused_commit

Writes results/fused_commit.json (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from blockdiff_demo.evaluate import MAX_ANSWER_TOKENS, block_aligned_budget
from blockdiff_demo.tasks import is_exact

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
BLOCK_SIZES, BATCHES, REPEATS, THRESHOLD = (8, 16, 32), (1, 16), 3, 0.95


def span(speed: dict) -> str:
    return f"{speed['median']:.0f} ({speed['min']:.0f}-{speed['max']:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where `make demo` wrote (default: runs/)")
    args = parser.parse_args()
    from blockdiff.decoding import DecodeParams, ReferenceDecoder
    from blockdiff.models import BlockDiffusionSettings, load_model
    from blockdiff.text import EOS, load_tokenizer, special_id
    from blockdiff_demo.corpus import held_out_tasks

    path = args.runs / "nemo/cap/hf"
    if not (path / "config.json").exists():
        raise SystemExit(f"{path} does not exist: run `make demo` first")
    net, cfg = load_model(path)
    net.eval()
    settings = BlockDiffusionSettings.from_config(cfg)
    tok = load_tokenizer(path)
    eos = special_id(tok, EOS)
    tasks = held_out_tasks()
    prompts = [tok.encode(t.prompt).ids for t in tasks]
    decoders = {fused: ReferenceDecoder(net, settings.mask_token_id, settings.eos_token_ids, fuse_commit=fused)
                for fused in (True, False)}
    rows = []
    print(f"{'block':>6}{'batch':>6}{'accuracy':>10}{'nfe/req fused':>15}{'unfused':>9}"
          f"{'tok/s fused (min-max)':>24}{'unfused (min-max)':>22}{'gain':>7}")
    for block in BLOCK_SIZES:
        params = [DecodeParams(block_aligned_budget(len(p), MAX_ANSWER_TOKENS, block), block, THRESHOLD)
                  for p in prompts]
        for batch in BATCHES:
            speeds, results = {True: [], False: []}, {}
            for _ in range(REPEATS):
                for fused, decoder in decoders.items():
                    start = time.perf_counter()
                    out = [r for i in range(0, len(prompts), batch)
                           for r in decoder.generate(prompts[i:i + batch], params[i:i + batch])]
                    speeds[fused].append(sum(len(r.tokens) for r in out) / (time.perf_counter() - start))
                    results[fused] = out
            same = all((a.tokens, a.finish_reason, a.denoise_forwards) == (b.tokens, b.finish_reason,
                                                                              b.denoise_forwards)
                       for a, b in zip(results[True], results[False]))
            if not same:
                raise SystemExit(f"block {block}, batch {batch}: the fused and unfused outputs differ")
            texts = [tok.decode([t for t in r.tokens if t != eos]) for r in results[True]]
            row = {"block_size": block, "batch": batch,
                   "accuracy": sum(is_exact(t, x) for t, x in zip(tasks, texts)) / len(tasks),
                   "nfe_per_request": {k: sum(r.nfe for r in v) / len(v) for k, v in
                                       (("fused", results[True]), ("unfused", results[False]))},
                   "tokens_per_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                                    for k, v in (("fused", speeds[True]), ("unfused", speeds[False]))}}
            row["gain"] = row["tokens_per_s"]["fused"]["median"] / row["tokens_per_s"]["unfused"]["median"]
            rows.append(row)
            fused, unfused = (span(row["tokens_per_s"][k]) for k in ("fused", "unfused"))
            print(f"{block:>6}{batch:>6}{row['accuracy']:>10.1%}{row['nfe_per_request']['fused']:>15.2f}"
                  f"{row['nfe_per_request']['unfused']:>9.2f}{fused:>24}{unfused:>22}{row['gain']:>6.2f}x", flush=True)
    setup = {"model": "runs/nemo/cap/hf", "tasks": f"{len(tasks)} held-out instances", "threshold": THRESHOLD,
             "repeats": REPEATS, "decoder": "the core's ReferenceDecoder", "machine": "2-core CPU, fp32",
             "outputs_identical": True}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_commit.json").write_text(json.dumps({**setup, "rows": rows}, indent=1) + "\n")
    print(f"written {RESULTS / 'fused_commit.json'}")


if __name__ == "__main__":
    main()
