"""Compare every stack's records with the reference's and print the table (core venv).

Compared per request, as DECODING.md's conformance rule says: token ids, finish reason, `denoise_forwards`; a chat
case on every stack with a chat endpoint (vLLM offline records it as not run). `nfe` is shown, not compared (each
stack fuses or splits prefill and commit forwards its own way). For a token difference the table gives its output
position, both tokens, and both tokens' confidence under the reference model at that position (the block's earlier
positions as the reference committed them, the rest masked).

The training section compares the Megatron-side losses with the core's (runners/training.py), within 1e-5.

    python -m conformance.compare CASES.json REFERENCE.json [training=TRAINING.json] STACK=RECORDS.json ...
    (exit 1 on mismatch)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from blockdiff.masks import block_causal_mask
from blockdiff.models import BlockDiffusionSettings, load_model, read_config

COMPARED = ("tokens", "finish_reason", "denoise_forwards")
NO_CHAT_ENDPOINT = "not run: no chat endpoint"  # a stack's record of a chat case it cannot take (vLLM offline)
LOSS_TOLERANCE = 1e-5


def first_difference(want: dict, got: dict) -> tuple[int, int | None, int | None] | None:
    """(output position, reference token, stack token) of the first differing token, or None if the ids agree."""
    a, b = want["tokens"], got["tokens"]
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        if x != y:
            return i, x, y
    return None


@torch.no_grad()
def confidences(model, settings: BlockDiffusionSettings, prompt: list[int], reference: list[int], position: int,
                tokens: tuple[int | None, int | None]) -> tuple[float | None, float | None]:
    b, mask = settings.block_size, settings.mask_token_id
    seq = prompt + reference
    at = len(prompt) + position
    start = at // b * b
    block = (seq[start:at] + [mask] * b)[:b]
    ids = torch.tensor(seq[:start] + block)
    n = len(ids)
    logits = model(ids[None], torch.arange(n)[None], block_causal_mask(n, b)[None])[0, at].float()
    logits[mask] = float("-inf")
    probs = torch.softmax(logits, -1)
    return tuple(None if t is None else float(probs[t]) for t in tokens)


def compare(spec: dict, reference: dict, stacks: dict[str, dict]) -> tuple[list[str], bool]:
    """The table's lines, and whether every stack agreed with the reference everywhere."""
    models = {}
    summary: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    details, ok = [], True
    for case in spec["cases"]:
        want_batch = reference[case["id"]]
        for stack, records in stacks.items():
            got_batch = records.get(case["id"])
            counts = summary[(case["model"], stack)]
            if got_batch == NO_CHAT_ENDPOINT:
                if is_chat(case):
                    continue
                got_batch = None
            for i, request in enumerate(case["batch"]):
                want = want_batch[i]
                got = got_batch[i] if got_batch is not None else None
                counts[0] += 1
                if got is not None and all(got[k] == want[k] for k in COMPARED):
                    counts[1] += 1
                    continue
                ok = False
                where = f"{case['id']} request {i} [{stack}]"
                if got is None:
                    details.append(f"  {where}: no record")
                    continue
                diff = first_difference(want, got)
                line = (f"  {where}: finish {want['finish_reason']}/{got['finish_reason']}, denoise_forwards "
                        f"{want['denoise_forwards']}/{got['denoise_forwards']} (reference/stack)")
                if diff is not None:
                    path = spec["models"][case["model"]]
                    if path not in models:
                        models[path] = (load_model(path)[0], BlockDiffusionSettings.from_config(read_config(path)))
                    conf = confidences(*models[path], request["prompt"], want["tokens"], diff[0], diff[1:])
                    line += (f"; first token difference at output position {diff[0]}: reference {diff[1]} "
                             f"(confidence {_fmt(conf[0])}) vs {diff[2]} (confidence {_fmt(conf[1])})")
                details.append(line)
    names = list(stacks)
    lines = [f"{'model':<20}" + "".join(f"{s:>18}" for s in names)]
    for model in dict.fromkeys(c["model"] for c in spec["cases"]):
        lines.append(f"{model:<20}" + "".join(f"{cell(*summary[(model, s)]):>18}" for s in names))
    nfe = defaultdict(int)
    for stack, records in [("reference", reference), *stacks.items()]:
        nfe[stack] = sum(r["nfe"] for batch in records.values() if batch != NO_CHAT_ENDPOINT for r in batch)
    lines.append("nfe (all requests, not compared): " + ", ".join(f"{s} {n}" for s, n in nfe.items()))
    return lines + (["differences:"] + details if details else []), ok


def compare_training(records: dict) -> tuple[list[str], bool]:
    lines = [f"{'training objective':<20}{'core loss':>14}{'megatron loss':>16}{'|difference|':>14}"]
    ok = True
    for objective, r in records.items():
        diff = abs(r["core"] - r["megatron"])
        ok &= diff <= LOSS_TOLERANCE
        lines.append(f"{objective:<20}{r['core']:>14.8f}{r['megatron']:>16.8f}{diff:>14.2e}"
                     + ("" if diff <= LOSS_TOLERANCE else "  MISMATCH"))
    return lines, ok


def is_chat(case: dict) -> bool:
    """A case of chat messages, for the stacks' chat endpoints (its requests also carry the rendered prompt)."""
    return "messages" in case["batch"][0]


def cell(requests: int, identical: int) -> str:
    return f"{identical}/{requests} identical" if requests else "no chat endpoint"


def _fmt(p: float | None) -> str:
    return "-" if p is None else f"{p:.4f}"


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    reference = json.loads(Path(argv[1]).read_text())
    stacks = {arg.split("=", 1)[0]: json.loads(Path(arg.split("=", 1)[1]).read_text()) for arg in argv[2:]}
    training = stacks.pop("training", None)
    lines, ok = compare(spec, reference, stacks)
    if training is not None:
        training_lines, training_ok = compare_training(training)
        lines, ok = lines + [""] + training_lines, ok and training_ok
    requests = sum(len(c["batch"]) for c in spec["cases"])
    print(f"conformance: {len(spec['models'])} served models, {len(spec['cases'])} batches, {requests} requests; "
          f"token ids, finish reasons and denoise_forwards against the reference decoder; Megatron losses against "
          f"the core's within {LOSS_TOLERANCE}")
    print("\n".join(lines))
    print("ALL IDENTICAL" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
