"""The main job end to end at its quick scale: data, AR base, WSD conversion, HumanEval decoding."""

import json

import pytest

from blockdiff.models import BlockDiffusionSettings, load_model, read_config
from blockdiff.text import load_tokenizer
from blockdiff_demo import job


@pytest.mark.slow
def test_quick_demo_produces_loadable_models_and_a_decoding_record(tmp_path, capsys):
    job.main(["--out", str(tmp_path), "--scale", "quick"])
    printed = capsys.readouterr().out
    assert "TPF at threshold 0.95, block 32:" in printed
    record = json.loads((tmp_path / "decode.json").read_text())[str(tmp_path / "dllm")]
    results = record["requests"]
    assert len(results) == job.SCALES["quick"]["prompts"]
    for r in results:
        assert len(r["tokens"]) == r["max_tokens"] or r["finish_reason"] == "stop"
        assert r["max_tokens"] <= job.SCALES["quick"]["max_tokens"]
        assert r["tpf"] == pytest.approx(len(r["tokens"]) / r["denoise_forwards"])
    assert record["tpf"] >= 1.0
    for name in ("ar-base", "dllm"):
        load_model(tmp_path / name)
        assert load_tokenizer(tmp_path / name).get_vocab_size() == job.SCALES["quick"]["vocab"]
    settings = BlockDiffusionSettings.from_config(read_config(tmp_path / "dllm"))
    assert settings.block_size == 32 and settings.threshold == 0.95
    assert "block_diffusion" not in read_config(tmp_path / "ar-base")


def test_block_aligned_budget():
    assert job.block_aligned_budget(10, 64, 32) == 54  # 10 + 54 = 64
    assert job.block_aligned_budget(32, 64, 32) == 64
    assert job.block_aligned_budget(40, 16, 32) == 16  # no boundary within reach: the plain budget
