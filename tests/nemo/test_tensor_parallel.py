"""Tensor parallel 2 on CPU (two gloo processes): every rank trains on the same noise, and the losses equal the
single-process run's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("tp_worker.py")


def _run(tp: int, nproc: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29400 + tp), str(WORKER), str(tp), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]


@pytest.mark.slow
def test_tp2_ranks_share_noise_and_match_single_process(tmp_path):
    single = _run(1, 1, tmp_path / "tp1")[0]
    ranks = _run(2, 2, tmp_path / "tp2")
    assert ranks[0]["noise"] == ranks[1]["noise"]  # the broadcast overrode each rank's own draw
    assert ranks[0]["noise"] != []
    for r in ranks:
        assert r["losses"] == pytest.approx(single["losses"], abs=1e-5)
    # rank 1's own draw would have differed: the single-process run used rank 0's seed, and matches
    assert single["noise"] == ranks[0]["noise"]
