"""Megatron's parallelism through NeMo's strategy, on CPU (gloo): data parallel 2, tensor parallel 2, pipeline parallel
2, context parallel 2 (two processes each) and three at once (tensor x pipeline x data or x context, 2 x 2 x 2, eight
processes) train exactly as one process does on the same global batch, and distributed checkpoints saved at tensor,
pipeline or context parallel 2 resume in one process with the same losses. On LLaDA2.0's MoE architecture, expert
parallel 2 trains as one process does, and so (to routing's near-ties) does expert x tensor x data parallel
2 x 2 x 2."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockdiff.masks import bdlm_mask, mdlm_mask
from blockdiff.models import build_model, init_weights, save_model, tiny_dense_config, tiny_llada2_config
from blockdiff.text import EOS, MASK, save_tokenizer, special_id, train_tokenizer
from blockdiff_demo.corpus import stdlib_documents
from drivers.torchrun import launch_command
from nemo_dllm.parallel import context_parallel_shares
from nemo_dllm.training import read_metrics

pytestmark = pytest.mark.slow

# WSD over 21 steps of 4 rows in micro-batches of 1 (or fewer, `phase_steps`): one process runs four per step (so
# does a pipeline, in 1F1B order), each of two data-parallel ranks two; a checkpoint every 3 steps, all kept. The
# parallel layout: TrainerConfig's keys as JSON
WSD_SCRIPT = textwrap.dedent("""
    import json, sys
    from nemo_dllm.stages import WSDConfig, wsd_cpt
    from nemo_dllm.training import TrainerConfig
    layout = json.loads(sys.argv[4])
    warmup, stable, decay = layout.pop("phase_steps", (3, 6, 3))
    wsd_cpt(WSDConfig(init_from=sys.argv[1], out_dir=sys.argv[2], data=sys.argv[3], seq_len=64, batch_size=4,
                      warmup_tokens=warmup * 256, stable_tokens=stable * 256, decay_tokens=decay * 256,
                      trainer=TrainerConfig(val_every=3, save_top_k=10, lr=2e-3, warmup_steps=2, micro_batch_size=1,
                                            **layout)))
""")


def _inputs(root: Path, moe: bool) -> tuple[Path, Path]:
    docs = stdlib_documents(max_bytes=200_000)
    tok = train_tokenizer([d.text for d in docs], 400)
    base = root / "ar-base"
    save_tokenizer(tok, base, model_max_length=1024)
    if moe:
        cfg = tiny_llada2_config(tok.get_vocab_size(), special_id(tok, MASK), special_id(tok, EOS))
    else:
        cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, head_dim=16,
                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, eos_token_id=0,
                                pad_token_id=0)
    save_model(init_weights(build_model(cfg), 0), cfg, base)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return base, corpus


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny Qwen3 (4 heads and 2 KV groups, so tensor parallel 2 splits both; 2 layers, one per pipeline
    stage) and a small corpus."""
    return _inputs(tmp_path_factory.mktemp("parallel"), moe=False)


