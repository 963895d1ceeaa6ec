"""Finding and stopping the sandbox's own processes through /proc (Linux), for sshd and Slurm alike."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def read_proc(pid: int, name: str) -> bytes:
    """``/proc/<pid>/<name>``, or b"" when the process is gone or not ours to read."""
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def cmdline(pid: int) -> str:
    return read_proc(pid, "cmdline").decode(errors="replace").replace("\0", " ").strip()


def processes_with(token: str) -> list[int]:
    """The processes whose command line contains ``token`` (e.g. a test's unique folder)."""
    return [pid for pid in all_pids() if token.encode() in read_proc(pid, "cmdline")]


def environ(pid: int) -> list[str]:
    return read_proc(pid, "environ").decode(errors="replace").split("\0")


def exe_path(pid: int) -> str:
    """The resolved executable of ``pid`` ("" when it cannot be read)."""
    return readlink_or_empty(Path(f"/proc/{pid}/exe"))


def open_file_targets(pid: int) -> set[str]:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return set()
    return {readlink_or_empty(fd) for fd in fds}


def readlink_or_empty(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def parent_pid(pid: int) -> int | None:
    fields = read_proc(pid, "stat").decode(errors="replace").rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        parent = parent_pid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def is_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie waiting to be reaped (daemons linger as
    zombies in containers)."""
    stat = read_proc(pid, "stat").decode(errors="replace")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def signal_quietly(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def wait_for_exit(pid: int, timeout_s: float, poll_s: float, reap: Callable[[], None]) -> bool:
    """Wait until ``pid`` is gone (calling ``reap`` each round so our own child can be reaped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reap()
        if not is_alive(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
