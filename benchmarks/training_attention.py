"""Training attention (issue #6, item 4): the document-level block-diffusion mask over `[x_noisy, x_clean]` through
FlexAttention (compiled; fully masked 128x128 tiles skipped) against a dense boolean mask with SDPA, at L = 1k-8k
(attention over 2L). Each side builds its mask from the document ids (a training step must: the documents change
every batch) and runs attention forward and backward. Prints peak memory above the inputs and time per step, both as
ratios measured side by side in one run; writes results/training_attention.{json,png}.

    $(python3 tools/envs.py --path core) benchmarks/training_attention.py

Peak memory is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs before each
measured step) above what it held before the step; CPU only, so these are CPU kernels: the paper's figures are for a
fused GPU kernel.
"""

import gc
import json
import statistics
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


def dense_step(doc_ids, q, k, v):
    mask = bdlm_mask(doc_ids, BLOCK)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()


def flex_step(doc_ids, q, k, v):
    mask = bdlm_block_mask(doc_ids, BLOCK)
    out = compiled_flex(q, k, v, block_mask=mask)
    out.sum().backward()


def measure(step, doc_ids, reps: int) -> tuple[float, int]:
    """Median seconds per step and peak bytes above the step's starting point, after one warm-up (compilation)."""
    def inputs():
        n = 2 * doc_ids.shape[1]
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, HEADS, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(3)]

    step(doc_ids, *inputs())
    times, peaks = [], []
    for _ in range(reps):
        q, k, v = inputs()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = resident()
        start = time.perf_counter()
        step(doc_ids, q, k, v)
        times.append(time.perf_counter() - start)
        peaks.append(resident_high_water() - before)
        del q, k, v
    return statistics.median(times), max(peaks)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    print(f"{'L':>6}{'attn len':>9}{'dense MB':>10}{'flex MB':>9}{'saved':>7}{'dense s':>9}{'flex s':>8}{'speedup':>9}")
    for length in LENGTHS:
        doc_ids = packed_documents(length)
        reps = 3 if length <= 2048 else 2
        dense_s, dense_b = measure(dense_step, doc_ids, reps)
        flex_s, flex_b = measure(flex_step, doc_ids, reps)
        row = {"L": length, "attention_length": 2 * length, "dense_peak_mb": dense_b / 2**20,
               "flex_peak_mb": flex_b / 2**20, "memory_saved": 1 - flex_b / dense_b, "dense_s": dense_s,
               "flex_s": flex_s, "speedup": dense_s / flex_s}
        rows.append(row)
        print(f"{length:>6}{2 * length:>9}{row['dense_peak_mb']:>10.0f}{row['flex_peak_mb']:>9.0f}"
              f"{row['memory_saved']:>7.0%}{dense_s:>9.2f}{flex_s:>8.2f}{row['speedup']:>8.2f}x")
    RESULTS.mkdir(exist_ok=True)
    setup = {"heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "documents_per_row": 4,
             "step": "mask from document ids + attention forward + backward, fp32, CPU"}
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
        mem.plot(xs, [r[f"{key}_peak_mb"] for r in rows], marker="o", label=label)
        sec.plot(xs, [r[f"{key}_s"] for r in rows], marker="o", label=label)
    for ax, ylabel in ((mem, "peak memory above inputs (MB)"), (sec, "seconds per forward+backward")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (attention over 2L)")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle("Block-diffusion training attention on CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "training_attention.png", dpi=120)


if __name__ == "__main__":
    main()
