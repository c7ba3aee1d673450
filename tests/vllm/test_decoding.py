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

from blockdiff.masks import block_causal_mask
from blockdiff.models import read_config
from conformance.cases import SUITE_BLOCK, covers_the_hard_cases, reference_results, request_sets
from tiny_models import make_served_model, make_tiny_blockdiff_model
from vllm_blockdiff.engine import DENOISE_LOOP_ENV

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module", params=["dense", "llada2"])
def served(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model, eos = make_served_model(path, request.param)
    singles, concurrent = request_sets(read_config(path)["vocab_size"], seed=len(request.param))
    job = {"model": str(path), "batches": [*[[r] for r in singles], concurrent], "records": str(path / "records.pt")}
    got = run_job(path, job, {"VLLM_BLOCKDIFF_RECORD": "1"})
    return {"path": path, "model": model, "eos": eos, "batches": job["batches"], "got": got,
            "records": torch.load(path / "records.pt")}


def run_job(path: Path, job: dict, env: dict[str, str] | None = None) -> list[list[dict]]:
    (path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "drivers.vllm_engine", str(path / "job.json"), str(path / "out.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((path / "out.json").read_text())


def test_single_requests_match_the_reference(served):
    for batch, got in zip(served["batches"][:-1], served["got"][:-1]):
        want = reference_results(served["model"], served["eos"], batch)
        assert [{k: g[k] for k in want[0]} for g in got] == want, batch


def test_eight_concurrent_requests_match_the_reference(served):
    batch, got = served["batches"][-1], served["got"][-1]
    assert len(batch) == 8
    want = reference_results(served["model"], served["eos"], batch)
    assert [{k: g[k] for k in want[0]} for g in got] == want


def test_the_cases_cover_eos_inside_a_block_and_max_tokens_cuts(served):
    covers_the_hard_cases([r for batch in served["batches"] for r in batch], [g for got in served["got"] for g in got])


def test_accounting_against_the_reference(served):
    """Every forward vLLM runs for a request is a denoising step: the prompt rides with the first canvas and each
    finished block's commit with the next block's first step, so `nfe` equals `denoise_forwards`, where the
    reference adds a prefill forward for a prompt with a full block and a commit forward per block but the last."""
    for batch, got in zip(served["batches"], served["got"]):
        for g, w in zip(got, reference_results(served["model"], served["eos"], batch)):
            assert g["nfe"] == g["denoise_forwards"] == w["denoise_forwards"] >= 1
            assert g["tpf"] == pytest.approx(len(w["tokens"]) / w["denoise_forwards"])


def test_every_denoising_steps_logits_match_the_core_model(served):
    """Each recorded step: the logits vLLM computed for the block (its earlier blocks read from the paged KV cache)
    against the core model over the whole sequence under an explicit block-causal mask, fp32, 1e-4. The tiny models'
    vocabulary (283) is not a multiple of the 64 rows vLLM pads its LM head to: the proposer gets exactly the
    vocabulary's logits, never the padding's (issue #19 item 5)."""
    records = served["records"]
    assert len(records) > 100
    model = served["model"]
    worst = 0.0
    for rec in random.Random(0).sample(records, 200):
        ids = torch.tensor(rec["context"] + rec["block"])
        n = len(ids)
        with torch.no_grad():
            logits = model(ids[None], torch.arange(n)[None], block_causal_mask(n, SUITE_BLOCK)[None])
            want = logits[0, -SUITE_BLOCK:].float()
        assert want.shape[-1] % 64 and rec["logits"].shape == want.shape
        worst = max(worst, float((rec["logits"] - want).abs().max()))
    assert worst < 1e-4, worst


def test_a_step_of_whole_blocks_denoises_on_and_switched_off_gives_the_same_outputs(served, tmp_path):
    """The fixture's run had steps that denoised on after their first forward (the runner's loop); the same requests
    with the loop off (`VLLM_BLOCKDIFF_DENOISE_LOOP=0`: one denoising forward per engine step) give the same tokens,
    finish reasons and accounting, with every recorded step its step's only forward."""
    assert max(r["forward_in_step"] for r in served["records"]) > 0
    job = {"model": str(served["path"]), "batches": served["batches"], "records": str(tmp_path / "records.pt")}
    got = run_job(tmp_path, job, {"VLLM_BLOCKDIFF_RECORD": "1", DENOISE_LOOP_ENV: "0"})
    assert got == served["got"]
    assert {r["forward_in_step"] for r in torch.load(tmp_path / "records.pt")} == {0}


def test_preempted_requests_still_match_the_reference(tmp_path):
    """A KV cache of 17 pages of 32 tokens (one max-length request) for 8 requests that each grow to 3-4 pages: vLLM
    preempts, frees and later recomputes requests mid-block; the runner keeps their block state, so outputs stay the
    reference's."""
    model = make_tiny_blockdiff_model(tmp_path, "dense")
    batch = [{"prompt": [2 + i] * (20 + 5 * i), "threshold": 0.7, "max_tokens": 64} for i in range(8)]
    got = run_job(tmp_path, {"model": str(tmp_path), "batches": [batch],
                             "engine": {"block_size": 32, "num_gpu_blocks_override": 17}})[0]
    assert sum(g["preemptions"] for g in got) > 0
    want = reference_results(model, (0,), batch)
    assert [{k: g[k] for k in want[0]} for g in got] == want
