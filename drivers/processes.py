"""Processes as Linux's /proc shows them."""

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, pgrp, ...), or None once the process is gone. A
    zombie (state "Z") is dead, waiting for its parent to reap it."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def group_stats(group: int) -> dict[int, list[str]]:
    """`stat_fields` of every process in process group `group`, zombies included."""
    stats = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(int(entry.name))
        if fields is not None and int(fields[2]) == group:
            stats[int(entry.name)] = fields
    return stats
