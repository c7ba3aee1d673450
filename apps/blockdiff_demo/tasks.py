"""A task family with checkable answers, made on this machine: short Python expressions over lists of digits and
letters, written as an interactive session (`>>> sorted([4, 1, 3])` then the line Python prints, `[1, 3, 4]`). The
answer is what Python itself prints for the expression, so every instance is right by construction, and a model's
output is scored by exact match against it.

Instances are split by a hash of the expression: an expression is held out on every machine or on none, so the
held-out set shares no instance with the training set, however many of each are drawn.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable

HELD_OUT_ONE_IN = 10  # a tenth of all expressions is held out


def _digits(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return repr([rng.randrange(10) for _ in range(rng.randint(low, high))])


def _letters(rng: random.Random) -> str:
    return " ".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))


# family -> a function drawing one expression; every expression evaluates with no names but builtins
FAMILIES: dict[str, Callable[[random.Random], str]] = {
    "sorted": lambda rng: f"sorted({_digits(rng)})",
    "reverse": lambda rng: f"{_digits(rng)}[::-1]",
    "unique": lambda rng: f"sorted(set({_digits(rng, 4, 6)}))",
    "min": lambda rng: f"min({_digits(rng)})",
    "add_one": lambda rng: f"[x + 1 for x in {_digits(rng)}]",
    "double": lambda rng: f"[x * 2 for x in {_digits(rng)}]",
    "max": lambda rng: f"max({_digits(rng)})",
    "len": lambda rng: f"len({_digits(rng, 1, 9)})",
    "split": lambda rng: f"{_letters(rng)!r}.split()",
}


@dataclass(frozen=True)
class Task:
    family: str
    expression: str

    @property
    def prompt(self) -> str:
        return f">>> {self.expression}\n"

    @property
    def answer(self) -> str:
        """What the interpreter prints for the expression (its repr)."""
        builtins = {"sorted": sorted, "set": set, "max": max, "min": min, "len": len}
        return repr(eval(self.expression, {"__builtins__": builtins}))

    @property
    def text(self) -> str:
        """The instance as a training document: the prompt, then the answer, then (added by packing) EOS."""
        return self.prompt + self.answer

    @property
    def is_held_out(self) -> bool:
        return int(hashlib.sha256(self.expression.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def draw_tasks(count: int, held_out: bool, seed: int) -> list[Task]:
    """`count` distinct instances from one side of the split, the families in turn."""
    rng, seen, tasks = random.Random(seed), set(), []
    families = sorted(FAMILIES)
    while len(tasks) < count:
        family = families[len(tasks) % len(families)]
        task = Task(family, FAMILIES[family](rng))
        if task.is_held_out == held_out and task.expression not in seen:
            seen.add(task.expression)
            tasks.append(task)
    return tasks


def is_exact(task: Task, output: str) -> bool:
    """The output is right when it is exactly the answer: no extra characters, not even whitespace."""
    return output == task.answer
