"""Attention work per context-parallel rank under the block-diffusion mask: the recipes' split (positions dealt out by
work in zig-zag order, `nemo_dllm.parallel.context_parallel_shares`) against Megatron's zig-zag split into 2 x CP
chunks and a contiguous split. Work is counted as the (query, key) pairs a rank's
queries may attend to, the cost a block-sparse kernel pays (a dense kernel pays the same on every rank).

    python -m benchmarks.context_parallel_balance      # nemo venv; prints a table of max/min work per layout
"""

import torch

from blockdiff.masks import bdlm_mask, mdlm_mask
from nemo_dllm.parallel import context_parallel_shares

SEQ_LEN = 1024
# one row a single document, one packing documents of uneven lengths, as WSD rows are
DOC_IDS = torch.tensor([[0] * SEQ_LEN, [0] * 100 + [1] * 412 + [2] * 300 + [3] * 212])


def work(allowed: torch.Tensor, shares: list[torch.Tensor]) -> list[int]:
    """Allowed (query, key) pairs of each rank's queries."""
    return [int(allowed[:, rows].sum()) for rows in shares]


def contiguous(length: int, cp: int) -> list[torch.Tensor]:
    return list(torch.arange(length).chunk(cp))


def zigzag_chunks(length: int, cp: int) -> list[torch.Tensor]:
    """Megatron's split: 2 x cp chunks, rank r taking chunks r and 2cp-1-r."""
    chunks = torch.arange(length).chunk(2 * cp)
    return [torch.cat([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)]


def imbalance(counts: list[int]) -> float:
    """How much more the busiest rank does than the idlest: max / min - 1."""
    return max(counts) / min(counts) - 1


def masks() -> dict[str, torch.Tensor]:
    out = {f"bdlm block {b}": bdlm_mask(DOC_IDS, b) for b in (4, 32, 64)}
    out["mdlm (block = sequence)"] = mdlm_mask(DOC_IDS)
    return out


def main() -> None:
    print(f"per-rank attention work, max/min - 1, rows of {SEQ_LEN} tokens (one single-document row, one packed row)")
    print("| mask | CP | recipes' split (by work) | zig-zag chunks | contiguous |")
    print("|---|---|---|---|---|")
    for name, allowed in masks().items():
        for cp in (2, 4, 8):
            length = allowed.shape[1]
            splits = (context_parallel_shares(allowed.sum(dim=(0, 2)), cp), zigzag_chunks(length, cp),
                      contiguous(length, cp))
            print(f"| {name} | {cp} | " + " | ".join(f"{imbalance(work(allowed, s)):.1%}" for s in splits) + " |")


if __name__ == "__main__":
    main()