def _wsd(inputs, out: Path, processes: int, port: int, **layout) -> list[dict]:
    base, corpus = inputs
    script = out.parent / "wsd_script.py"
    script.write_text(f"if __name__ == '__main__':\n{textwrap.indent(WSD_SCRIPT, '    ')}")
    done = subprocess.run([*launch_command(sys.executable, processes, port), str(script), str(base), str(out),
                           str(corpus), json.dumps(layout)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return read_metrics(out / "metrics.jsonl")


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def single_run(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _wsd(inputs, out, 1, 0)
    return out


@pytest.fixture
def single(single_run) -> list[dict]:
    return read_metrics(single_run / "metrics.jsonl")


def test_data_parallel_2_equals_one_process(inputs, single, tmp_path):
    records = _wsd(inputs, tmp_path / "dp2", 2, 29431)
    assert [r["step"] for r in records] == list(range(21))
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)


@pytest.mark.parametrize("tensor_parallel, pipeline_parallel, context_parallel, port",
                         [(2, 1, 1, 29432), (1, 2, 1, 29433), (1, 1, 2, 29435)], ids=["tensor", "pipeline", "context"])
def test_model_parallel_2_equals_one_process_and_its_checkpoint_resumes_in_one_process(
        inputs, single_run, single, tmp_path, tensor_parallel, pipeline_parallel, context_parallel, port):
    """Equal losses over 21 steps of WSD (block sizes 1 to 64, BDLM and MDLM rows) also mean equal gradients: any
    difference in them would change the next step's loss."""
    run = tmp_path / "parallel"
    records = _wsd(inputs, run, 2, port, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                   context_parallel=context_parallel)
    layout = {"tensor": tensor_parallel, "pipeline": pipeline_parallel, "context": context_parallel, "data": 1}
    assert json.loads((run / "summary.json").read_text())["parallel"] == layout  # as Megatron ran it
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)
    # keep only the checkpoint after step 8 (steps 0-8 done), as NeMo's "last": the resumed run starts there
    resumed = tmp_path / "one-process-from-parallel"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "hf")
    for folder in (resumed / "checkpoints").iterdir():
        if "-step=8-" not in folder.name or folder.name.endswith("-last"):
            shutil.rmtree(folder)
    (kept,) = (resumed / "checkpoints").iterdir()
    kept.rename(kept.with_name(kept.name + "-last"))
    _tag_records(resumed / "metrics.jsonl")
    records = _wsd(inputs, resumed, 1, 0)
    assert [r["step"] for r in records] == list(range(21))
    assert [r.get("tagged", False) for r in records] == [True] * 9 + [False] * 12  # resumed after step 8
    assert _losses(records[9:]) == pytest.approx(_losses(single[9:]), abs=1e-5)
    # the model exported from all shards and stages is the single process's: same held-out accuracy
    parallel_summary, single_summary = (json.loads((d / "summary.json").read_text()) for d in (run, single_run))
    assert parallel_summary["masked_token_accuracy"] == single_summary["masked_token_accuracy"]


@pytest.mark.parametrize("context_parallel, port", [(1, 29434), (2, 29436)], ids=["tp2-pp2-dp2", "tp2-pp2-cp2"])
def test_three_dimensions_2x2x2_equal_one_process(inputs, single, tmp_path, context_parallel, port):
    """The largest layouts this 2-core machine runs within the CI budget: eight gloo processes (about 1.5 minutes
    each), tensor x pipeline x data and tensor x pipeline x context."""
    records = _wsd(inputs, tmp_path / "run", 8, port, tensor_parallel=2, pipeline_parallel=2,
                   context_parallel=context_parallel)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["parallel"] == {"tensor": 2, "pipeline": 2, "context": context_parallel,
                                   "data": 2 // context_parallel}
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory) -> tuple[tuple[Path, Path], Path]:
    """A tiny LLaDA2MoeModelLM (3 layers, the first dense; 8 experts in 4 groups, top-2, a shared expert) and its
    7 steps of WSD (block sizes 1, 4, 32, 64, then the whole row) in one process."""
    root = tmp_path_factory.mktemp("moe")
    inputs = _inputs(root, moe=True)
    _wsd(inputs, root / "one", 1, 0, phase_steps=[1, 2, 1])
    return inputs, root / "one"


def _same_exported_model(inputs, single: Path, run: Path) -> None:
    """The same held-out accuracy and expert biases as the one process's, and the biases moved from their start
    (they follow the load)."""
    accuracy = [json.loads((d / "summary.json").read_text())["masked_token_accuracy"] for d in (single, run)]
    assert accuracy[0] == accuracy[1]
    start, one, parallel = (load_file(d / "model.safetensors") for d in (inputs[0], single / "hf", run / "hf"))
    assert one.keys() == parallel.keys() == start.keys()
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.gate.expert_bias"
        torch.testing.assert_close(parallel[name], one[name], atol=1e-6, rtol=0)
        assert not torch.allclose(one[name], start[name])


