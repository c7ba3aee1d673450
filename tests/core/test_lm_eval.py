"""The lm-eval plugin (lm_eval_blockdiff): lm-eval's own evaluator drives the core's reference decoder through the
`blockdiff` model and this plugin's offline tasks; outputs, scores and cost are checked against the decoder itself."""

import math
import subprocess
import sys

import lm_eval
import pytest
from lm_eval.tasks import TaskManager
from transformers import AutoTokenizer

from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff_demo.corpus import held_out_tasks
from blockdiff_demo.lm_eval_data import held_out_expressions
from blockdiff_demo.tasks import draw_tasks
from lm_eval_blockdiff import TASKS_DIR, tasks
from lm_eval_blockdiff.models import BlockDiffusionLM, Completion, Cost, response_cost
from tiny_models import make_tiny_ar_model, make_tiny_blockdiff_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return path, make_tiny_blockdiff_model(path, "dense")


def evaluate(model_args: dict, tasks: list[str], limit: int = 3) -> dict:
    return lm_eval.simple_evaluate(model="blockdiff", model_args=model_args, tasks=tasks, limit=limit,
                                   log_samples=True, task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                   confirm_run_unsafe_code=True)


def test_lm_eval_outputs_and_cost_are_the_reference_decoders(tiny):
    path, model = tiny
    results = evaluate({"pretrained": str(path), "threshold": 0.5},
                       ["blockdiff_expressions", "blockdiff_word_problems"])
    tok = AutoTokenizer.from_pretrained(path)
    decoder = ReferenceDecoder(model, 1, (0,))
    for task, max_tokens, stops in (("blockdiff_expressions", 48, []), ("blockdiff_word_problems", 64,
                                                                        ["\n\n", "Question:"])):
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        tokens = forwards = nfe = 0
        for sample in samples:
            prompt = sample["arguments"][0][0]
            want = decoder.generate([tok.encode(prompt)], DecodeParams(max_tokens=max_tokens, threshold=0.5))[0]
            text = tok.decode([t for t in want.tokens if t != 0], skip_special_tokens=True)
            for stop in stops:
                text = text.split(stop)[0]
            assert sample["filtered_resps"][0] == text
            tokens, forwards, nfe = tokens + len(want.tokens), forwards + want.denoise_forwards, nfe + want.nfe
        metrics = results["results"][task]
        assert metrics["tpf,none"] == pytest.approx(tokens / forwards)
        assert metrics["nfe_per_token,none"] == pytest.approx(nfe / tokens)
        assert metrics["tokens_per_second,none"] > 0
    assert samples[0]["arguments"][0][0].startswith("Question: ")


def test_expression_prompts_are_the_demos_held_out_instances_and_scored_on_the_exact_output():
    docs = list(held_out_expressions()["test"])
    assert [(d["prompt"], d["answer"]) for d in docs] == [(t.prompt, t.answer) for t in held_out_tasks()]
    training = {t.expression for t in draw_tasks(2000, held_out=False, seed=0)}
    assert not training & {d["expression"] for d in docs}
    doc = docs[0]
    assert tasks.score_exact(doc, [doc["answer"]])["exact_match"] == 1.0
    for near_miss in (doc["answer"] + " ", doc["answer"] + "\n", " " + doc["answer"], doc["answer"][:-1]):
        assert tasks.score_exact(doc, [near_miss])["exact_match"] == 0.0


def test_word_problems_are_offline_deterministic_and_scored_by_their_last_integer():
    problems = tasks.draw_word_problems(30)
    assert problems == tasks.draw_word_problems(30) and len({p["question"] for p in problems}) > 25
    doc = {"question": "q", "answer": "42"}
    assert tasks.score_word_problem(doc, ["6 * 7 = 42"])["exact_match"] == 1.0
    assert tasks.score_word_problem(doc, ["42 is 6 * 7"])["exact_match"] == 0.0
    assert tasks.score_word_problem(doc, ["no number"])["exact_match"] == 0.0


