"""The reference decoder equals a decoder written from DECODING.md alone (tests/naive_oracle.py, which shares no code
with the core's decoding) on the hard cases every stack is checked on, at T = 0 and T > 0; and that check can fail."""

import pytest
import torch

import blockdiff.decoding as decoding
from blockdiff.models import read_config
from conformance.cases import MASK, SUITE_BLOCK, covers_the_hard_cases, reference_results, request_sets
from naive_oracle import naive_decode
from tiny_models import make_served_model


def naive(model: torch.nn.Module, eos: tuple[int, ...], batch: list[dict], **rule) -> list[dict]:
    return [naive_decode(model, r["prompt"], max_tokens=r["max_tokens"], block_size=SUITE_BLOCK,
                         threshold=r["threshold"], fallback_k=1, mask_id=MASK, eos_ids=eos,
                         temperature=r.get("temperature", 0.0), seed=r.get("seed") or 0) for r in batch]


@pytest.mark.parametrize("arch", ["dense", "llada2"])
def test_the_reference_equals_the_naive_oracle_on_the_hard_cases(arch, tmp_path):
    model, eos = make_served_model(tmp_path, arch)
    singles, concurrent = request_sets(read_config(tmp_path)["vocab_size"], seed=len(arch))
    assert {r.get("temperature", 0.0) > 0 for r in concurrent} == {True, False}  # both regimes are in the cases
    for batch in [*[[r] for r in singles], concurrent]:
        assert reference_results(model, eos, batch) == naive(model, eos, batch), batch
    covers_the_hard_cases(singles, [g for r in singles for g in reference_results(model, eos, [r])])


def test_a_wrong_commit_rule_in_the_core_is_caught(tmp_path, monkeypatch):
    """`>=` instead of `>` (rule 4) in the core's rule function: the reference and every stack using it would agree
    with each other, the oracle does not. At threshold 1.0 a scaled-up head makes many confidences exactly 1.0."""
    model, eos = make_served_model(tmp_path, "dense")
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    batch = [{"prompt": [5, 17, 42, 99, 3, 8], "threshold": 1.0, "max_tokens": 32}]
    assert reference_results(model, eos, batch) == naive(model, eos, batch)
    strict = decoding.select_commits

    def commits_at_or_above(confidence: torch.Tensor, threshold: float, fallback_k: int) -> torch.Tensor:
        commit = confidence >= threshold
        return commit if commit.any() else strict(confidence, threshold, fallback_k)

    monkeypatch.setattr(decoding, "select_commits", commits_at_or_above)
    assert reference_results(model, eos, batch) != naive(model, eos, batch)