def test_expert_parallel_2_equals_one_process_on_llada2s_moe_model(moe_single, tmp_path):
    """Each of two processes holds 4 of the 8 experts; tokens travel by Megatron's all-to-all dispatcher. Each
    step's tokens per expert (summed over the ranks) are the one process's exactly, the losses agree to 1e-5."""
    inputs, single = moe_single
    records = _wsd(inputs, tmp_path / "ep2", 2, 29437, phase_steps=[1, 2, 1], expert_parallel=2)
    summary = json.loads((tmp_path / "ep2" / "summary.json").read_text())
    assert summary["parallel"] == {"tensor": 1, "pipeline": 1, "context": 1, "data": 2, "expert": 2}
    one = read_metrics(single / "metrics.jsonl")
    assert len(records) == len(one) == 7
    assert [r["expert_load"] for r in records] == [r["expert_load"] for r in one]
    assert all(sum(r["expert_load"]["1"]) == sum(r["expert_load"]["2"]) > 0 for r in records)
    assert _losses(records) == pytest.approx(_losses(one), abs=1e-5)
    _same_exported_model(inputs, single, tmp_path / "ep2")


def test_expert_x_tensor_x_data_parallel_2x2x2_trains_as_one_process_on_llada2s_moe_model(moe_single, tmp_path):
    """Experts over 2 expert-parallel ranks, each layer over 2 tensor-parallel ranks with sequence parallelism
    (which megatron-core requires of MoE layers under tensor parallelism), 2 data-parallel ranks: four processes.
    Routing is discontinuous: tensor parallelism sums in another order, and a token whose best experts nearly tie
    may go the other way (measured: one token at step 4), which moves that step's loss by about 1e-5; so the tokens
    per expert agree to a few tokens and the losses to 1e-4 (docs/moe.md)."""
    inputs, single = moe_single
    records = _wsd(inputs, tmp_path / "parallel", 4, 29438, phase_steps=[1, 2, 1], tensor_parallel=2,
                   expert_parallel=2, sequence_parallel=True)
    summary = json.loads((tmp_path / "parallel" / "summary.json").read_text())
    assert summary["parallel"] == {"tensor": 2, "pipeline": 1, "context": 1, "data": 2, "expert": 2}
    one = read_metrics(single / "metrics.jsonl")
    assert len(records) == len(one) == 7
    for record, want in zip(records, one):
        for layer in ("1", "2"):
            load, want_load = record["expert_load"][layer], want["expert_load"][layer]
            assert sum(load) == sum(want_load) > 0  # every token routed (top-2), summed over the ranks
            assert max(abs(a - b) for a, b in zip(load, want_load)) <= 4, (record["step"], layer, load, want_load)
    assert _losses(records) == pytest.approx(_losses(one), abs=1e-4)
    _same_exported_model(inputs, single, tmp_path / "parallel")


def _tag_records(path: Path) -> None:
    """Mark the records already there: a run that resumes keeps those of the steps before its checkpoint, while one
    that started over would have replaced them all."""
    path.write_text("".join(json.dumps({**r, "tagged": True}) + "\n" for r in read_metrics(path)))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_context_parallel_shares_split_the_sequence_with_balanced_attention_work(cp):
    """Packed rows (documents of uneven lengths) under each WSD mask: every position on exactly one rank, as many on
    each, and each rank's attention work (allowed query-key pairs) within 10% of every other's."""
    doc_ids = torch.tensor([[0] * 256, [0] * 40 + [1] * 100 + [2] * 60 + [3] * 56, [0] * 200 + [1] * 56])
    for allowed in (bdlm_mask(doc_ids, 4), bdlm_mask(doc_ids, 32), mdlm_mask(doc_ids)):
        shares = context_parallel_shares(allowed.sum(dim=(0, 2)), cp)
        assert torch.equal(torch.cat(shares).sort().values, torch.arange(allowed.shape[1]))
        assert {len(s) for s in shares} == {allowed.shape[1] // cp}
        work = [int(allowed[:, rows].sum()) for rows in shares]
        assert max(work) <= 1.1 * min(work), work
    with pytest.raises(ValueError, match="a sequence of 12 tokens does not split evenly over context_parallel = 8"):
        context_parallel_shares(torch.ones(12), 8)
