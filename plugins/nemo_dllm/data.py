"""Training data for the recipes: packed pretraining documents with their boundaries, prompt/response pairs for SFT,
preference triples for DPO, each from a JSONL file checked line by line before training starts; an error names the
file, the line and what is wrong with it. (`python -m blockdiff_demo base` writes the demo's files in this format.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from blockdiff.models import BlockDiffusionSettings, read_config
from blockdiff.noise import pad_to_block_multiple
from blockdiff.text import (
    EOS,
    apply_chat_template,
    checkpoint_chat_template,
    load_tokenizer,
    pack_documents,
    special_id,
)


class DataError(ValueError):
    pass


def read_jsonl(path: str | Path, schema: dict[str, type]) -> list[dict]:
    """Every line a JSON object with these keys of these types (strings non-empty)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key, kind in schema.items():
            if key not in row:
                raise DataError(f"{path}:{lineno}: missing key {key!r}")
            if not isinstance(row[key], kind) or (kind is str and not row[key]):
                raise DataError(f"{path}:{lineno}: {key!r} must be a non-empty {kind.__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def pretraining_rows(source: str, tok: Tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """(train ids, train doc ids, validation ids, validation doc ids), rows of seq_len packed with EOS between
    documents, from a JSONL file of {"text": ...} documents (every 20th held out)."""
    texts = [r["text"] for r in read_jsonl(source, {"text": str})]
    held_out = [i % 20 == 19 for i in range(len(texts))]
    encoded = [e.ids for e in tok.encode_batch(texts)]
    eos = special_id(tok, EOS)
    train = pack_documents([e for e, v in zip(encoded, held_out) if not v], seq_len, eos)
    val = pack_documents([e for e, v in zip(encoded, held_out) if v] or encoded[-1:], seq_len, eos)
    return train[0], train[1], val[0], val[1]


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    response: list[int]  # ends with EOS


def _chat_prompt(messages: list, where: str, template: str) -> tuple[str, str]:
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's, got {messages[-1]['role']!r}")
    prompt = apply_chat_template(template, messages[:-1], add_generation_prompt=True)
    return prompt, messages[-1]["content"]


def response_end(checkpoint: str) -> int:
    """The token that ends a response: the block-diffusion checkpoint's first EOS (a chat model's end of turn)."""
    return BlockDiffusionSettings.from_config(read_config(checkpoint)).eos_token_ids[0]


def sft_examples(source: str, checkpoint: str) -> list[Example]:
    """From a JSONL of {"prompt", "response"} or chat-style {"messages": [...]} lines, tokenized as the checkpoint
    reads them: its tokenizer, its chat template for the prompt, its end token after the response."""
    path, pairs, template = Path(source), [], None
    for lineno, line in enumerate(path.read_text().splitlines() if path.exists() else [], start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            template = template or checkpoint_chat_template(checkpoint)
            pairs.append(_chat_prompt(row["messages"], where, template))
        elif isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k] for k in ("prompt", "response")):
            pairs.append((row["prompt"], row["response"]))
        else:
            raise DataError(f"{where}: expected {{'prompt', 'response'}} strings or a 'messages' list")
    if not pairs:
        raise DataError(f"data file {path} does not exist or has no examples")
    tok, eos = load_tokenizer(checkpoint), response_end(checkpoint)
    return [Example(tok.encode(p).ids, tok.encode(r).ids + [eos]) for p, r in pairs]


@dataclass(frozen=True)
class Preference:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def preference_examples(source: str, checkpoint: str) -> list[Preference]:
    """From a JSONL of {"prompt", "chosen", "rejected"} lines, tokenized as the checkpoint reads them."""
    tok, eos = load_tokenizer(checkpoint), response_end(checkpoint)
    rows = read_jsonl(source, {"prompt": str, "chosen": str, "rejected": str})
    return [Preference(tok.encode(r["prompt"]).ids, tok.encode(r["chosen"]).ids + [eos],
                       tok.encode(r["rejected"]).ids + [eos]) for r in rows]


def response_batch(pairs: list[tuple[list[int], list[int]]], seq_len: int, block_size: int, eos_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of prompt + response cut to seq_len, each padded with EOS to its own block multiple: that padding is part
    of the response (the model learns to fill the last block after it stops). Shorter rows are then filled up to the
    batch width with EOS as a separate document outside the loss, so batch padding neither dominates the loss nor
    is seen by the real tokens. Returns ids, the response (loss) mask and document ids."""
    rows = [pad_to_block_multiple((p + r)[:seq_len], block_size, eos_id) for p, r in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
    response = torch.zeros(len(rows), width, dtype=torch.bool)
    doc_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ((prompt, _), row) in enumerate(zip(pairs, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        response[i, min(len(prompt), len(row)): len(row)] = True
        doc_ids[i, len(row):] = 1
    return ids, response, doc_ids
