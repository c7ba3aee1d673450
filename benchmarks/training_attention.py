"""Training attention (issue #6, item 4): the document-level block-diffusion mask over `[x_noisy, x_clean]` through
FlexAttention (compiled; fully masked 128x128 tiles skipped) against a dense boolean mask with SDPA, at L = 1k-8k
(attention over 2L). Each side builds its mask from the document ids (a training step must: the documents change
every batch) and runs attention forward. Forward only: torch 2.13's FlexAttention has no backward on CPU
("FlexAttention does not support backward on CPU"), so the backward comparison needs a GPU. Prints peak memory above
the inputs and time per call, both as ratios measured side by side in one run; writes
results/training_attention.{json,png}.

    $(python3 tools/envs.py --path core) -m benchmarks.training_attention

Peak memory is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs before each
measured step) above what it held before the step. glibc would otherwise keep freed buffers and hand them out again
without the high-water mark moving (its mmap threshold adapts upwards), so the script re-runs itself with a fixed
MALLOC_MMAP_THRESHOLD_: every large buffer is then fresh pages. CPU only, so these are CPU kernels: the paper's
figures are for a fused GPU kernel.
"""

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from blockdiff.masks import bdlm_block_mask, bdlm_mask

LENGTHS = (1024, 2048, 4096, 8192)
HEADS, HEAD_DIM, BLOCK = 4, 64, 32
RESULTS = Path(__file__).resolve().parent.parent / "results"


def resident_high_water() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def packed_documents(length: int) -> torch.Tensor:
    """Document ids of one packed row: documents of 1/2, 1/4, 1/8 and 1/8 of the row (LLaDA2.0 packs documents)."""
    sizes = [length // 2, length // 4, length // 8, length - length // 2 - length // 4 - length // 8]
    return torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])[None]


compiled_flex = torch.compile(flex_attention, dynamic=False)


def mask_bytes(mask) -> int:
    tensors = [mask] if isinstance(mask, torch.Tensor) else \
        [t for t in vars(mask).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def dense_mask(doc_ids):
    return bdlm_mask(doc_ids, BLOCK)[:, None]


def flex_mask(doc_ids):
    return bdlm_block_mask(doc_ids, BLOCK)


@torch.no_grad()
def dense_attention(mask, q, k, v):
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.no_grad()
def flex_attention_step(mask, q, k, v):
    compiled_flex(q, k, v, block_mask=mask)


def peak_above_start(fn) -> tuple[float, int]:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = resident()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, resident_high_water() - before


def measure(build_mask, attend, doc_ids, reps: int) -> dict:
    """Median seconds and largest peak bytes, after one warm-up (compilation): building the mask from the document
    ids, and attention given the mask; plus the mask's own size."""
    n = 2 * doc_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))
    attend(build_mask(doc_ids), q, k, v)
    build, attention = [], []
    for _ in range(reps):
        build.append(peak_above_start(lambda: build_mask(doc_ids)))
        mask = build_mask(doc_ids)
        attention.append(peak_above_start(lambda mask=mask: attend(mask, q, k, v)))
    return {"mask_mb": mask_bytes(mask) / 2**20,
            "build_s": statistics.median(t for t, _ in build), "build_peak_mb": max(b for _, b in build) / 2**20,
            "attention_s": statistics.median(t for t, _ in attention),
            "attention_peak_mb": max(b for _, b in attention) / 2**20}


def main() -> None:
    torch.manual_seed(0)
    rows = []
    print(f"{'L':>6}{'attn len':>9} | {'mask MB':>8}{'build MB':>9}{'build s':>8}{'attn MB':>8}{'attn s':>7}"
          f"  (dense / flex each)")
    for length in LENGTHS:
        doc_ids = packed_documents(length)
        reps = 3 if length <= 2048 else 2
        row = {"L": length, "attention_length": 2 * length,
               "dense": measure(dense_mask, dense_attention, doc_ids, reps),
               "flex": measure(flex_mask, flex_attention_step, doc_ids, reps)}
        d, f = row["dense"], row["flex"]
        # below a few MB the allocator reuses freed memory and the high-water mark does not move
        row["attention_memory_ratio"] = (f["attention_peak_mb"] / d["attention_peak_mb"] if d["attention_peak_mb"]
                                         else None)
        row["attention_speedup"] = d["attention_s"] / f["attention_s"]
        rows.append(row)
        print(f"{length:>6}{2 * length:>9} | " + "  ".join(
            f"{d[key]:.{prec}f}/{f[key]:.{prec}f}" for key, prec in
            (("mask_mb", 2), ("build_peak_mb", 0), ("build_s", 2), ("attention_peak_mb", 0), ("attention_s", 2))),
            flush=True)
    RESULTS.mkdir(exist_ok=True)
    setup = {"heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "documents_per_row": 4,
             "step": "mask from document ids, then attention forward; fp32, CPU (no FlexAttention backward on CPU)"}
    (RESULTS / "training_attention.json").write_text(json.dumps({**setup, "rows": rows}, indent=1) + "\n")
    plot(rows)
    print(f"written {RESULTS / 'training_attention.json'} and .png")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["L"] for r in rows]
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("dense", "dense bool mask + SDPA"), ("flex", "FlexAttention block mask")):
        mem.plot(xs, [r[key]["attention_peak_mb"] for r in rows], marker="o", label=f"{label}: attention")
        mem.plot(xs, [r[key]["mask_mb"] for r in rows], marker="x", linestyle="--", label=f"{label}: the mask")
        sec.plot(xs, [r[key]["attention_s"] for r in rows], marker="o", label=label)
    for ax, ylabel in ((mem, "MB (peak above inputs; mask size)"), (sec, "seconds per attention forward")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (attention over 2L)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("Block-diffusion training attention (mask + forward) on CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "training_attention.png", dpi=120)


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    main()
