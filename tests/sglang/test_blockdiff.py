"""SGLang's server with this plugin (`--dllm-algorithm BlockDiff`) against the core's reference decoder, token for
token, for the dense tiny model and a tiny random LLaDA2MoeModelLM; SGLang's own LowConfidence on its own LLaDA2 model
against the same reference where the semantics coincide; radix-cache reuse; and 400s for bad requests."""

import contextlib
import random
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from blockdiff.masks import block_causal_mask
from blockdiff.models import read_config, save_model
from conformance.cases import MASK, SUITE_BLOCK, covers_the_hard_cases, reference_results, request_sets
from drivers.servers import free_port, running_server
from drivers.sglang_cpu import CPU_ENV, generate, launch_command, post
from sglang_blockdiff.algorithm import RECORD_ENV
from tiny_models import make_served_model, make_tiny_blockdiff_model


def same(got: list[dict], want: list[dict]) -> bool:
    return [{k: g[k] for k in want[0]} for g in got] == want


@pytest.fixture(scope="module", params=["dense", "llada2"])
def served(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model, eos = make_served_model(path, request.param)
    port, records = free_port(), path / "records"
    records.mkdir()
    cmd = launch_command(path, port, "--context-length", "512", "--dllm-algorithm", "BlockDiff",
                         "--max-running-requests", "8")
    with running_server(cmd, port, path / "server.log", {**CPU_ENV, RECORD_ENV: str(records)}) as url:
        yield {"url": url, "model": model, "eos": eos, "vocab": read_config(path)["vocab_size"], "arch": request.param,
               "records": records}


def test_single_requests_match_the_reference(served):
    singles, _ = request_sets(served["vocab"], seed=len(served["arch"]))
    singles = singles[1::2]  # every prompt once, at threshold 0.5 (0.95 and 0.7 come in the concurrent batch): CPU time
    got = [generate(served["url"], r) for r in singles]
    want = reference_results(served["model"], served["eos"], singles)
    assert same(got, want)
    covers_the_hard_cases(singles, got)
    # every finished block's KV is written by the next block's first forward, and the last block needs none
    assert [commit_forwards(r, g, w) for r, g, w in zip(singles, got, want)] == [0] * len(singles)
    assert sum(finished_blocks(r, w) > 1 for r, w in zip(singles, want)) >= 4  # there were commits to fuse


@pytest.fixture(scope="module")
def unfused(tmp_path_factory):
    """The plugin's paths before the fused commit and the denoising loop: one forward per scheduler step."""
    path = tmp_path_factory.mktemp("unfused")
    model, eos = make_served_model(path, "dense")
    with serving(path, model, eos, "BlockDiff", "fuse_commit: false\ndenoise_loop: false\n", max_running=8) as server:
        yield server


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory):
    """SGLang's synchronous block scheduling (`--no-dllm-fdfo`: a batch's blocks are denoised to their end inside one
    scheduler step, the finished rows forwarded along until the last one finishes), the commit forwards fused."""
    path = tmp_path_factory.mktemp("synchronous")
    model, eos = make_served_model(path, "dense")
    with serving(path, model, eos, "BlockDiff", "fuse_commit: true\n", max_running=8,
                 flags=("--no-dllm-fdfo",)) as server:
        yield server


@contextlib.contextmanager
def serving(path: Path, model, eos: tuple[int, ...], algorithm: str, config: str, max_running: int,
            flags: tuple[str, ...] = ()):
    """SGLang on the model saved at `path`, with `--dllm-algorithm algorithm`, `config` as its YAML config and
    `flags`."""
    (path / "algorithm.yaml").write_text(config)
    port = free_port()
    cmd = launch_command(path, port, "--context-length", "512", "--dllm-algorithm", algorithm,
                         "--dllm-algorithm-config", str(path / "algorithm.yaml"),
                         "--max-running-requests", str(max_running), *flags)
    with running_server(cmd, port, path / "server.log", CPU_ENV) as url:
        yield {"url": url, "model": model, "eos": eos, "vocab": read_config(path)["vocab_size"]}


