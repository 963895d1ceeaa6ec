"""Doorbells between worker processes: a hint to look at the database now, never state.

A worker that makes work for another (a slot freed, a case registered) writes one
byte into the named pipe ``spool/.bells/<name>``; the process listening there wakes
at once instead of waiting out its interval. A lost ring (nobody listening, a full
pipe) costs at most one interval, because every pass reads the database anyway.
"""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

BELLS = ".bells"


def bell_path(spool_root: Path, name: str) -> Path:
    return spool_root / BELLS / name


def ring(spool_root: Path, name: str) -> None:
    """Wake the process listening for ``name`` (best effort, never blocks)."""
    try:
        fd = os.open(bell_path(spool_root, name), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # nobody listens (ENXIO) or no bell yet (ENOENT)
    try:
        os.write(fd, b"!")
    except OSError:
        pass  # the pipe is full: the listener is awake anyway
    finally:
        os.close(fd)


def listen(spool_root: Path, name: str, *wakes: threading.Event) -> threading.Thread:
    """Set every event in ``wakes`` whenever ``name`` rings; returns the listening thread."""
    path = bell_path(spool_root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not stat.S_ISFIFO(path.stat().st_mode):
        path.unlink()
    if not path.exists():
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass  # another process made it first
    fd = os.open(path, os.O_RDWR)  # read-write: opening never blocks and reads never see EOF

    def wait_for_rings() -> None:
        while os.read(fd, 512):
            for wake in wakes:
                wake.set()

    thread = threading.Thread(target=wait_for_rings, name=f"bell-{name}", daemon=True)
    thread.start()
    return thread
