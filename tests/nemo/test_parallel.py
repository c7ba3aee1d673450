"""Megatron's parallelism through NeMo's strategy, on CPU (gloo, two processes): data parallel 2 and tensor parallel 2
each train exactly as one process does on the same global batch, and a distributed checkpoint saved at tensor parallel
2 resumes at tensor parallel 1 with the same losses."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blockdiff.models import build_model, init_weights, save_model, tiny_dense_config
from blockdiff.text import save_tokenizer, train_tokenizer
from blockdiff_demo.corpus import stdlib_documents
from nemo_dllm.training import read_metrics

pytestmark = pytest.mark.slow

# WSD over 21 steps of 4 rows: micro-batches of 2, so one process runs two per step and each of two data-parallel
# ranks one; a checkpoint every 3 steps, all kept
WSD_SCRIPT = textwrap.dedent("""
    import sys
    from nemo_dllm.stages import WSDConfig, wsd_cpt
    from nemo_dllm.training import TrainerConfig
    wsd_cpt(WSDConfig(init_from=sys.argv[1], out_dir=sys.argv[2], data=sys.argv[3], seq_len=64, batch_size=4,
                      warmup_tokens=3 * 256, stable_tokens=6 * 256, decay_tokens=3 * 256,
                      trainer=TrainerConfig(val_every=3, save_top_k=10, lr=2e-3, warmup_steps=2, micro_batch_size=2,
                                            tensor_parallel=int(sys.argv[4]))))
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny Qwen3 (4 heads and 2 KV groups, so tensor parallel 2 splits both) and a small corpus."""
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


def _wsd(inputs, out: Path, processes: int, tensor_parallel: int, port: int) -> list[dict]:
    base, corpus = inputs
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
              str(port)] if processes > 1 else [sys.executable]
    script = out.parent / "wsd_script.py"
    script.write_text(f"if __name__ == '__main__':\n{textwrap.indent(WSD_SCRIPT, '    ')}")
    done = subprocess.run([*launch, str(script), str(base), str(out), str(corpus), str(tensor_parallel)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return read_metrics(out / "metrics.jsonl")


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> list[dict]:
    return _wsd(inputs, tmp_path_factory.mktemp("single") / "run", 1, 1, 0)


def test_data_parallel_2_equals_one_process(inputs, single, tmp_path):
    records = _wsd(inputs, tmp_path / "dp2", 2, 1, 29431)
    assert [r["step"] for r in records] == list(range(21))
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)


def test_tensor_parallel_2_equals_one_process_and_its_checkpoint_resumes_at_tensor_parallel_1(inputs, single,
                                                                                               tmp_path):
    tp2 = tmp_path / "tp2"
    records = _wsd(inputs, tp2, 2, 2, 29432)
    assert _losses(records) == pytest.approx(_losses(single), abs=1e-5)
    # keep only the checkpoint after step 8 (steps 0-8 done), as NeMo's "last": the resumed run starts there
    resumed = tmp_path / "tp1-from-tp2"
    shutil.copytree(tp2, resumed)
    shutil.rmtree(resumed / "hf")
    for folder in (resumed / "checkpoints").iterdir():
        if "-step=8-" not in folder.name or folder.name.endswith("-last"):
            shutil.rmtree(folder)
    (kept,) = (resumed / "checkpoints").iterdir()
    kept.rename(kept.with_name(kept.name + "-last"))
    _tag_records(resumed / "metrics.jsonl")
    records = _wsd(inputs, resumed, 1, 1, 0)
    assert [r["step"] for r in records] == list(range(21))
    assert [r.get("tagged", False) for r in records] == [True] * 9 + [False] * 12  # resumed after step 8
    assert _losses(records[9:]) == pytest.approx(_losses(single[9:]), abs=1e-5)


def _tag_records(path: Path) -> None:
    """Mark the records already there: a run that resumes keeps those of the steps before its checkpoint, while one
    that started over would have replaced them all."""
    path.write_text("".join(json.dumps({**r, "tagged": True}) + "\n" for r in read_metrics(path)))
