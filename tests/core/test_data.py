import platform

import pytest
from transformers import AutoTokenizer

from blockdiff.text import (
    EOS,
    MASK,
    apply_chat_template,
    checkpoint_chat_template,
    load_tokenizer,
    pack_documents,
    save_tokenizer,
    special_id,
    train_tokenizer,
)
from blockdiff_demo import corpus
from blockdiff_demo.corpus import Document, function_sft_pairs, humaneval_prompts, stdlib_documents


@pytest.fixture(scope="module")
def docs():
    return stdlib_documents(max_bytes=400_000)


def test_stdlib_corpus_is_real_deterministic_code(docs):
    assert len(docs) > 10 and all(d.name.endswith(".py") for d in docs)
    assert [d.name for d in stdlib_documents(max_bytes=400_000)] == [d.name for d in docs]
    assert not any("/test/" in f"/{d.name}" for d in docs)
    assert any("def " in d.text for d in docs)
    full = stdlib_documents()
    assert any(d.is_validation for d in full) and sum(d.is_validation for d in full) < len(full) / 10


def test_the_stdlib_fingerprint_names_the_python_and_changes_with_any_source(docs, monkeypatch):
    """The demo prints it: two runs whose figures differ can be told apart by the corpus they read."""
    fingerprint = corpus.stdlib_fingerprint()
    assert fingerprint.startswith(f"Python {platform.python_version()}, ")
    assert fingerprint == corpus.stdlib_fingerprint()
    monkeypatch.setattr(corpus, "stdlib_documents", lambda: docs)
    original = corpus.stdlib_fingerprint()
    edited = [*docs[:-1], Document(docs[-1].name, docs[-1].text + "\n")]  # one byte more in one file
    monkeypatch.setattr(corpus, "stdlib_documents", lambda: edited)
    assert corpus.stdlib_fingerprint() != original
    assert corpus.stdlib_fingerprint().split(", ")[:2] == original.split(", ")[:2]  # same version, same file count


def test_tokenizer_round_trip_and_transformers_loading(docs, tmp_path):
    tok = train_tokenizer([d.text for d in docs], 400)
    assert special_id(tok, EOS) == 0 and special_id(tok, MASK) == 1
    code = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert tok.decode(tok.encode(code).ids) == code
    save_tokenizer(tok, tmp_path, model_max_length=512)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(code) == load_tokenizer(tmp_path).encode(code).ids
    assert hf.eos_token_id == 0 and hf.mask_token_id == 1
    chat = [{"role": "user", "content": "add one"}, {"role": "assistant", "content": "x + 1"}]
    for prompt in (True, False):  # training renders the checkpoint's chat template as the serving stacks do
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == apply_chat_template(
            checkpoint_chat_template(tmp_path), chat, prompt)
    with pytest.raises(ValueError, match="no special token"):
        special_id(tok, "<|nope|>")


def test_pack_documents_keeps_boundaries():
    ids, doc_ids = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12]], seq_len=4, eos_id=0)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10]]
    assert doc_ids.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="do not fill one row"):
        pack_documents([[1]], seq_len=8, eos_id=0)


def test_function_sft_pairs(docs):
    pairs = function_sft_pairs(docs)
    assert len(pairs) > 20
    for p in pairs[:50]:
        assert p.prompt.lstrip().startswith(("def ", "async def ", "@"))
        assert p.prompt.rstrip().endswith(('"""', "'''")) and p.response.strip()


def test_humaneval_prompts_from_the_package():
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    assert prompts[0].startswith("from typing import List") and "def has_close_elements" in prompts[0]
