"""Who is alive: the workers' heartbeats and whether each host answered its last call.
"""
from __future__ import annotations

import os
import socket
import sqlite3

from shared.db import transaction
from shared.processes import pid_alive


def beat(conn: sqlite3.Connection, name: str, *, now: float) -> None:
    """Write this worker's heartbeat (name, pid, host)."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO workers (name, pid, host, started_at, heartbeat) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET pid = excluded.pid, host = excluded.host,"
            " heartbeat = excluded.heartbeat,"
            " started_at = CASE WHEN workers.pid = excluded.pid THEN workers.started_at"
            "                   ELSE excluded.started_at END",
            (name, os.getpid(), socket.gethostname(), now, now))


def forget_retired_loops(conn: sqlite3.Connection, process: str, running: set[str]) -> list[str]:
    """Remove the heartbeat rows of ``process``'s loops (``<process>@<host>``, ``<process>-<part>...``)
    that it no longer runs (a host taken out of the config, a loop renamed by an upgrade), so
    that they are not reported stale for ever. A row written by another live process (a second
    submitter named ``submitter-2``) is not ours and stays. Returns the names removed."""
    with transaction(conn):
        rows = conn.execute("SELECT name, pid FROM workers"
                            " WHERE substr(name, 1, length(:p) + 1) IN (:p || '@', :p || '-')", {"p": process})
        retired = [name for name, pid in rows
                   if name not in running and (pid == os.getpid() or not pid_alive(pid))]
        conn.executemany("DELETE FROM workers WHERE name = ?", [(name,) for name in retired])
    return retired


def note_remote(conn: sqlite3.Connection, host: str, name: str, *, ok: bool, now: float,
                error: str | None = None, problem: str | None = None) -> None:
    """Record whether worker ``name``'s last call to ``host`` got through (Unreachable is not ok).

    ``host_reach`` keeps the newest word per host and since when it has been down; a
    host last seen unreachable gets no new claims (``SEAT_USABLE``) until a call gets through.
    ``problem`` (``HOST_KEY``: ssh refused its key) stays until a call gets through, whatever
    other failures are noted meanwhile; a new problem restarts ``down_since`` (it calls for its
    own notice).
    """
    with transaction(conn):
        conn.execute(
            "INSERT INTO host_reach (host, ok, checked_at, checked_by, error, down_since, problem)"
            " VALUES (:host, :ok, :now, :name, :error, CASE WHEN :ok THEN NULL ELSE :now END, :problem)"
            " ON CONFLICT(host) DO UPDATE SET ok = excluded.ok, checked_at = excluded.checked_at,"
            " checked_by = excluded.checked_by,"
            " error = CASE WHEN excluded.problem IS NULL AND host_reach.problem IS NOT NULL AND NOT excluded.ok"
            "   THEN host_reach.error ELSE excluded.error END,"
            " down_since = CASE WHEN excluded.ok THEN NULL"
            "   WHEN excluded.problem IS NOT NULL AND excluded.problem IS NOT host_reach.problem"
            "   THEN excluded.checked_at"
            "   ELSE COALESCE(host_reach.down_since, excluded.checked_at) END,"
            " problem = CASE WHEN excluded.ok THEN NULL ELSE COALESCE(excluded.problem, host_reach.problem) END",
            {"host": host, "ok": int(ok), "now": now, "name": name, "error": None if ok else (error or "")[:500],
             "problem": None if ok else problem})


HOST_KEY = "host_key"  # host_reach.problem: ssh refused the host's key (possible interception)


def down_hosts(conn: sqlite3.Connection) -> dict[str, float]:
    """Hosts last seen unreachable (or whose key was refused), with when that was last checked."""
    return {row["host"]: row["checked_at"] for row in conn.execute("SELECT host, checked_at FROM host_reach WHERE ok = 0")}


def host_key_refused(conn: sqlite3.Connection) -> set[str]:
    """Hosts whose key ssh refused: nothing but a handshake goes there until a call gets through."""
    return {row[0] for row in conn.execute("SELECT host FROM host_reach WHERE problem = ?", (HOST_KEY,))}
