"""The task family the main job trains and scores on: a held-out split no training file contains, answers that are
what Python prints, and scoring by exact match."""

import json
import subprocess
import sys

import pytest

from blockdiff_demo.corpus import write_recipe_data
from blockdiff_demo.tasks import FAMILIES, Task, draw_tasks, is_exact


def test_the_held_out_side_shares_no_instance_with_the_training_side():
    train, held_out = draw_tasks(20_000, held_out=False, seed=0), draw_tasks(500, held_out=True, seed=1)
    assert not {t.expression for t in train} & {t.expression for t in held_out}
    assert len({t.expression for t in train}) == len(train)  # distinct instances
    assert {t.family for t in held_out} == set(FAMILIES) and len({t.family for t in held_out[:len(FAMILIES)]}) == 9
    assert draw_tasks(9, held_out=True, seed=1) == held_out[:9]  # a smaller evaluation set is a prefix of a larger


def test_answers_are_what_the_interpreter_prints():
    tasks = draw_tasks(2 * len(FAMILIES), held_out=True, seed=1)
    session = "".join(t.expression + "\n" for t in tasks)
    printed = subprocess.run([sys.executable, "-i", "-q"], input=session, capture_output=True, text=True,
                             timeout=60).stdout.splitlines()
    assert printed == [t.answer for t in tasks]


def test_scoring_is_exact_match():
    task = Task("sorted", "sorted([3, 1, 2])")
    assert task.answer == "[1, 2, 3]" and task.text == ">>> sorted([3, 1, 2])\n[1, 2, 3]"
    assert is_exact(task, "[1, 2, 3]")
    for near_miss in ("[1, 2, 3]\n", " [1, 2, 3]", "[1,2,3]", "[1, 2, 3, 4]", ""):
        assert not is_exact(task, near_miss)


@pytest.mark.slow
def test_no_training_file_contains_a_held_out_instance(tmp_path):
    paths = write_recipe_data(tmp_path)
    held_out = [json.loads(line) for line in paths["tasks_heldout"].read_text().splitlines()]
    assert len(held_out) == 180
    expressions = {row["prompt"] for row in held_out}
    for name in ("pretrain", "sft", "preferences"):
        rows = [json.loads(line) for line in paths[name].read_text().splitlines()]
        texts = [row.get("text") or row["prompt"] for row in rows]
        seen = {line + "\n" for text in texts for line in text.splitlines() if line.startswith(">>> ")}
        assert not seen & expressions, name
        assert any(text.startswith(">>> ") for text in texts), f"{name} has no task instances"
    questions = [json.loads(line)["messages"][0]["content"] for line in paths["sft_chat"].read_text().splitlines()]
    held_out_questions = {f"What does Python print for {row['prompt'][4:-1]}?" for row in held_out}
    assert len(questions) == 20_000 and not set(questions) & held_out_questions
