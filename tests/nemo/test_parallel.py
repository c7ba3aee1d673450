"""Megatron's parallelism through NeMo's strategy, on CPU (gloo): data parallel 2, tensor parallel 2, pipeline parallel
2, context parallel 2 (two processes each) and three at once (tensor x pipeline x data or x context, 2 x 2 x 2, eight
processes) train exactly as one process does on the same global batch, and distributed checkpoints saved at tensor,
pipeline or context parallel 2 resume in one process with the same losses."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blockdiff.masks import bdlm_mask, mdlm_mask
from blockdiff.models import build_model, init_weights, save_model, tiny_dense_config
from blockdiff.text import save_tokenizer, train_tokenizer
from blockdiff_demo.corpus import stdlib_documents
from drivers.torchrun import launch_command
from nemo_dllm.parallel import context_parallel_shares
from nemo_dllm.training import read_metrics

pytestmark = pytest.mark.slow

# WSD over 21 steps of 4 rows in micro-batches of 1: one process runs four per step (so does a pipeline, in 1F1B
# order), each of two data-parallel ranks two; a checkpoint every 3 steps, all kept
WSD_SCRIPT = textwrap.dedent("""
    import sys
    from nemo_dllm.stages import WSDConfig, wsd_cpt
    from nemo_dllm.training import TrainerConfig
    wsd_cpt(WSDConfig(init_from=sys.argv[1], out_dir=sys.argv[2], data=sys.argv[3], seq_len=64, batch_size=4,
                      warmup_tokens=3 * 256, stable_tokens=6 * 256, decay_tokens=3 * 256,
                      trainer=TrainerConfig(val_every=3, save_top_k=10, lr=2e-3, warmup_steps=2, micro_batch_size=1,
                                            tensor_parallel=int(sys.argv[4]), pipeline_parallel=int(sys.argv[5]),
                                            context_parallel=int(sys.argv[6]))))
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny Qwen3 (4 heads and 2 KV groups, so tensor parallel 2 splits both; 2 layers, one per pipeline
    stage) and a small corpus."""
    root = tmp_path_factory.mktemp("parallel")
    docs = stdlib_documents(max_bytes=200_000)
    tok = train_tokenizer([d.text for d in docs], 400)
    base = root / "ar-base"
    save_tokenizer(tok, base, model_max_length=1024)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, head_dim=16,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, eos_token_id=0,
                            pad_token_id=0)
    save_model(init_weights(build_model(cfg), 0), cfg, base)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return base, corpus


def _wsd(inputs, out: Path, processes: int, tensor_parallel: int, pipeline_parallel: int, port: int,
         context_parallel: int = 1) -> list[dict]:
    base, corpus = inputs
    script = out.parent / "wsd_script.py"
    script.write_text(f"if __name__ == '__main__':\n{textwrap.indent(WSD_SCRIPT, '    ')}")
    done = subprocess.run([*launch_command(sys.executable, processes, port), str(script), str(base), str(out),
                           str(corpus), str(tensor_parallel), str(pipeline_parallel), str(context_parallel)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return read_metrics(out / "metrics.jsonl")


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def single_run(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _wsd(inputs, out, 1, 1, 1, 0)
    return out


@pytest.fixture
def single(single_run) -> list[dict]:
    return read_metrics(single_run / "metrics.jsonl")


def test_data_parallel_2_equals_one_process(inputs, single, tmp_path):
    records = _wsd(inputs, tmp_path / "dp2", 2, 1, 1, 29431)
    assert [r["step"] for r in records] == list(range(21))
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)


@pytest.mark.parametrize("tensor_parallel, pipeline_parallel, context_parallel, port",
                         [(2, 1, 1, 29432), (1, 2, 1, 29433), (1, 1, 2, 29435)], ids=["tensor", "pipeline", "context"])
def test_model_parallel_2_equals_one_process_and_its_checkpoint_resumes_in_one_process(
        inputs, single_run, single, tmp_path, tensor_parallel, pipeline_parallel, context_parallel, port):
    """Equal losses over 21 steps of WSD (block sizes 1 to 64, BDLM and MDLM rows) also mean equal gradients: any
    difference in them would change the next step's loss."""
    run = tmp_path / "parallel"
    records = _wsd(inputs, run, 2, tensor_parallel, pipeline_parallel, port, context_parallel)
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
    records = _wsd(inputs, resumed, 1, 1, 1, 0)
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
    records = _wsd(inputs, tmp_path / "run", 8, 2, 2, port, context_parallel)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["parallel"] == {"tensor": 2, "pipeline": 2, "context": context_parallel,
                                   "data": 2 // context_parallel}
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)


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
