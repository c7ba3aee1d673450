"""The main job end to end at its quick scale: data, AR base, WSD conversion, held-out task evaluation."""

import json

import pytest

from blockdiff.models import BlockDiffusionSettings, load_model, read_config
from blockdiff.text import load_tokenizer
from blockdiff_demo import job
from blockdiff_demo.evaluate import block_aligned_budget


@pytest.mark.slow
def test_quick_demo_produces_loadable_models_and_an_evaluation_record(tmp_path, capsys):
    job.main(["--out", str(tmp_path), "--scale", "quick"])
    printed = capsys.readouterr().out
    assert "held-out tasks, exact match" in printed
    record = json.loads((tmp_path / "evaluation.json").read_text())
    tasks = record["tasks"]
    assert len(tasks) == job.SCALES["quick"]["eval_tasks"]
    ar, dllm = record["models"][str(tmp_path / "ar-base")], record["models"][str(tmp_path / "dllm")]
    assert ar["block_size"] is None and ar["tpf"] == 1.0  # greedy AR: one token per forward
    assert dllm["block_size"] == 32 and dllm["threshold"] == 0.95 and dllm["tpf"] >= 1.0
    for model in (ar, dllm):
        right = [out == t["answer"] for out, t in zip(model["outputs"], tasks)]
        assert model["accuracy"] == pytest.approx(sum(right) / len(tasks))
    for name in ("ar-base", "dllm"):
        load_model(tmp_path / name)
        assert load_tokenizer(tmp_path / name).get_vocab_size() == job.SCALES["quick"]["vocab"]
    settings = BlockDiffusionSettings.from_config(read_config(tmp_path / "dllm"))
    assert settings.block_size == 32 and settings.threshold == 0.95
    assert "block_diffusion" not in read_config(tmp_path / "ar-base")
    for name in ("pretrain", "sft", "preferences", "tasks_heldout"):
        assert (tmp_path / "data" / f"{name}.jsonl").stat().st_size > 0


def test_block_aligned_budget():
    assert block_aligned_budget(10, 64, 32) == 54  # 10 + 54 = 64
    assert block_aligned_budget(32, 64, 32) == 64
    assert block_aligned_budget(40, 16, 32) == 16  # no boundary within reach: the plain budget
