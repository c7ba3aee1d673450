"""Fault injection for the server tests: a server started with `server_checks.FAULT_ENV` (this folder on PYTHONPATH)
loads it in every Python process it runs (API server, engine, scheduler). A request whose threshold is
BLOCKDIFF_FAULT_THRESHOLD then makes the core's commit rule raise inside the engine, as a bug would; every other
request decodes as usual."""

import os

import blockdiff.decoding

FAULT_THRESHOLD = float(os.environ["BLOCKDIFF_FAULT_THRESHOLD"])
_select_commits = blockdiff.decoding.select_commits


def _failing_select_commits(confidence, threshold, fallback_k):
    if threshold == FAULT_THRESHOLD:
        raise RuntimeError("fault injected by tests/fault_injection")
    return _select_commits(confidence, threshold, fallback_k)


blockdiff.decoding.select_commits = _failing_select_commits
