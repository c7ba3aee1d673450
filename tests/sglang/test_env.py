"""The sglang venv as tools/envs.py builds it: SGLang's own server runs on this CPU (torch native backend, the test-only
sgl_kernel shim, the torchvision fix) and serves a tiny model made by the core with the same greedy tokens."""

import json
import urllib.request
from importlib.metadata import entry_points

import pytest
import torch

from drivers.servers import free_port, running_server
from drivers.sglang_cpu import CPU_ENV, launch_command
from tiny_models import greedy_ar, make_tiny_ar_model


def test_torch_is_the_pinned_cpu_build_and_torchvision_imports():
    import torchvision  # noqa: F401  (fails with "operator torchvision::nms does not exist" without the fix)

    assert torch.__version__.startswith("2.13.0")


def test_sgl_kernel_is_the_raising_shim():
    import sgl_kernel

    assert "cpu_shims" in sgl_kernel.__file__
    with pytest.raises(sgl_kernel.KernelNotAvailable, match="sgl_kernel.silu_and_mul was called"):
        sgl_kernel.silu_and_mul(torch.zeros(2))


def test_plugin_entry_point_is_declared():
    eps = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
    assert eps.get("blockdiff") == "sglang_blockdiff:register"


@pytest.fixture(scope="module")
def tiny_ar_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ar")
    model = make_tiny_ar_model(path)
    port = free_port()
    cmd = launch_command(path, port, "--context-length", "256")
    with running_server(cmd, port, path / "server.log", CPU_ENV) as url:
        yield url, model


@pytest.mark.slow
def test_sglang_server_greedy_decoding_matches_the_core_model(tiny_ar_server):
    url, model = tiny_ar_server
    prompt = [5, 17, 42, 99, 3, 8]
    expected = greedy_ar(model, prompt, 12)
    body = json.dumps({"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                                 "ignore_eos": True}}).encode()
    req = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert out["output_ids"] == expected
