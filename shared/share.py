"""The results share (``results.deliver_to``): reached only through a time-limited child, and its state.

Every filesystem operation on the share runs in ``shared.share_child``, a process of
its own. The worker waits for it only while it shows signs of life: silent for
``results.share_timeout_seconds``, it is killed (SIGKILL) and abandoned, never waited
for (a process stuck in a hung NFS/SMB/FUSE call cannot die until the server
answers); it is reaped later without blocking.

A share that does not answer, or is not mounted, is one recorded state, the
setting ``results.share_state`` (JSON: kind, since, error, checked_at): shown by
``mqic status``/``health``, ``mqic-top`` and the exporter (which read it and never
touch the share), retried after ``results.retry_seconds``, reported once per
episode through the notice outbox. Absent means the share answered last time.
"""
from __future__ import annotations

import json
import os
import select
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shared.db import transaction
from shared.errors import MqicError

STATE_KEY = "results.share_state"
NOT_ANSWERING = "not answering"
NOT_MOUNTED = "not mounted"
POLL_SECONDS = 0.2
_ABANDONED: list[subprocess.Popen] = []  # killed children not reaped yet (each may sit in a hung syscall)
CHILD = [sys.executable, "-m", "shared.share_child"]
ROOT = Path(__file__).resolve().parents[1]


class ShareProblem(MqicError):
    """The share cannot be used now; ``kind`` says how (NOT_ANSWERING or NOT_MOUNTED)."""

    kind = NOT_ANSWERING


class ShareNotAnswering(ShareProblem):
    kind = NOT_ANSWERING


class ShareNotMounted(ShareProblem):
    kind = NOT_MOUNTED


class ShareInterrupted(MqicError):
    """The worker is stopping: the child was abandoned, nothing is known about the share."""


class ShareWriteError(MqicError):
    """The share answered but refused this step (a file in the way, a copy that differs)."""


@dataclass(frozen=True)
class ShareState:
    kind: str
    since: float
    error: str
    checked_at: float


def abandon(process: subprocess.Popen) -> None:
    """Kill a child that stopped answering and forget it without waiting."""
    try:
        process.kill()
    except ProcessLookupError:
        pass
    for stream in (process.stdin, process.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    _ABANDONED.append(process)


def reap_abandoned() -> int:
    """Reap the abandoned children that could die meanwhile; return how many are still stuck."""
    _ABANDONED[:] = [p for p in _ABANDONED if p.poll() is None]
    return len(_ABANDONED)


def run_on_share(op: str, request: dict[str, Any], *, timeout: float, stop: threading.Event | None = None,
                 on_alive: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one operation of ``shared.share_child``; its answer, or ShareProblem / ShareWriteError / OSError.

    The child is abandoned when it is silent for ``timeout`` seconds or ``stop`` is set.
    ``on_alive`` is called about every POLL_SECONDS while the child runs (e.g. to renew a lease).
    """
    reap_abandoned()
    process = subprocess.Popen(CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               cwd=ROOT, close_fds=True)
    process.stdin.write(json.dumps({"op": op, **request}).encode("utf-8"))
    process.stdin.close()
    output = read_while_alive(process, timeout, stop, on_alive)
    if output is None:
        abandon(process)
        if stop is not None and stop.is_set():
            raise ShareInterrupted(f"{op} on the share abandoned: the worker is stopping")
        raise ShareNotAnswering(f"share {request.get('deliver_to')} not answering: no sign of life from {op} "
                                f"for {timeout:g} s (child {process.pid} abandoned)")
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        abandon(process)
    return parse_answer(output, op)


def read_while_alive(process: subprocess.Popen, timeout: float, stop: threading.Event | None,
                     on_alive: Callable[[], None] | None) -> bytes | None:
    """Everything the child wrote until it closed stdout; None when it went silent for ``timeout``."""
    fd = process.stdout.fileno()
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            return None
        ready, _, _ = select.select([fd], [], [], min(left, POLL_SECONDS))
        if on_alive is not None:
            on_alive()
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            process.stdout.close()
            return b"".join(chunks)
        chunks.append(chunk)
        deadline = time.monotonic() + timeout


def parse_answer(output: bytes, op: str) -> dict[str, Any]:
    lines = [line for line in output.decode("utf-8", "replace").splitlines() if line and line != "."]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise ShareNotAnswering(f"share operation {op} ended without an answer") from None
    if "ok" in answer:
        return answer["ok"]
    error, message = answer.get("error"), answer.get("message", "")
    if error == "ShareNotMounted":
        raise ShareNotMounted(message)
    raise ShareWriteError(f"{error}: {message}" if error == "OSError" else message)


# -- the recorded state ---------------------------------------------------------------------------

def share_state(conn: sqlite3.Connection) -> ShareState | None:
    """The share's recorded problem, or None when it answered last time (or was never tried)."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (STATE_KEY,)).fetchone()
    if row is None:
        return None
    data = json.loads(row[0])
    return ShareState(kind=data["kind"], since=data["since"], error=data["error"], checked_at=data["checked_at"])


def note_share(conn: sqlite3.Connection, problem: ShareProblem | None, *, now: float) -> str | None:
    """Record what the newest share operation showed; ``"down"`` or ``"back"`` when an episode
    begins or ends (the caller sends its one notice), else None. Joins the caller's transaction."""
    with transaction(conn):
        before = share_state(conn)
        if problem is None:
            if before is None:
                return None
            conn.execute("DELETE FROM settings WHERE key = ?", (STATE_KEY,))
            return "back"
        since = before.since if before is not None else now
        value = json.dumps({"kind": problem.kind, "since": since, "error": str(problem)[:500], "checked_at": now})
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE"
                     " SET value = excluded.value, updated_at = excluded.updated_at", (STATE_KEY, value, now))
        return "down" if before is None else None


def share_request(config) -> dict[str, Any]:
    """What every child operation needs to know about the share."""
    results = config.results
    return {"deliver_to": str(results.deliver_to), "expect_mount": results.expect_mount,
            "marker": results.share_marker}


def probe_share(config, *, stop: threading.Event | None = None) -> dict[str, Any]:
    """Is the share there, mounted and answering? Removes temporary copies left by dead processes."""
    return run_on_share("probe", share_request(config), timeout=config.results.share_timeout_seconds, stop=stop)
