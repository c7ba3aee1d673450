"""The reference dense model against transformers' own implementations, and HF-directory round trips."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from blockdiff.models import (
    BlockDiffusionSettings,
    build_model,
    init_weights,
    load_model,
    read_config,
    save_model,
    tiny_dense_config,
    with_block_diffusion,
)


def _causal(length):
    return torch.ones(length, length, dtype=torch.bool).tril()[None]


def _compare_with_transformers(cfg, tmp_path):
    model = init_weights(build_model(cfg), 0, std=0.2)
    save_model(model, cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, torch.arange(37).expand(2, -1), _causal(37).expand(2, -1, -1))
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_qwen3_logits_match_transformers(tmp_path):
    _compare_with_transformers(tiny_dense_config(vocab_size=300), tmp_path)


def test_llama_logits_match_transformers(tmp_path):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    _compare_with_transformers(cfg, tmp_path)


def test_block_diffusion_directory_round_trip(tmp_path):
    cfg = tiny_dense_config(vocab_size=100, num_hidden_layers=1)
    settings = BlockDiffusionSettings(mask_token_id=99, eos_token_ids=(0,), block_size=32, threshold=0.9)
    dcfg = with_block_diffusion(cfg, settings)
    model = init_weights(build_model(dcfg), 1)
    save_model(model, dcfg, tmp_path)
    assert read_config(tmp_path)["architectures"] == ["Qwen3BlockDiffusionForCausalLM"]
    assert BlockDiffusionSettings.from_config(read_config(tmp_path)) == settings
    loaded, _ = load_model(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # still an ordinary HF Qwen3 directory for transformers (model_type decides), carrying the settings
    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.model_type == "qwen3" and hf_cfg.block_diffusion["mask_token_id"] == 99


def test_tied_embeddings_are_saved_once_and_reloaded(tmp_path):
    cfg = {**tiny_dense_config(vocab_size=50, num_hidden_layers=1), "tie_word_embeddings": True}
    model = init_weights(build_model(cfg), 0)
    save_model(model, cfg, tmp_path)
    loaded, _ = load_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_unknown_architecture_and_wrong_weights_are_named(tmp_path):
    cfg = tiny_dense_config(vocab_size=50, num_hidden_layers=1)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        build_model({**cfg, "architectures": ["GPT2LMHeadModel"]})
    save_model(init_weights(build_model(cfg), 0), cfg, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="missing \\['model.layers.1"):
        load_model(tmp_path)


@pytest.mark.parametrize("bad,match", [(dict(block_size=0), "block_size"), (dict(threshold=2.0), "threshold"),
                                       (dict(eos_token_ids=()), "eos_token_ids")])
def test_bad_block_diffusion_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        BlockDiffusionSettings(**{"mask_token_id": 1, "eos_token_ids": (0,), **bad})
