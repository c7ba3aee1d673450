"""The hard decoding cases, one generator for the conformance matrix and the stack suites (core venv).

Every request set starts from the probe request, whose EOS id is chosen from the model's own output so that it ends
inside a block (`choose_eos`). The matrix (`build`) runs every stack on the cases below; the stack suites
(tests/vllm, tests/sglang, tests/core/test_naive_oracle.py) draw theirs from `request_sets` and `load_requests`.

Models: the tiny dense dLLM that this project's `wsd_cpt` recipe produces from a tiny AR base (run in the nemo venv),
served at block sizes 4, 8 and 32, and LLaDA2MoeModelLM at the same three: a tiny random one at 4 and 8, a tiny one
taken through every recipe stage (wsd_cpt, merge, sft, cap, dpo) on Megatron's MoE layers at 32; each with an EOS id
chosen so that one prompt ends inside a block; and a real pretrained checkpoint, SmolLM2-135M-Instruct with a mask
token added, converted by the `wsd_cpt` recipe (its first step at tensor parallel 1 and 3, equal losses) and the
`sft` recipe on chat turns, served at block 32 with its own EOS ids (end of turn, end of text). Prompts: HumanEval
prompts and random token prompts on and off block boundaries, and for SmolLM2 chat messages (through the servers'
chat endpoints; rendered by its template in the core for the reference). Settings: thresholds 0.95/0.7/0.0,
max_tokens on and off block boundaries, batches of 1, 4 and 8. Everything is written to `cases.json`; prompts travel
as token ids, so every stack sees the same input whatever its tokenizer does (chat messages travel as text too).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from blockdiff.decoding import DecodeParams, ReferenceDecoder
from blockdiff.models import (
    build_model,
    init_weights,
    load_model,
    read_config,
    save_model,
    tiny_dense_config,
    tiny_llada2_config,
)
from blockdiff.text import load_tokenizer, save_tokenizer, train_tokenizer
from blockdiff_demo.corpus import humaneval_prompts, stdlib_documents
from conformance.run import model_time

BLOCK_SIZES = (4, 8, 32)
THRESHOLDS = (0.95, 0.7, 0.0)
BATCH_SIZES = (1, 1, 4, 8)  # two single requests, then a batch of 4 and one of 8: 14 requests per model
MASK, EOS = 1, 0
PROBE = [5, 17, 42, 99, 3, 8]

WSD_SCRIPT = """
import sys
from nemo_dllm.stages import WSDConfig, wsd_cpt
from nemo_dllm.training import TrainerConfig
wsd_cpt(WSDConfig(init_from=sys.argv[1], out_dir=sys.argv[2], data=sys.argv[3], seq_len=64, batch_size=2,
                  warmup_tokens=3 * 128, stable_tokens=4 * 128, decay_tokens=3 * 128,
                  trainer=TrainerConfig(val_every=100, lr=2e-3, warmup_steps=2)))
