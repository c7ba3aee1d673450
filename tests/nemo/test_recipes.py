"""The recipe stages in NeMo's trainer: WSD across SIGKILLs and resume from NeMo's distributed checkpoints, checkpoints
kept and merged by validation loss, configuration and data errors before training, and the NeMo-Run command line."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest
import torch

from blockdiff.models import build_model, init_weights, save_model, tiny_dense_config
from blockdiff.text import save_tokenizer, train_tokenizer
from blockdiff_demo.corpus import stdlib_documents
from drivers.processes import group_stats
from nemo_dllm.data import DataError, read_jsonl, sft_examples
from nemo_dllm.stages import DPOConfig, MergeConfig, SFTConfig, WSDConfig, merge, sft, wsd_cpt
from nemo_dllm.training import TrainerConfig, read_metrics

NEMO = Path(sys.executable).parent / "nemo"


@pytest.fixture(scope="module")
def ar_base(tmp_path_factory):
    """A random tiny Qwen3 with a tokenizer trained on part of the standard library."""
    path = tmp_path_factory.mktemp("ar-base")
    tok = train_tokenizer([d.text for d in stdlib_documents(max_bytes=300_000)], 400)
    save_tokenizer(tok, path, model_max_length=1024)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, head_dim=16,
                            intermediate_size=128, eos_token_id=0, pad_token_id=0)
    save_model(init_weights(build_model(cfg), 0), cfg, path)
    return path


def _corpus(tmp_path: Path) -> Path:
    """A small JSONL corpus (the stdlib would take longer to tokenize than the run takes)."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in stdlib_documents(max_bytes=200_000)))
    return path


WSD_SCRIPT = textwrap.dedent("""
    import sys
    from nemo_dllm.stages import WSDConfig, wsd_cpt
    from nemo_dllm.training import TrainerConfig
    wsd_cpt(WSDConfig(init_from=sys.argv[1], out_dir=sys.argv[2], data=sys.argv[3], seq_len=64, batch_size=2,
                      warmup_tokens=3 * 128, stable_tokens=6 * 128, decay_tokens=3 * 128,
                      trainer=TrainerConfig(val_every=3, save_top_k=3, lr=2e-3, warmup_steps=2)))
""")


def _wsd(ar_base, out, corpus, background=False):
    cmd = [sys.executable, "-c", WSD_SCRIPT, str(ar_base), str(out), str(corpus)]
    if background:  # its own process group, which the caller kills whole, as a scheduler ending a job does
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group and check nothing of it is left: Megatron's async checkpoint save forks
    a writer, and a kill of the trainer alone mid-save leaves that writer hung forever on a lock the trainer held."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while (left := [pid for pid, stat in group_stats(proc.pid).items() if stat[0] != "Z"]) \
            and time.time() < deadline:
        time.sleep(0.1)
    assert not left, f"processes {left} of the killed run's group are still alive"


