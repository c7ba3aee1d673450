import pytest


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron's parallel state for one CPU process (tensor parallel 1, gloo)."""
    from nemo_dllm import parallel

    return parallel.init(tp_size=1, seed=0)