"""


def recipe_dense_model(work: Path, nemo_python: str) -> Path:
    """A random tiny Qwen3 AR base, converted by the `wsd_cpt` recipe (10 steps) into an HF block-diffusion dir."""
    base, out, corpus = work / "ar-base", work / "wsd_cpt", work / "corpus.jsonl"
    docs = stdlib_documents(max_bytes=200_000)
    tok = train_tokenizer([d.text for d in docs], 400)
    save_tokenizer(tok, base, model_max_length=1024)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), num_hidden_layers=2, eos_token_id=EOS, pad_token_id=EOS)
    save_model(init_weights(build_model(cfg), 0), cfg, base)
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    shutil.rmtree(out, ignore_errors=True)
    _nemo(nemo_python, ["-c", WSD_SCRIPT, base, out, corpus], "the wsd_cpt recipe")
    return out / "hf"


# The real checkpoint through the recipes, at a size CI affords, in two launches. At tensor parallel 1: WSD over block
# sizes 1, 4, 64 and 32 (one step each), then 2 steps of SFT on chat turns (at most 80 tokens in SmolLM2's template):
# the served model. At tensor parallel 3 (SmolLM2's 9 query and 3 KV heads split 3 ways, not 2): WSD's first two
# steps, whose first loss must equal the first launch's. The imports sit under the main guard too: the checkpoint
# writer's helper process (spawned) re-runs this file's top level, and importing NeMo there costs 10 s a launch.
REAL_CONVERSION_SCRIPT = """
import sys
if __name__ == "__main__":
    from nemo_dllm.stages import SFTConfig, WSDConfig, sft, wsd_cpt
    from nemo_dllm.training import TrainerConfig
    base, root, corpus, tp, chat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    phases = dict(warmup_blocks=[1, 4], decay_blocks=[32], stable_tokens=192, decay_tokens=192) if chat else dict(
        warmup_blocks=[1], decay_blocks=[], stable_tokens=1)
    wsd = wsd_cpt(WSDConfig(init_from=base, out_dir=f"{root}/wsd-tp{tp}", data=corpus, seq_len=64, batch_size=3,
                            warmup_tokens=192, **phases,
                            trainer=TrainerConfig(val_every=100, save_top_k=1, lr=1e-4, warmup_steps=1,
                                                  micro_batch_size=1, tensor_parallel=tp)))
    if chat:
        sft(SFTConfig(init_from=str(wsd), out_dir=f"{root}/sft", data=chat[0], seq_len=96, batch_size=2,
                      trainer=TrainerConfig(max_steps=2, val_every=100, save_top_k=1, lr=1e-4, warmup_steps=1)))
"""
REAL_TP = 3
CHAT_QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea."]


def _nemo(nemo_python: str, args: list, what: str, processes: int = 1) -> None:
    from drivers.torchrun import launch_command

    done = subprocess.run([*launch_command(nemo_python, processes), *map(str, args)], capture_output=True,
                          text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def real_checkpoint_model(work: Path, nemo_python: str, corpus: Path) -> Path:
    """SmolLM2-135M-Instruct (the GGUF as an HF directory, with a mask token added) converted by the `wsd_cpt` recipe
    and fine-tuned by the `sft` recipe on the main job's tasks as chat turns. The conversion's first step also runs
    at tensor parallel 3: its loss must equal tensor parallel 1's (1e-5); the vocabulary of 49,153 is padded to
    split."""
    from blockdiff.models.gguf import gguf_to_hf, smollm2_gguf
    from blockdiff.models.mask_token import add_mask_token
    from blockdiff_demo.corpus import chat_rows, training_tasks

    root = work / "smollm2"
    shutil.rmtree(root, ignore_errors=True)
    ar = gguf_to_hf(smollm2_gguf(), root / "ar")
    base = root / "ar-mask"
    add_mask_token(ar, base)
    script, chat = root / "convert.py", root / "chat.jsonl"
    script.write_text(REAL_CONVERSION_SCRIPT)
    chat.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(training_tasks(64))))
    _nemo(nemo_python, [script, base, root, corpus, 1, chat], "wsd_cpt and sft of SmolLM2 at TP 1")
    _nemo(nemo_python, [script, base, root, corpus, REAL_TP], f"wsd_cpt's first steps on SmolLM2 at TP {REAL_TP}",
          REAL_TP)
    single, split = _losses(root / "wsd-tp1"), _losses(root / f"wsd-tp{REAL_TP}")
    if abs(single[0] - split[0]) > 1e-5:
        raise RuntimeError(f"SmolLM2's first wsd_cpt loss at tensor parallel {REAL_TP} {split[0]} != {single[0]} at 1")
    return root / "sft" / "hf"


def chat_cases(model: str, path: Path) -> list[dict]:
    """Chat prompts (questions and held-out tasks): a single request, then a batch of 3 at thresholds 0.95, 0.7 and
    0.0. Each request has its `messages`, which the servers take through their chat endpoints, and its `prompt`,
    the token ids of the checkpoint's own template rendered by the core, which the reference decodes: equal outputs
    also prove each server renders and tokenizes the chat as the core does."""
    from blockdiff.text import apply_chat_template, checkpoint_chat_template
    from blockdiff_demo.corpus import chat_question, held_out_tasks

    tok, template = load_tokenizer(path), checkpoint_chat_template(path)
    questions = CHAT_QUESTIONS + [chat_question(t) for t in held_out_tasks(2)]
    chats = [[{"role": "user", "content": q}] for q in questions]
    requests = [{"messages": m, "prompt": tok.encode(apply_chat_template(template, m, True)).ids, "threshold": t,
                 "max_tokens": n} for m, t, n in zip(chats, (0.95, 0.95, 0.7, 0.0), (40, 33, 32, 16))]
    return [{"id": f"{model}/batch0x1", "model": model, "batch": requests[:1]},
            {"id": f"{model}/batch1x3", "model": model, "batch": requests[1:]}]


# Every recipe stage on LLaDA2.0's MoE architecture, in one process: the recipes of the `moe_tiny` factories (what
# `nemo dllm <stage> --factory moe_tiny` runs) scaled down to wsd_cpt (8 steps), the top-2 merge, sft, cap and dpo
# (3 steps each) on code prompts.
MOE_PIPELINE_SCRIPT = """
import sys
import fiddle as fdl
from nemo_dllm import cli
base, root, corpus, responses, preferences = sys.argv[1:6]

