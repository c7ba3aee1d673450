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


def test_chat_evaluation_asks_through_the_template_and_stops_at_any_config_eos(tmp_path):
    """`evaluate(chat=True)`: each task is the user turn of the checkpoint's chat template, and an AR model's output
    ends at whichever of the config's `eos_token_id` list comes first (a chat model's end of turn, not only EOS)."""
    from blockdiff.decoding import greedy_ar_decode
    from blockdiff.models import build_model, init_weights, save_model, tiny_dense_config
    from blockdiff.text import apply_chat_template, checkpoint_chat_template, save_tokenizer, train_tokenizer
    from blockdiff_demo.corpus import chat_question, held_out_tasks
    from blockdiff_demo.evaluate import evaluate

    tasks = held_out_tasks(2)
    tok = train_tokenizer([t.prompt + t.answer for t in held_out_tasks(50)], 300)
    save_tokenizer(tok, tmp_path, model_max_length=512)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), num_hidden_layers=1)
    model = init_weights(build_model(cfg), 0)
    prompt = tok.encode(apply_chat_template(checkpoint_chat_template(tmp_path), [
        {"role": "user", "content": chat_question(tasks[0])}], True)).ids
    free = greedy_ar_decode(model, [prompt], 6, ())[0].tokens
    stop = free[3]
    cfg["eos_token_id"] = [tok.get_vocab_size() - 1 if stop != tok.get_vocab_size() - 1 else 0, stop]
    save_model(model, cfg, tmp_path)
    result = evaluate(tmp_path, tasks, name="chat", chat=True)
    assert result.outputs[0] == tok.decode(free[:free.index(stop)])
    assert result.tpf == 1.0 and result.block_size is None


def test_the_moe_base_is_llada2s_architecture_without_block_diffusion(capsys):
    """`base --arch llada2_moe`: the AR base the `moe_tiny` recipes start from is a LLaDA2MoeModelLM with MoE layers
    (the first dense) and no `block_diffusion` section (the WSD stage adds it); `--arch` with another step is an
    error naming the fix, before any work."""
    from blockdiff.models import build_model
    from blockdiff.models.llada2_moe import LLaDA2MoeDecoder

    cfg = job.base_config("llada2_moe", vocab_size=300, eos=0, mask=1)
    assert "block_diffusion" not in cfg and cfg["num_experts"] == 8 and cfg["first_k_dense_replace"] == 1
    assert isinstance(build_model(cfg), LLaDA2MoeDecoder)
    assert job.BASES["llada2_moe"] == "moe-base"
    with pytest.raises(SystemExit):
        job.main(["convert", "--arch", "llada2_moe", "--out", "unused"])
    assert "`base --arch llada2_moe`" in capsys.readouterr().err
