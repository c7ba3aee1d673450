"""The main job's task family as an lm-eval dataset (`blockdiff_expressions` in lm_eval_blockdiff's task folder
names this function): the held-out expressions `make demo` evaluates, in its order, as the one split `test`."""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from blockdiff_demo.corpus import held_out_tasks


def held_out_expressions(**_: object) -> DatasetDict:
    rows = [{"family": t.family, "expression": t.expression, "prompt": t.prompt, "answer": t.answer}
            for t in held_out_tasks()]
    return DatasetDict({"test": Dataset.from_list(rows)})
