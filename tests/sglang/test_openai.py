"""SGLang's OpenAI-compatible endpoints with this plugin (`--dllm-algorithm BlockDiff`), through the OpenAI client
library as users call them: the same tokens as the core reference, usage, the accounting in the response's
`metadata`, the checkpoint's chat template, and streaming one committed block per chunk. One server for the module."""

import openai
import pytest
from transformers import AutoTokenizer

from blockdiff.text import CHAT_TEMPLATE, apply_chat_template
from drivers.servers import free_port, running_server
from drivers.sglang_cpu import CPU_ENV, launch_command
from tiny_models import make_tiny_blockdiff_model, reference_decode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    model = make_tiny_blockdiff_model(path, "dense")
    port = free_port()
    cmd = launch_command(path, port, "--context-length", "512", "--dllm-algorithm", "BlockDiff",
                         "--max-running-requests", "4", "--served-model-name", "tiny")
    with running_server(cmd, port, path / "server.log", CPU_ENV) as url:
        yield {"client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), "model": model,
               "tokenizer": AutoTokenizer.from_pretrained(path)}


def reference(server, prompt: list[int], max_tokens: int, threshold: float = 0.95):
    return reference_decode(server["model"], prompt, max_tokens, threshold)


def complete(server, prompt, max_tokens: int, threshold: float = 0.95, **kwargs):
    return server["client"].completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"custom_params": {"threshold": threshold}, "return_token_ids": True}, **kwargs)


def test_completion_matches_the_reference_with_usage_and_accounting(server):
    prompt = [5, 17, 42, 99, 3, 8] * 7  # 42 tokens: one full block and a tail
    out = complete(server, prompt, 45, threshold=0.5)
    want = reference(server, prompt, 45, 0.5)
    choice = out.choices[0]
    assert choice.token_ids == want.tokens and choice.finish_reason == want.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(want.tokens))
    accounting = out.metadata["block_diffusion"]
    assert accounting["denoise_forwards"] == want.denoise_forwards
    assert accounting["tpf"] == pytest.approx(len(want.tokens) / want.denoise_forwards)


def test_text_prompt_and_chat_match_the_reference(server):
    tok = server["tokenizer"]
    text = "def f(x):\n    return"
    assert complete(server, text, 20).choices[0].token_ids == reference(server, tok.encode(text), 20).tokens
    messages = [{"role": "user", "content": "class A:"}]
    chat = server["client"].chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                    extra_body={"return_token_ids": True})
    want = reference(server, tok.encode(apply_chat_template(CHAT_TEMPLATE, messages, True)), 20)
    # token ids, not text: a random model's byte-level tokens need not form valid UTF-8
    assert chat.choices[0].response_token_ids == want.tokens and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens == len(want.tokens)
    assert chat.metadata["block_diffusion"]["denoise_forwards"] == want.denoise_forwards


def test_streaming_sends_one_committed_block_per_chunk(server):
    prompt = list(range(2, 12))  # 10 tokens: the first block holds 22 generated tokens
    want = reference(server, prompt, 70)
    chunks = [c.choices[0] for c in complete(server, prompt, 70, stream=True) if c.choices]
    assert [len(c.token_ids) for c in chunks] == [22, 32, 16]  # no empty chunk for the steps in between
    assert sum((c.token_ids for c in chunks), []) == want.tokens
    assert chunks[-1].finish_reason == "length"