def scaled(factory, trainer, **fields):
    recipe = factory.config
    for key, value in fields.items():
        setattr(recipe, key, value)
    for key, value in trainer.items():
        setattr(recipe.trainer, key, value)
    return fdl.build(recipe)

small = dict(seq_len=64, batch_size=2)
# a small learning rate after WSD: 3 steps at 2e-3 on short EOS-padded responses teach the model to answer EOS at
# once, and a served model whose every output is EOS would check little
short = dict(max_steps=3, val_every=2, save_top_k=2, lr=1e-4, warmup_steps=1)
cli.wsd_cpt(scaled(cli.moe_tiny_wsd_cpt(base, f"{root}/wsd_cpt"), dict(val_every=2, save_top_k=2, warmup_steps=1),
                   data=corpus, warmup_tokens=4 * 128, stable_tokens=2 * 128, decay_tokens=2 * 128, **small))
cli.merge(fdl.build(cli.moe_tiny_merge(f"{root}/wsd_cpt", f"{root}/merged").config))
cli.sft(scaled(cli.moe_tiny_sft(f"{root}/merged", f"{root}/sft"), short, data=responses, **small))
cli.cap(scaled(cli.moe_tiny_cap(f"{root}/sft/hf", f"{root}/cap"), short, data=responses, **small))
cli.dpo(scaled(cli.moe_tiny_dpo(f"{root}/cap/hf", f"{root}/dpo"), short, data=preferences, **small))
"""


def random_llada2_model(work: Path, tokenizer_dir: Path) -> Path:
    """Near-flat logits: what catches the mutation of `conformance.mutation` (see the README)."""
    path = work / "llada2"
    tok = load_tokenizer(tokenizer_dir)
    save_tokenizer(tok, path, model_max_length=1024)
    cfg = tiny_llada2_config(tok.get_vocab_size(), mask_token_id=MASK, eos_token_id=EOS)
    save_model(init_weights(build_model(cfg), 0, std=0.2), cfg, path)
    return path


def recipe_llada2_model(work: Path, nemo_python: str, tokenizer_dir: Path) -> Path:
    """A tiny random LLaDA2MoeModelLM (3 layers, the first dense; 8 experts, top-2, 4 groups) taken through every
    recipe stage on Megatron's MoE layers: the DPO stage's HF export."""
    root, base = work / "llada2-recipes", work / "llada2-base"
    shutil.rmtree(root, ignore_errors=True)
    tok = load_tokenizer(tokenizer_dir)
    save_tokenizer(tok, base, model_max_length=1024)
    cfg = tiny_llada2_config(tok.get_vocab_size(), mask_token_id=MASK, eos_token_id=EOS)
    save_model(init_weights(build_model(cfg), 0, std=0.2), cfg, base)
    responses, preferences = work / "code_responses.jsonl", work / "code_preferences.jsonl"
    responses.write_text("".join(json.dumps({"prompt": f"def add_{i}(x):", "response": f"    return x + {i}"}) + "\n"
                                 for i in range(64)))
    preferences.write_text("".join(json.dumps({"prompt": f"def add_{i}(x):", "chosen": f"    return x + {i}",
                                               "rejected": f"    return x - {i}"}) + "\n" for i in range(64)))
    _nemo(nemo_python, ["-c", MOE_PIPELINE_SCRIPT, base, root, work / "corpus.jsonl", responses, preferences],
          "the recipe stages on LLaDA2MoeModelLM")
    return root / "dpo" / "hf"


def probe_request(block_size: int) -> dict:
    """The first request of every served model; its EOS is chosen to end it inside a block."""
    return {"prompt": PROBE, "threshold": THRESHOLDS[0], "max_tokens": min(2 * block_size, 40)}


def choose_eos(model: torch.nn.Module, block_size: int) -> int:
    """A token the reference emits for the probe request early and not before: made an EOS, it ends that request
    inside a block (the dense recipe model emits EOS 0 rarely on its own)."""
    probe = probe_request(block_size)
    params = DecodeParams(probe["max_tokens"], block_size, probe["threshold"])
    out = ReferenceDecoder(model, MASK, (EOS,)).generate([PROBE], params)[0].tokens
    fresh = [i for i in range(len(out))
             if out[i] not in out[:i] and out[i] > MASK and (len(PROBE) + i + 1) % block_size]
    if fresh:  # the latest one: the longest output that still ends inside a block
        return out[fresh[-1]]
    raise RuntimeError(f"no token to make an EOS in {out}")


def served_variants(name: str, source: Path, work: Path, block_sizes: tuple[int, ...] = BLOCK_SIZES
                    ) -> dict[str, Path]:
    """One directory per block size: the same weights, `block_diffusion` set to that block size and the EOS ids."""
    model, cfg = load_model(source)
    variants = {}
    for b in block_sizes:
        path = work / f"{name}-b{b}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.pt", "checkpoints"))
        cfg = read_config(path)
        cfg["block_diffusion"] = {"mask_token_id": MASK, "eos_token_ids": [EOS, choose_eos(model, b)],
                                  "block_size": b, "threshold": 0.95, "fallback_k": 1}
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        variants[f"{name}-b{b}"] = path
    return variants


def prompts(tokenizer_dir: Path, vocab: int, block_size: int) -> list[list[int]]:
    tok = load_tokenizer(tokenizer_dir)
    rng = random.Random(block_size)
    humaneval = [tok.encode(p).ids[-48:] for p in humaneval_prompts()[:3]]
    lengths = [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 3]
    return [PROBE, *humaneval, *[[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]]


def cases_for(model: str, path: Path) -> list[dict]:
    """Batches of requests for one served model: every request has a prompt, a threshold and max_tokens."""
    b = read_config(path)["block_diffusion"]["block_size"]
    vocab = read_config(path)["vocab_size"]
    pool = prompts(path, vocab, b)
    max_tokens = (2 * b, b + 3, 3 * b - 1, b)  # on and off block boundaries
    requests = [{"prompt": pool[i % len(pool)], "threshold": THRESHOLDS[i % len(THRESHOLDS)],
                 "max_tokens": min(max_tokens[i % len(max_tokens)], 40)} for i in range(sum(BATCH_SIZES))]
    requests[0] = probe_request(b)  # the EOS-inside-a-block case
    cases, start = [], 0
    for n, size in enumerate(BATCH_SIZES):
        cases.append({"id": f"{model}/batch{n}x{size}", "model": model, "batch": requests[start:start + size]})
        start += size
    return cases


def build(work: Path, nemo_python: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    with model_time("dense"):
        dense = recipe_dense_model(work, nemo_python)
    # LLaDA2: the random model's near-flat logits at blocks 4 and 8 (the mutation check runs on llada2-b8), the model
    # the recipes trained on Megatron's MoE layers at block 32
    models = {**served_variants("dense", dense, work),
              **served_variants("llada2", random_llada2_model(work, dense), work, (4, 8))}
    with model_time("llada2-recipes"):
        recipes = recipe_llada2_model(work, nemo_python, dense)
    models.update(served_variants("llada2-recipes", recipes, work, (32,)))
    cases = [c for name, path in models.items() for c in cases_for(name, path)]
    with model_time("smollm2-chat"):
        real = real_checkpoint_model(work, nemo_python, work / "corpus.jsonl")
    models["smollm2-chat"] = real
    cases += chat_cases("smollm2-chat", real)
    out = work / "cases.json"
    out.write_text(json.dumps({"models": {k: str(v) for k, v in models.items()}, "cases": cases}, indent=1))
    return out


# The stack suites' request sets, at the block size the suites serve.
SUITE_BLOCK = 32
SUITE_LENGTHS = [1, 5, 31, 32, 33, 47, 64, 70]
SUITE_MAX_TOKENS = [7, 32, 45, 64]


def request_sets(vocab: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Single requests, and one batch of 8 to send concurrently: prompt lengths on and off block boundaries,
    thresholds 0.95 and lower, max_tokens cut inside and at the end of blocks, two sampled requests with seeds. A
    request: prompt, threshold, max_tokens and optionally temperature and seed."""
    rng = random.Random(seed)
    pool = [PROBE] + [[rng.randrange(2, vocab) for _ in range(n)] for n in SUITE_LENGTHS]
    singles = [probe_request(SUITE_BLOCK)] + [
        {"prompt": p, "threshold": t, "max_tokens": SUITE_MAX_TOKENS[(i + j) % len(SUITE_MAX_TOKENS)]}
        for i, p in enumerate(pool) for j, t in enumerate((0.95, 0.5))]
    concurrent = [probe_request(SUITE_BLOCK)] + [
        {"prompt": p, "threshold": (0.95, 0.7, 0.3)[i % 3], "max_tokens": SUITE_MAX_TOKENS[i % len(SUITE_MAX_TOKENS)]}
        for i, p in enumerate(pool[1:8])]
    concurrent[5].update(temperature=0.8, seed=3)
    concurrent[6].update(temperature=1.0, seed=4)
    return singles, concurrent


