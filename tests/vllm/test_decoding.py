"""vLLM with this plugin against the core's reference decoder, token for token (DECODING.md's conformance rule), for
the dense tiny model and a tiny random LLaDA2MoeModelLM, on the real vLLM CPU engine; and every denoising step's
logits against the core's pure-PyTorch implementation of the same weights."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff.masks import block_causal_mask
from blockdiff.models import read_config
from tiny_models import make_tiny_blockdiff_model

B, MASK = 32, 1
PROBE = [5, 17, 42, 99, 3, 8]
LENGTHS = [1, 5, 31, 32, 33, 47, 64, 70]  # on and off block boundaries
MAX_TOKENS = [7, 32, 45, 64]


def choose_eos(model, vocab: int) -> int:
    """A token the reference emits for PROBE at output index 9 (inside the first block) and not before: made an EOS,
    it ends that request mid-block."""
    out = ReferenceDecoder(model, MASK, (0,)).generate([PROBE], DecodeParams(64, B, 0.5))[0].tokens
    for i in range(9, len(out)):
        if out[i] not in out[:i] and out[i] > MASK:
            return out[i]
    raise AssertionError(f"no fresh token to make an EOS in {out}")


def request_sets(vocab: int, seed: int) -> tuple[list[list[dict]], list[dict]]:
    rng = random.Random(seed)
    prompts = [PROBE] + [[rng.randrange(2, vocab) for _ in range(n)] for n in LENGTHS]
    singles = [[{"prompt": p, "threshold": t, "max_tokens": MAX_TOKENS[(i + j) % len(MAX_TOKENS)]}]
               for i, p in enumerate(prompts) for j, t in enumerate((0.95, 0.5))]
    concurrent = [{"prompt": p, "threshold": (0.95, 0.7, 0.3)[i % 3], "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)]}
                  for i, p in enumerate(prompts[:8])]
    concurrent[5].update(temperature=0.8, seed=3)
    concurrent[6].update(temperature=1.0, seed=4)
    return singles, concurrent


def reference(model, eos: tuple[int, ...], batch: list[dict]) -> list[dict]:
    params = [DecodeParams(r["max_tokens"], B, r["threshold"], temperature=r.get("temperature", 0.0),
                           seed=r.get("seed") or 0) for r in batch]
    results = ReferenceDecoder(model, MASK, eos).generate([r["prompt"] for r in batch], params)
    return [{"tokens": r.tokens, "finish_reason": r.finish_reason, "denoise_forwards": r.denoise_forwards}
            for r in results]


@pytest.fixture(scope="module", params=["dense", "llada2"])
def served(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_tiny_blockdiff_model(path, request.param)
    vocab = read_config(path)["vocab_size"]
    eos = (0, choose_eos(model, vocab))
    cfg = read_config(path)
    cfg["block_diffusion"]["eos_token_ids"] = list(eos)
    (path / "config.json").write_text(json.dumps(cfg))
    singles, concurrent = request_sets(vocab, seed=len(request.param))
    job = {"model": str(path), "batches": [*singles, concurrent], "records": str(path / "records.pt")}
    got = run_job(path, job, {"VLLM_BLOCKDIFF_RECORD": "1"})
    return {"model": model, "eos": eos, "batches": job["batches"], "got": got,
            "records": torch.load(path / "records.pt")}


def run_job(path: Path, job: dict, env: dict[str, str] | None = None) -> list[list[dict]]:
    (path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("engine_job.py")), str(path / "job.json"),
                           str(path / "out.json")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((path / "out.json").read_text())


def test_single_requests_match_the_reference(served):
    for batch, got in zip(served["batches"][:-1], served["got"][:-1]):
        want = reference(served["model"], served["eos"], batch)
        assert [{k: g[k] for k in want[0]} for g in got] == want, batch


def test_eight_concurrent_requests_match_the_reference(served):
    batch, got = served["batches"][-1], served["got"][-1]
    assert len(batch) == 8
    want = reference(served["model"], served["eos"], batch)
    assert [{k: g[k] for k in want[0]} for g in got] == want


def test_the_cases_cover_eos_inside_a_block_and_max_tokens_cuts(served):
    cases = [(r["prompt"], g) for batch, got in zip(served["batches"], served["got"]) for r, g in zip(batch, got)]
    assert any(g["finish_reason"] == "stop" and (len(p) + len(g["tokens"])) % B for p, g in cases)
    assert any(g["finish_reason"] == "length" and len(g["tokens"]) % B for p, g in cases)
    assert {len(p) % B == 0 for p, _ in cases} == {True, False}


def test_accounting(served):
    for got in served["got"]:
        for g in got:
            assert g["nfe"] >= g["denoise_forwards"] >= 1
            assert g["tpf"] == pytest.approx(len(g["tokens"]) / g["denoise_forwards"])


def test_every_denoising_steps_logits_match_the_core_model(served):
    """Each recorded step: the logits vLLM computed for the block (its earlier blocks read from the paged KV cache)
    against the core model over the whole sequence under an explicit block-causal mask, fp32, 1e-4."""
    records = served["records"]
    assert len(records) > 100
    model = served["model"]
    worst = 0.0
    for rec in random.Random(0).sample(records, 200):
        ids = torch.tensor(rec["context"] + rec["block"])
        n = len(ids)
        with torch.no_grad():
            want = model(ids[None], torch.arange(n)[None], block_causal_mask(n, B)[None])[0, -B:].float()
        worst = max(worst, float((rec["logits"] - want).abs().max()))
    assert worst < 1e-4, worst


def test_preempted_requests_still_match_the_reference(tmp_path):
    """A KV cache of 17 pages of 32 tokens (one max-length request) for 8 requests that each grow to 3-4 pages: vLLM
    preempts, frees and later recomputes requests mid-block; the runner keeps their block state, so outputs stay the
    reference's."""
    model = make_tiny_blockdiff_model(tmp_path, "dense")
    batch = [{"prompt": [2 + i] * (20 + 5 * i), "threshold": 0.7, "max_tokens": 64} for i in range(8)]
    got = run_job(tmp_path, {"model": str(tmp_path), "batches": [batch],
                             "engine": {"block_size": 32, "num_gpu_blocks_override": 17}})[0]
    assert sum(g["preemptions"] for g in got) > 0
    want = reference(model, (0,), batch)
    assert [{k: g[k] for k in want[0]} for g in got] == want
