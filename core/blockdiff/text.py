"""Text to training rows: the project's special tokens and chat format, byte-level BPE tokenizers written as
Hugging Face tokenizer files, and packing documents into rows with their boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = (EOS, MASK, "<|user|>", "<|assistant|>")
# The chat format of the embedded tokenizer: each message as <|role|>content, then <|assistant|> to prompt a reply.
# Training renders it with `apply_chat_template` as the serving stacks' chat endpoints do.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def checkpoint_chat_template(model_dir: str | Path) -> str:
    """The checkpoint's own chat template: `chat_template.jinja` (as transformers 5 saves it) or the
    `chat_template` of tokenizer_config.json."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").exists():
        return (model_dir / "chat_template.jinja").read_text()
    template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if not isinstance(template, str):
        raise ValueError(f"{model_dir} has no chat template (chat_template.jinja or tokenizer_config.json's "
                         "chat_template)")
    return template


def apply_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A chat template rendered as transformers renders it (a sandboxed Jinja environment that trims blocks), without
    transformers: the training venv's transformers cannot read every tokenizer a newer one wrote."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (any text encodes); special tokens first, so EOS = 0 and MASK = 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets `transformers.AutoTokenizer` (and so every serving
    stack) load it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS, "mask_token": MASK,
        "additional_special_tokens": list(SPECIAL_TOKENS[2:]), "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def special_id(tok: Tokenizer, token: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise ValueError(f"tokenizer has no special token {token!r}")
    return tid


def pack_documents(docs: list[list[int]], seq_len: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents (each followed by EOS) and cut into rows of seq_len. Returns input ids and document ids
    [rows, seq_len]; a document cut by a row boundary continues in the next row as a new document (its positions
    restart there). The tail that does not fill a row is dropped."""
    ids, doc = [], []
    for i, d in enumerate(docs):
        ids += d + [eos_id]
        doc += [i] * (len(d) + 1)
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one row of {seq_len}")
    ids_t = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
    doc_t = torch.tensor(doc[: rows * seq_len]).view(rows, seq_len)
    # renumber per row so ids form contiguous runs starting at 0
    starts = torch.ones_like(doc_t, dtype=torch.bool)
    starts[:, 1:] = doc_t[:, 1:] != doc_t[:, :-1]
    return ids_t, starts.long().cumsum(dim=1) - 1