def load_requests(vocab: int, n: int = 64, seed: int = 0) -> list[dict]:
    """`n` requests for a load test: the probe, then prompt lengths 1-70 on and off block boundaries, thresholds
    0.95-0.0, max_tokens cut inside and at the end of blocks, every eighth sampled with a seed, every other one
    streamed."""
    rng = random.Random(seed)
    requests = [probe_request(SUITE_BLOCK) | {"stream": True}]
    for i in range(1, n):
        length = SUITE_LENGTHS[i % len(SUITE_LENGTHS)] if i % 2 else rng.randrange(1, 71)
        request = {"prompt": [rng.randrange(2, vocab) for _ in range(length)],
                   "threshold": (0.95, 0.7, 0.5, 0.0)[i % 4], "max_tokens": (7, 32, 45, 64, 16)[i % 5],
                   "stream": i % 2 == 0}
        if i % 8 == 3:
            request.update(temperature=0.8, seed=i)
        requests.append(request)
    return requests


def decode_params(request: dict, block_size: int) -> DecodeParams:
    """A case request (prompt, threshold, max_tokens, optional temperature and seed) as the reference decoder's
    parameters."""
    return DecodeParams(request["max_tokens"], block_size, request["threshold"],
                        temperature=request.get("temperature", 0.0), seed=request.get("seed") or 0)


def reference_results(model: torch.nn.Module, eos: tuple[int, ...], batch: list[dict],
                      block_size: int = SUITE_BLOCK) -> list[dict]:
    """The core's reference decoder on a batch of requests: what every stack must return."""
    params = [decode_params(r, block_size) for r in batch]
    results = ReferenceDecoder(model, MASK, eos).generate([r["prompt"] for r in batch], params)
    return [{"tokens": r.tokens, "finish_reason": r.finish_reason, "denoise_forwards": r.denoise_forwards}
            for r in results]


def covers_the_hard_cases(requests: list[dict], results: list[dict], block_size: int = SUITE_BLOCK) -> None:
    """The cases must actually include an EOS inside a block, a max_tokens cut inside a block, and prompts on and off
    block boundaries; otherwise equality proves less than it claims."""
    cases = list(zip(requests, results))
    assert any(g["finish_reason"] == "stop" and (len(r["prompt"]) + len(g["tokens"])) % block_size for r, g in cases)
    assert any(g["finish_reason"] == "length" and len(g["tokens"]) % block_size for r, g in cases)
    assert {len(r["prompt"]) % block_size == 0 for r, _ in cases} == {True, False}


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), sys.argv[2]))
