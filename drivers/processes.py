"""Processes as Linux's /proc shows them."""

from pathlib import Path


def group_stats(group: int) -> dict[int, list[str]]:
    """/proc/PID/stat fields after the command name (state, ppid, pgrp, ...) of every process in process group
    `group`, zombies included (state "Z": dead, waiting for its parent to reap it)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == group:
            stats[int(stat.parent.name)] = fields
    return stats