def _metrics(out):
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.slow
def test_wsd_block_sizes_and_losses_survive_sigkills_at_random_points(ar_base, tmp_path):
    """Three SIGKILLs at seeded random moments (mid-step, mid-append, mid-save: wherever they land), then a torso of a
    checkpoint and a half-written metrics line planted as a kill mid-write would leave them: the resumed run's block
    sizes follow the schedule and its losses equal an uninterrupted run's."""
    corpus, killed = _corpus(tmp_path), tmp_path / "killed"
    _wsd(ar_base, tmp_path / "straight", corpus)
    rng, kills = random.Random(7), []
    # One kill in each third of the 21 steps, so the last one still lands before the run ends however fast the
    # machine is (a target relative to the recorded steps could overshoot: a resume re-runs steps past its checkpoint).
    for low, high in ((1, 6), (7, 12), (13, 18)):
        proc = _wsd(ar_base, killed, corpus, background=True)
        done_before = len(_metrics(killed)) if (killed / "metrics.jsonl").exists() else 0
        target, deadline = min(max(rng.randint(low, high), done_before + 1), 20), time.time() + 300
        while not (killed / "metrics.jsonl").exists() or len(_metrics(killed)) < target:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))  # somewhere inside the next step, or its checkpoint
        _kill_group(proc)
        kills.append(len(_metrics(killed)))
    assert min(kills) < 21, kills  # really interrupted
    # a checkpoint killed mid-write, newer than any: NeMo marks it unfinished until every rank has written
    torso = killed / "checkpoints" / "val_loss=0.0001-step=99-consumed_samples=200.0-last"
    (torso / "weights").mkdir(parents=True, exist_ok=True)
    (torso / "weights" / "__0_0.distcp").write_bytes(b"half a tensor")
    torso.with_name(torso.name + "-unfinished").touch()
    before = _metrics(killed)
    (killed / "metrics.jsonl").write_text("".join(json.dumps({**r, "tagged": True}) + "\n" for r in before)
                                          + '{"step": 98, "lo')  # and a line cut short by a kill mid-append
    _wsd(ar_base, killed, corpus)  # same command: resumes from its last complete checkpoint
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(killed)
    kept = sum(r.get("tagged", False) for r in resumed)  # the records of the steps before the resumed checkpoint
    assert kept >= 3 and [r.get("tagged", False) for r in resumed] == [True] * kept + [False] * (21 - kept)
    schedule = WSDConfig(init_from="", out_dir="", data="", seq_len=64, warmup_tokens=384, stable_tokens=768,
                         decay_tokens=384).schedule()
    assert [r["step"] for r in resumed] == list(range(21))
    assert [r["block_size"] for r in resumed] == [schedule.phase_at(s, 128).block_size for s in range(21)]
    assert [r["block_size"] for r in resumed] == [1] * 3 + [4] * 3 + [32] * 3 + [64] * 3 + [64] * 6 + [32] * 3
    # fp32 on CPU: equal to 1e-5 relative (bitwise in five runs by hand; once, inside the whole suite, every run of
    # the killed folder differed from the straight run by 1e-6 relative from its second step on, before any resume)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    assert all(f"consumed_samples={2 * m['step']}.0" in p.parent.name
               for p in (killed / "checkpoints").glob("*/meta.json") for m in [json.loads(p.read_text())])
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["stage"] == "wsd_cpt" and (killed / "hf" / "model.safetensors").exists()
    print(f"\nWSD killed after {kills} recorded steps, resumed to 21: losses equal the uninterrupted run's")
    # the checkpoints kept are the best 3 by validation loss (plus NeMo's copy of the last), whatever their age
    validated = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "straight" / "validation.jsonl")}
    assert sorted(validated) == [2, 5, 8, 11, 14, 17, 20]
    checkpoints = [json.loads(p.read_text()) for p in (tmp_path / "straight" / "checkpoints").glob("*/meta.json")
                   if not p.parent.name.endswith("-last")]
    assert sorted(m["val_loss"] for m in checkpoints) == pytest.approx(sorted(validated.values())[:3])