def test_humaneval_is_scored_by_running_the_problems_tests():
    docs = list(tasks.humaneval()["test"])
    assert len(docs) == 164
    doc = docs[0]
    assert tasks.score_humaneval(doc, [doc["canonical_solution"]])["pass@1"] == 1.0
    assert tasks.score_humaneval(doc, ["    return None\n"])["pass@1"] == 0.0
    assert tasks.score_humaneval(doc, ["    while True:\n        pass\n"])["pass@1"] == 0.0  # the timeout


def test_cost_is_aggregated_as_a_ratio_of_sums_and_absent_without_accounting():
    a, b = Completion("x", Cost(10, 2, 3, 0.5)), Completion("y", Cost(30, 10, 11, 1.5))
    rows = [tasks.cost_metrics(a), tasks.cost_metrics(b)]
    assert tasks.ratio([r["tpf"] for r in rows]) == 40 / 12
    assert tasks.ratio([r["nfe_per_token"] for r in rows]) == 14 / 40
    assert tasks.ratio([r["tokens_per_second"] for r in rows]) == 20.0
    assert tasks.cost_metrics("plain text") == {} and math.isnan(tasks.ratio([]))


def test_server_accounting_is_read_from_either_stacks_response():
    usage = {"usage": {"completion_tokens": 12}, "_blockdiff_latency": 0.25}
    vllm = {**usage, "kv_transfer_params": {"block_diffusion": {"denoise_forwards": 4, "nfe": 6, "tpf": 3.0}}}
    sglang = {**usage, "metadata": {"block_diffusion": {"denoise_forwards": 4, "nfe": 6, "tpf": 3.0}}}
    assert response_cost(vllm) == response_cost(sglang) == Cost(12, 4, 6, 0.25)
    assert response_cost({"usage": {"completion_tokens": 12}}) is None  # an AR model or another server


def test_an_ar_checkpoint_is_decoded_greedily_with_tpf_one(tmp_path):
    make_tiny_ar_model(tmp_path)
    results = evaluate({"pretrained": str(tmp_path)}, ["blockdiff_expressions"], limit=2)
    assert results["results"]["blockdiff_expressions"]["tpf,none"] == 1.0


def test_bad_model_args_and_likelihood_requests_are_refused_by_name(tiny):
    path, _ = tiny
    with pytest.raises(ValueError, match="unknown model_args.*'blocksize'"):
        BlockDiffusionLM(pretrained=str(path), blocksize=8)
    with pytest.raises(ValueError, match="threshold must be in"):
        BlockDiffusionLM(pretrained=str(path), threshold=1.5)
    with pytest.raises(NotImplementedError, match="loglikelihood requests are not supported"):
        BlockDiffusionLM(pretrained=str(path)).loglikelihood([])


def test_the_models_are_lm_eval_plugin_entry_points_that_resolve_lazily_to_the_registered_classes(tmp_path):
    """lm-eval after 0.4.13 reads the `lm_eval.models` entry points and registers each name as a lazy `module:object`
    placeholder, imported only when a run asks for it; the import's `@register_model` then upgrades the placeholder,
    which works only if the entry point names the decorated class. 0.4.13's registry takes the same placeholder, so a
    fresh interpreter does here what that discovery does, outside the checkout (whose build metadata would shadow the
    installed one)."""
    script = """
import importlib.metadata, sys
from lm_eval.api.registry import get_model, model_registry
for entry in importlib.metadata.entry_points(group="lm_eval.models"):
    model_registry.register(entry.name, target=entry.value)
assert "lm_eval_blockdiff.models" not in sys.modules
print(sorted((name, get_model(name).__module__ + ":" + get_model(name).__name__)
             for name in ("blockdiff", "blockdiff-completions")))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str([("blockdiff", "lm_eval_blockdiff.models:BlockDiffusionLM"),
                                      ("blockdiff-completions", "lm_eval_blockdiff.models:BlockDiffusionCompletions")])
