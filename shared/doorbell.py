"""Doorbells between worker processes: a hint to look at the database now, never state.

A worker that makes work for another (a slot freed, a case registered) touches
``spool/.bells/<name>``; the other process watches that folder with inotify
(watchdog) and wakes at once instead of waiting out its interval. A lost ring
costs at most one interval, because every pass reads the database anyway.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

BELLS = ".bells"


def bell_path(spool_root: Path, name: str) -> Path:
    return spool_root / BELLS / name


def ring(spool_root: Path, name: str) -> None:
    """Wake the process listening for ``name`` (best effort)."""
    path = bell_path(spool_root, name)
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a"):
            os.utime(path)
    except OSError:
        pass  # a doorbell is only a hint


def listen(spool_root: Path, name: str, wake: threading.Event) -> object:
    """Set ``wake`` whenever ``name`` rings; returns the running observer."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    target = str(bell_path(spool_root, name))

    class Bell(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            if event.src_path == target or getattr(event, "dest_path", None) == target:
                wake.set()

    bell_path(spool_root, name).parent.mkdir(parents=True, exist_ok=True)
    observer = Observer()
    observer.schedule(Bell(), str(spool_root / BELLS), recursive=False)
    observer.daemon = True
    observer.start()
    return observer
