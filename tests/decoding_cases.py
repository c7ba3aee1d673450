"""The request sets every serving stack is checked on against the core's reference decoder (DECODING.md's
conformance rule): prompt lengths on and off block boundaries, thresholds 0.95 and lower, max_tokens cuts inside and
at the end of blocks, an EOS that lands inside a block, sampling with seeds, and a concurrent batch."""

import json
import random
from pathlib import Path

import torch

from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff.models import read_config
from tiny_models import make_tiny_blockdiff_model

B, MASK = 32, 1
PROBE = [5, 17, 42, 99, 3, 8]
LENGTHS = [1, 5, 31, 32, 33, 47, 64, 70]
MAX_TOKENS = [7, 32, 45, 64]


def choose_eos(model: torch.nn.Module) -> int:
    """A token the reference emits for PROBE at output index 9 (inside the first block) and not before: made an EOS,
    it ends that request mid-block."""
    out = ReferenceDecoder(model, MASK, (0,)).generate([PROBE], DecodeParams(64, B, 0.5))[0].tokens
    for i in range(9, len(out)):
        if out[i] not in out[:i] and out[i] > MASK:
            return out[i]
    raise AssertionError(f"no fresh token to make an EOS in {out}")


def make_served_model(path: Path, arch: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The tiny `arch` model at `path`, its config's EOS ids set to (0, a token that ends PROBE mid-block)."""
    model = make_tiny_blockdiff_model(path, arch)
    eos = (0, choose_eos(model))
    cfg = read_config(path)
    cfg["block_diffusion"]["eos_token_ids"] = list(eos)
    (path / "config.json").write_text(json.dumps(cfg))
    return model, eos


def request_sets(vocab: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Single requests, and one batch of 8 to send concurrently. A request: prompt, threshold, max_tokens and
    optionally temperature and seed."""
    rng = random.Random(seed)
    prompts = [PROBE] + [[rng.randrange(2, vocab) for _ in range(n)] for n in LENGTHS]
    singles = [{"prompt": p, "threshold": t, "max_tokens": MAX_TOKENS[(i + j) % len(MAX_TOKENS)]}
               for i, p in enumerate(prompts) for j, t in enumerate((0.95, 0.5))]
    concurrent = [{"prompt": p, "threshold": (0.95, 0.7, 0.3)[i % 3], "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)]}
                  for i, p in enumerate(prompts[:8])]
    concurrent[5].update(temperature=0.8, seed=3)
    concurrent[6].update(temperature=1.0, seed=4)
    return singles, concurrent


def reference(model: torch.nn.Module, eos: tuple[int, ...], batch: list[dict]) -> list[dict]:
    params = [DecodeParams(r["max_tokens"], B, r["threshold"], temperature=r.get("temperature", 0.0),
                           seed=r.get("seed") or 0) for r in batch]
    results = ReferenceDecoder(model, MASK, eos).generate([r["prompt"] for r in batch], params)
    return [{"tokens": r.tokens, "finish_reason": r.finish_reason, "denoise_forwards": r.denoise_forwards}
            for r in results]


def covers_the_hard_cases(requests: list[dict], results: list[dict]) -> None:
    """The cases must actually include an EOS inside a block, a max_tokens cut inside a block, and prompts on and off
    block boundaries; otherwise equality proves less than it claims."""
    cases = list(zip(requests, results))
    assert any(g["finish_reason"] == "stop" and (len(r["prompt"]) + len(g["tokens"])) % B for r, g in cases)
    assert any(g["finish_reason"] == "length" and len(g["tokens"]) % B for r, g in cases)
    assert {len(r["prompt"]) % B == 0 for r, _ in cases} == {True, False}


def load_requests(vocab: int, n: int = 64, seed: int = 0) -> list[dict]:
    """`n` requests for a load test: prompt lengths 1-70 on and off block boundaries, thresholds 0.95-0.0, max_tokens
    cut inside and at the end of blocks, every eighth sampled with a seed, every other one streamed."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        length = LENGTHS[i % len(LENGTHS)] if i % 2 else rng.randrange(1, 71)
        request = {"prompt": [rng.randrange(2, vocab) for _ in range(length)], "threshold": (0.95, 0.7, 0.5, 0.0)[i % 4],
                   "max_tokens": (7, 32, 45, 64, 16)[i % 5], "stream": i % 2 == 0}
        if i % 8 == 3:
            request.update(temperature=0.8, seed=i)
        requests.append(request)
    requests[0]["prompt"] = PROBE  # ends inside its first block at the EOS make_served_model chose
    return requests