def _hf_copy(src: Path, dst: Path, scale: float) -> Path:
    """A copy of an HF directory with every weight multiplied by `scale` (so an average says which were merged)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    save_file({k: v * scale for k, v in weights.items()}, dst / "model.safetensors")
    return dst


def test_merge_averages_the_best_checkpoints_by_validation_loss_not_the_newest(ar_base, tmp_path):
    """Checkpoints at steps 10, 20, 30 with validation losses 1.0, 3.0, 2.0 (and NeMo's copy of the last): the top-2
    merge averages steps 10 and 30, the newest being the worse of the two."""
    from safetensors.torch import load_file

    root = tmp_path / "run" / "checkpoints"
    for step, val_loss, scale, suffix in ((10, 1.0, 1.0, ""), (20, 3.0, 100.0, ""), (30, 2.0, 3.0, ""),
                                          (30, 2.0, 3.0, "-last")):
        folder = root / f"val_loss={val_loss:.4f}-step={step}-consumed_samples={step * 4}.0{suffix}"
        _hf_copy(ar_base, folder / "hf", scale)
        (folder / "meta.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
    out = merge(MergeConfig(run_dir=str(tmp_path / "run"), out_dir=str(tmp_path / "merged"), top_k=2))
    base = load_file(ar_base / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    for name, weight in base.items():
        assert torch.allclose(merged[name], weight * 2.0, atol=1e-6), name  # (1 + 3) / 2, not (3 + 100) / 2
    assert [Path(p).parent.name.split("-step=")[1].split("-")[0] for p in
            json.loads((out / "merge.json").read_text())["merged"]] == ["10", "30"]


@pytest.mark.parametrize("world, trainer, batch_size, message", [
    (3, dict(tensor_parallel=2), 8, "tensor_parallel x pipeline_parallel x context_parallel = 2 x 1 x 1 does not "
                                    "divide the 3 processes"),
    (8, dict(tensor_parallel=2, pipeline_parallel=2, context_parallel=4), 8, "2 x 2 x 4 does not divide the 8"),
    (4, dict(tensor_parallel=2), 7, "batch_size 7 is not divisible by the 2 data-parallel ranks"),
    (2, dict(micro_batch_size=3), 8, "trainer.micro_batch_size 3 does not divide the per-rank batch 4"),
    (3, dict(context_parallel=3), 8, "trainer.context_parallel 3 does not divide seq_len"),
])
def test_a_layout_that_does_not_fit_the_processes_or_the_batch_is_named(monkeypatch, ar_base, tmp_path, world,
                                                                         trainer, batch_size, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = WSDConfig(init_from=str(ar_base), out_dir=str(tmp_path / "out"), data="unread.jsonl", seq_len=64,
                    batch_size=batch_size, trainer=TrainerConfig(**trainer))
    with pytest.raises(ValueError, match=message):
        wsd_cpt(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trainer, message", [
    (dict(attention="sparse"), "trainer.attention must be 'dense' or 'flex', got 'sparse'"),
    (dict(attention="flex", context_parallel=2), "trainer.attention 'flex' does not run with trainer.context_parallel"),
])
def test_an_attention_the_layout_cannot_run_is_named(trainer, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**trainer)


def test_sequence_length_not_divisible_fails_before_training(ar_base, tmp_path):
    cfg = WSDConfig(init_from=str(ar_base), out_dir=str(tmp_path / "out"), data="unread.jsonl", seq_len=100)
    with pytest.raises(ValueError, match="sequence length 100 is not divisible by block size"):
        wsd_cpt(cfg)
    assert not (tmp_path / "out").exists()


def test_an_ar_base_without_a_mask_token_is_named_with_the_fix(ar_base, tmp_path):
    """A real tokenizer has no mask token (SmolLM2's): the stage says so, and how to add one, before training."""
    base = tmp_path / "no-mask"
    shutil.copytree(ar_base, base)
    (base / "tokenizer.json").write_text((ar_base / "tokenizer.json").read_text().replace("<|mask|>", "<|spare|>"))
    cfg = WSDConfig(init_from=str(base), out_dir=str(tmp_path / "out"), data="unread.jsonl")
    with pytest.raises(ValueError, match=r"has no mask token '<\|mask\|>'; add one with `python -m "
                                         r"blockdiff.models.mask_token"):
        wsd_cpt(cfg)
    assert not (tmp_path / "out").exists()


def test_bad_data_lines_are_named(ar_base, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=f"{bad}:2: expected"):
        sft_examples(str(bad), str(ar_base))
    bad.write_text('{"prompt": "x", "chosen": "y", "rejected": "z"}\nnot json\n')
    with pytest.raises(DataError, match=f"{bad}:2: not valid JSON"):
        read_jsonl(bad, {"prompt": str, "chosen": str, "rejected": str})
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=f"{bad}:1: the last message must be the assistant's"):
        sft_examples(str(bad), str(ar_base))


def test_sft_on_an_ar_checkpoint_is_refused(ar_base, tmp_path):
    with pytest.raises(ValueError, match="no `block_diffusion` section"):
        sft(SFTConfig(init_from=str(ar_base), out_dir=str(tmp_path / "o"), data="unread.jsonl"))


def test_cli_lists_the_stages_and_names_a_bad_key():
    out = subprocess.run([str(NEMO), "dllm", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and all(s in out.stdout for s in ("wsd_cpt", "sft", "cap", "dpo", "merge"))
    bad = subprocess.run([str(NEMO), "dllm", "merge", "--factory", "tiny", "config.bogus=1", "--direct", "--yes"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "No parameter named 'bogus'" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_cli_runs_a_yaml_recipe(ar_base, tmp_path):
    """`nemo dllm wsd_cpt --yaml recipes/wsd_cpt_tiny.yaml` with a few overrides, end to end."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([str(NEMO), "dllm", "wsd_cpt", "--yaml", str(root / "recipes" / "wsd_cpt_tiny.yaml"),
                          f"config.init_from={ar_base}", f"config.out_dir={tmp_path / 'w'}",
                          f"config.data={_corpus(tmp_path)}", "config.seq_len=64", "config.batch_size=2",
                          "config.warmup_tokens=128", "config.stable_tokens=128", "config.decay_tokens=128",
                          "--direct", "--yes"], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["stage"] == "wsd_cpt"


@pytest.mark.slow
def test_nemo_llm_pretrain_and_finetune_list_and_run_the_recipes(ar_base, tmp_path):
    """NeMo's own verbs list this plugin's factories and run them: `nemo llm pretrain --factory dllm_wsd_tiny`, then
    `nemo llm finetune --factory dllm_sft_tiny` from its output. Overrides go to the recipe the five parts share
    (run in an empty folder: a part that ignored `model.recipe.data` would not find the demo's default data)."""
    for verb, names in (("pretrain", ["dllm_wsd_tiny"]), ("finetune", ["dllm_sft_tiny", "dllm_cap_tiny"])):
        listing = subprocess.run([str(NEMO), "llm", verb, "--help"], capture_output=True, text=True, timeout=300)
        assert listing.returncode == 0 and all(n in listing.stdout for n in names), listing.stdout[-2000:]
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"def add_{i}(x):", "response": f"    return x + {i}"}) + "\n"
                                for i in range(40)))
    small = ["model.recipe.seq_len=64", "model.recipe.batch_size=2", "--direct", "--yes"]
    runs = [["pretrain", "--factory", "dllm_wsd_tiny", f"model.recipe.init_from={ar_base}",
             f"model.recipe.out_dir={tmp_path / 'w'}", f"model.recipe.data={_corpus(tmp_path)}",
             "model.recipe.warmup_tokens=128", "model.recipe.stable_tokens=128", "model.recipe.decay_tokens=128"],
            ["finetune", "--factory", "dllm_sft_tiny", f"model.recipe.init_from={tmp_path / 'w' / 'hf'}",
             f"model.recipe.out_dir={tmp_path / 's'}", f"model.recipe.data={sft_data}",
             "model.recipe.trainer.max_steps=2", "model.recipe.trainer.val_every=2"]]
    for args, out, stage in zip(runs, ("w", "s"), ("wsd_cpt", "sft")):
        done = subprocess.run([str(NEMO), "llm", *args, *small], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert json.loads((tmp_path / out / "summary.json").read_text())["stage"] == stage
        assert (tmp_path / out / "hf" / "model.safetensors").exists()


def test_response_batch_pads_each_row_to_its_block_and_fences_off_batch_padding():
    from nemo_dllm.data import response_batch

    ids, response, doc_ids = response_batch([([5, 6], [7, 0]), ([5], [7, 8, 9, 10, 11, 0])], seq_len=16,
                                            block_size=4, eos_id=0)
    assert ids.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [5, 7, 8, 9, 10, 11, 0, 0]]
    assert response.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0] * 8]


