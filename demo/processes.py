"""Process-group helpers for training jobs (Linux /proc where it helps; plain signals elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (ended, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def group_alive(pgid: int) -> bool:
    """Some process of group `pgid` is running (zombies do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def is_guard_of(pid: int, stop_file: Path) -> bool:
    """`pid` is still the guard of this run (not a recycled pid of some other process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return process_alive(pid)   # no /proc: trust the pid
    return b"demo.job_guard" in cmdline and str(stop_file).encode() in cmdline


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def prefer_oom_kill(pid: int) -> None:
    """Ask the kernel to kill the trainer, not the server, when memory runs out (Linux; best effort)."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("500")
    except OSError:
        pass
