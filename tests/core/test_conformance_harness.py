"""The conformance harness can fail: a decoder that commits confidences >= the threshold (instead of >) is reported,
and the records of a second run pass."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from blockdiff.models import (
    BlockDiffusionSettings,
    build_model,
    init_weights,
    save_model,
    tiny_dense_config,
    with_block_diffusion,
)
from conformance.compare import NO_CHAT_ENDPOINT, compare

ROOT = Path(__file__).resolve().parents[2]


def run_reference(cases: Path, out: Path, *flags: str) -> dict:
    subprocess.run([sys.executable, "-m", "conformance.runners.reference", str(cases), str(out), *flags],
                   cwd=ROOT, check=True, timeout=600)
    return json.loads(out.read_text())


def test_a_ge_threshold_decoder_is_caught(tmp_path):
    """A head scaled up makes many confidences exactly 1.0 in fp32; at threshold 1.0 the strict rule commits none of
    them (one fallback per step) while `>=` commits them all at once."""
    cfg = with_block_diffusion(tiny_dense_config(vocab_size=64, num_hidden_layers=2),
                               BlockDiffusionSettings(mask_token_id=1, eos_token_ids=(0,), block_size=8))
    model = init_weights(build_model(cfg), 0, std=0.2)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    save_model(model, cfg, tmp_path / "m")
    batch = [{"prompt": [5, 6, 7, 8, 9][: n + 1], "threshold": 1.0, "max_tokens": 16} for n in range(4)]
    spec = {"models": {"m": str(tmp_path / "m")}, "cases": [{"id": "m/batch0x4", "model": "m", "batch": batch}]}
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(spec))
    good = run_reference(cases, tmp_path / "good.json")
    bad = run_reference(cases, tmp_path / "bad.json", "--perturb", "ge")
    lines, ok = compare(spec, good, {"perturbed": bad})
    assert not ok and any("denoise_forwards" in line and "[perturbed]" in line for line in lines), lines
    again = run_reference(cases, tmp_path / "again.json")  # a second, separate run: equal records pass
    assert compare(spec, good, {"again": again})[1]


def test_only_a_chat_case_may_be_recorded_as_not_run_and_a_missing_record_fails():
    """vLLM offline has no chat endpoint: its "not run" record of a chat case is shown, not counted; the same record
    of a token-prompt case, or no record at all, is a mismatch."""
    request = {"prompt": [5, 6], "threshold": 0.9, "max_tokens": 4}
    spec = {"models": {"m": "unused"}, "cases": [
        {"id": "m/chat", "model": "m", "batch": [{**request, "messages": [{"role": "user", "content": "hi"}]}]},
        {"id": "m/tokens", "model": "m", "batch": [request]}]}
    result = [{"tokens": [7, 8], "finish_reason": "length", "denoise_forwards": 2, "nfe": 3}]
    reference = {"m/chat": result, "m/tokens": result}
    lines, ok = compare(spec, reference, {"offline": {"m/chat": NO_CHAT_ENDPOINT, "m/tokens": result}})
    assert ok and "1/1 identical" in lines[1], lines
    assert not compare(spec, reference, {"offline": {"m/chat": result, "m/tokens": NO_CHAT_ENDPOINT}})[1]
    assert not compare(spec, reference, {"server": {"m/tokens": result}})[1]
