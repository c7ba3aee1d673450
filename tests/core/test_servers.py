"""The server fixture's pause: a benchmark measuring one server stops the others (an idle SGLang scheduler polls)."""

import sys
import urllib.request

from drivers.processes import stat_fields
from drivers.servers import free_port, group_pids, paused, running_server


def state(pid: int) -> str:
    return stat_fields(pid)[0]


def test_a_paused_server_is_stopped_and_serves_again_after(tmp_path):
    (tmp_path / "health").write_text("ok")
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with running_server(cmd, port, tmp_path / "server.log") as url:
        [pid] = group_pids(url)
        with paused([url]):
            assert state(pid) == "T"
        assert state(pid) != "T"
        assert urllib.request.urlopen(url + "/health", timeout=10).read() == b"ok"