@pytest.mark.parametrize("config", [WSDConfig, SFTConfig, DPOConfig, MergeConfig, TrainerConfig])
def test_every_recipe_field_can_be_set_from_the_command_line(config):
    """NeMo-Run parses `model.recipe.<field>=<value>` by the field's annotation and rejects some (tuples): every field
    of every recipe must take a value from the command line, lists of block sizes included."""
    from nemo_run.cli.cli_parser import parse_value

    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name == "trainer":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = "x" if default in (None, dataclasses.MISSING) and hints[f.name] in (str, str | None) else str(default)
        if isinstance(default, list) or (default is None and "list" in str(hints[f.name])):
            text = "[32, 4]"
        parse_value(text, hints[f.name])


def test_a_bad_mask_band_is_named_when_the_recipe_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"mask_band must be \[low, high\], got \[0.3\]"):
        SFTConfig(init_from="a", out_dir=str(tmp_path), data="d", mask_band=[0.3])
    with pytest.raises(ValueError, match="mask band needs 0 < t_min <= t_max <= 1, got t_min=0.9, t_max=0.2"):
        WSDConfig(init_from="a", out_dir=str(tmp_path), data="d", mask_band=[0.9, 0.2])


def test_without_the_document_mask_a_packed_row_is_one_sequence(ar_base, tmp_path):
    """The ablation switch `document_mask=False`: the same packed rows, but every training row one document, so its
    tokens attend across the boundaries and positions run on; validation rows keep their documents apart."""
    from nemo_dllm.stages import wsd_data

    corpus = tmp_path / "short.jsonl"  # documents of a few tokens: every 64-token row packs several
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(400)))
    batches = {}
    for on in (True, False):
        recipe = WSDConfig(init_from=str(ar_base), out_dir=str(tmp_path / str(on)), data=str(corpus), seq_len=64,
                           batch_size=4, document_mask=on)
        module = wsd_data(recipe)
        batches[on] = (module.collate([module.train[i] for i in range(4)])["diffusion"],
                       module.val_collate([module.val[i] for i in range(4)])["diffusion"])
    (train_on, val_on), (train_off, val_off) = batches[True], batches[False]
    assert torch.equal(train_on.targets, train_off.targets)  # the same rows
    assert (train_on.doc_ids.amax(dim=1) > 0).all()
    assert (train_off.doc_ids == 0).all()
    assert not torch.equal(train_on.attention_mask(), train_off.attention_mask())
    assert torch.equal(train_off.attention_mask(), train_on.attention_mask() | train_off.attention_mask())
    assert torch.equal(val_on.doc_ids, val_off.doc_ids) and (val_off.doc_ids.amax(dim=1) > 0).any()


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_each_yaml_recipe_is_its_factorys_recipe(path):
    """recipes/<stage>_tiny.yaml holds what `nemo dllm <stage> --factory tiny` runs, <stage>_moe_tiny.yaml what
    `--factory moe_tiny` runs: a change to a factory without its YAML (or back) fails here. Compared as YAML: nemo_run's
    YAML loader carries values over from one load to the next in a process (cap_tiny.yaml's lr reached the DPO config
    built from dpo_tiny.yaml after it); the command line loads one."""
    import yaml
    from nemo_run.core.serialization.yaml import YamlSerializer

    from nemo_dllm import cli

    stage = path.stem.removesuffix("_tiny")
    factory = getattr(cli, f"moe_tiny_{stage.removesuffix('_moe')}" if stage.endswith("_moe") else f"tiny_{stage}")
    assert yaml.safe_load(path.read_text())["config"] == yaml.safe_load(YamlSerializer().serialize(factory().config))
    assert f"--yaml recipes/{path.name}" in path.read_text()  # the header's command runs this file
