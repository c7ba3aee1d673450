"""This project's SGLang plugin over the conformance cases (sglang venv): one `sglang.launch_server
--dllm-algorithm BlockDiff` per served model, each batch sent as concurrent /generate requests (chat cases as
/v1/chat/completions requests).

    python -m conformance.runners.sglang_stack CASES.json OUT.json
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conformance.run import model_time
from drivers.servers import free_port, running_server
from drivers.sglang_cpu import CPU_ENV, chat, generate, launch_command


def main() -> None:
    cases_path, out_path = sys.argv[1:]
    spec = json.loads(Path(cases_path).read_text())
    records = {}
    for name, path in spec["models"].items():
        with model_time(name):
            port = free_port()
            cmd = launch_command(Path(path), port, "--context-length", "512", "--dllm-algorithm", "BlockDiff",
                                 "--max-running-requests", "8", "--served-model-name", "m")
            with running_server(cmd, port, Path(path) / "sglang-server.log", CPU_ENV) as url:
                for case in (c for c in spec["cases"] if c["model"] == name):
                    with ThreadPoolExecutor(len(case["batch"])) as pool:
                        results = pool.map(lambda r: chat(url, r) if "messages" in r else generate(url, r),
                                           case["batch"])
                        records[case["id"]] = [{k: v for k, v in g.items() if k != "meta"} for g in results]
    Path(out_path).write_text(json.dumps(records))


if __name__ == "__main__":
    main()