def single_requests(server: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """Every fourth single request on the dense model, served one at a time: the requests, the served results and the
    reference's, asserted equal; at least two of them span a finished block."""
    singles = request_sets(server["vocab"], seed=len("dense"))[0][1::4]
    got = [generate(server["url"], r) for r in singles]
    want = reference_results(server["model"], server["eos"], singles)
    assert same(got, want)
    assert sum(finished_blocks(r, w) > 1 for r, w in zip(singles, want)) >= 2
    return singles, got, want


def test_fuse_commit_false_writes_each_finished_blocks_kv_in_a_forward_of_its_own(unfused):
    singles, got, want = single_requests(unfused)
    # alone in its batch, a request's last block ends without a forward of its own, as in the reference decoder
    assert [commit_forwards(r, g, w) for r, g, w in zip(singles, got, want)] == \
        [finished_blocks(r, w) - 1 for r, w in zip(singles, want)]


def test_synchronous_block_scheduling_gives_the_reference_outputs_with_the_commits_fused(synchronous):
    singles, got, want = single_requests(synchronous)
    assert [commit_forwards(r, g, w) for r, g, w in zip(singles, got, want)] == [0] * len(singles)
    _, batch = request_sets(synchronous["vocab"], seed=len("dense"))
    with ThreadPoolExecutor(len(batch)) as pool:  # a batch's blocks end together; its finished rows go along
        got = list(pool.map(lambda r: generate(synchronous["url"], r), batch))
    assert [{k: g[k] for k in ("tokens", "finish_reason")} for g in got] == \
        [{k: w[k] for k in ("tokens", "finish_reason")} for w in reference_results(synchronous["model"],
                                                                                      synchronous["eos"], batch)]


def test_eight_concurrent_requests_match_the_reference(served):
    _, batch = request_sets(served["vocab"], seed=len(served["arch"]))
    with ThreadPoolExecutor(len(batch)) as pool:
        got = list(pool.map(lambda r: generate(served["url"], r), batch))
    want = reference_results(served["model"], served["eos"], batch)
    assert same(got, want)
    for r, g, w in zip(batch, got, want):  # the accounting against the reference's numbers, not its own
        accounting = g["meta"]["block_diffusion"][0]
        assert accounting["denoise_forwards"] == w["denoise_forwards"]
        assert accounting["tpf"] == pytest.approx(len(w["tokens"]) / w["denoise_forwards"])
        assert commit_forwards(r, g, w) == 0  # each finished block's KV written by its successor's first forward


def test_every_denoising_steps_logits_match_the_core_model(served):
    """Each recorded step: the logits SGLang computed for the block (its earlier blocks read from the KV pool) against
    the core model over the whole sequence under an explicit block-causal mask, fp32, 1e-4. The tiny models'
    vocabulary (283) is not a multiple of the 64 rows SGLang pads its LM head to: the proposer gets exactly the
    vocabulary's logits, never the padding's (issue #19 item 5). Among them the forwards a scheduler step runs after
    its first (`denoise_loop`)."""
    singles, _ = request_sets(served["vocab"], seed=1)
    for request in singles[::4]:  # steps of its own, whichever tests ran before
        generate(served["url"], request)
    records = [torch.load(p) for p in served["records"].glob("*.pt")]
    assert len(records) > 50
    worst, sample = 0.0, random.Random(0).sample(records, min(200, len(records)))
    assert sum(rec["forward_in_step"] > 0 for rec in sample) > 20  # forwards of the loop inside a scheduler step
    for rec in sample:
        ids = torch.tensor(rec["context"] + rec["block"])
        n = len(ids)
        with torch.no_grad():
            logits = served["model"](ids[None], torch.arange(n)[None], block_causal_mask(n, SUITE_BLOCK)[None])
            want = logits[0, -SUITE_BLOCK:].float()
        assert want.shape[-1] % 64 and rec["logits"].shape == want.shape
        worst = max(worst, float((rec["logits"] - want).abs().max()))
    assert worst < 1e-4, worst


def finished_blocks(request: dict, want: dict) -> int:
    """How many blocks the request's output spans (the first shared with the prompt's tail)."""
    prompt_len = len(request["prompt"])
    return (prompt_len + len(want["tokens"]) - 1) // SUITE_BLOCK - prompt_len // SUITE_BLOCK + 1


def commit_forwards(request: dict, got: dict, want: dict) -> int:
    """The forwards of a served request that were neither a prompt block's prefill (one per prompt block not found in
    the radix cache) nor a denoising step: those that wrote a finished block's final KV."""
    prompt_len, cached = len(request["prompt"]), got["meta"]["cached_tokens"]
    prefills = (prompt_len // SUITE_BLOCK * SUITE_BLOCK - cached) // SUITE_BLOCK
    return got["meta"]["block_diffusion"][0]["nfe"] - prefills - want["denoise_forwards"]


def test_radix_cache_reuses_whole_blocks(served):
    request = {"prompt": list(range(2, 72)), "threshold": 0.5, "max_tokens": 16}
    first, second = generate(served["url"], request), generate(served["url"], request)
    assert second["tokens"] == first["tokens"]
    assert second["meta"]["cached_tokens"] >= 64 and second["meta"]["cached_tokens"] % SUITE_BLOCK == 0


def test_a_prompt_that_continues_an_output_reads_no_stale_kv(served):
    """A request's last block ends without the forward that would write its final KV (its KV was written while it
    still held masks); a later prompt that continues that output must not be served from it through the radix
    cache, which keys on tokens."""
    first = {"prompt": list(range(2, 40)), "threshold": 0.3, "max_tokens": 58}  # no EOS: ends at 3 whole blocks
    output = generate(served["url"], first)["tokens"]
    assert len(first["prompt"]) + len(output) == 3 * SUITE_BLOCK
    second = {"prompt": first["prompt"] + output + [5, 6], "threshold": 0.3, "max_tokens": 8}
    got = generate(served["url"], second)
    assert same([got], reference_results(served["model"], served["eos"], [second]))
    assert got["meta"]["cached_tokens"] == 2 * SUITE_BLOCK  # the blocks with their final KV, not the third


@pytest.mark.parametrize("sampling,needle", [
    ({"top_p": 0.5}, "top_p=0.5 is not supported"),
    ({"custom_params": {"threshold": 2}}, "threshold must be a number in [0, 1]"),
    ({"custom_params": {"block_size": 8}}, "block_size 8 differs from the served block size 32"),
    ({"ignore_eos": True}, "ignore_eos=True is not supported"),
])
def test_bad_requests_get_a_400_naming_the_problem(served, sampling, needle):
    with pytest.raises(urllib.error.HTTPError) as err:
        post(served["url"], {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, **sampling}})
    assert err.value.code == 400 and needle in err.value.read().decode()
    assert generate(served["url"], {"prompt": [5, 6, 7], "threshold": 0.5, "max_tokens": 3})["tokens"]


def test_a_prompt_with_the_mask_token_gets_a_400(served):
    with pytest.raises(urllib.error.HTTPError) as err:
        post(served["url"], {"input_ids": [5, MASK, 7], "sampling_params": {"max_new_tokens": 4}})
    assert err.value.code == 400 and "mask token (id 1) at position 1" in err.value.read().decode()


@pytest.fixture(scope="module")
def low_confidence(tmp_path_factory):
    """SGLang's own LowConfidence algorithm on SGLang's own LLaDA2MoeModelLM, for a tiny LLaDA2 whose head never
    prefers the mask token (its lm_head row is zero, so its logit is 0 against others around +4): there the two
    semantics coincide, see sglang_blockdiff/README.md."""
    path = tmp_path_factory.mktemp("llada2-lowconf")
    model, eos = make_tiny_blockdiff_model(path, "llada2"), (0,)  # LowConfidence stops at the tokenizer's EOS only
    with torch.no_grad():
        model.lm_head.weight[MASK] = 0
    save_model(model, read_config(path), path)
    with serving(path, model, eos, "LowConfidence", "threshold: 0.95\n", max_running=4) as server:
        yield server


def test_sglang_low_confidence_on_its_llada2_agrees_with_the_core(low_confidence):
    singles, _ = request_sets(low_confidence["vocab"], seed=7)
    greedy = [r | {"threshold": 0.95} for r in singles[::3]]  # 6 requests: LowConfidence on CPU is slow
    got = [generate(low_confidence["url"], r) for r in greedy]
    want = reference_results(low_confidence["model"], low_confidence["eos"], greedy)
    assert [(g["tokens"], g["finish_reason"]) for g in got] == [(w["tokens"], w["finish_reason"]) for w in want]
