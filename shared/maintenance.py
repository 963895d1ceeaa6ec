"""Drain and resume: stop new claims on an HPC host for maintenance, and start them again.

A drain is a row in ``drains`` (host name, since, who, why), so it survives restarts
and every process sees it. ``claim_next_case`` hands out no seat of a drained host
(running cases there finish, waiting ones go to other hosts or wait) and retention
leaves the host's folders alone. Each host is drained on its own.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from shared.config import Config
from shared.db import transaction
from shared.errors import MqicError


class UnknownHost(MqicError):
    """A drain or resume named a host that is not configured."""


@dataclass(frozen=True)
class Drain:
    host: str
    since: float
    drained_by: str
    reason: str


def check_host(config: Config, host: str | None) -> str:
    """The host a command means (by its configured name): the only host when None and there is
    one; UnknownHost for a name that is not configured, or None with several hosts."""
    names = [h.name for h in config.hosts]
    if host is None and len(names) == 1:
        return names[0]
    if host in names:
        return host
    raise UnknownHost(f"host {host!r} is not configured (hosts: {', '.join(names)})" if host is not None else
                      f"name the host: there are several ({', '.join(names)})")


def drain(conn: sqlite3.Connection, host: str, *, now: float, by: str, reason: str = "") -> bool:
    """Stop new claims on ``host``; False when it was already drained (the first drain is kept)."""
    with transaction(conn):
        cursor = conn.execute("INSERT OR IGNORE INTO drains (host, since, drained_by, reason) VALUES (?, ?, ?, ?)",
                              (host, now, by, reason))
        return cursor.rowcount == 1


def resume(conn: sqlite3.Connection, host: str) -> Drain | None:
    """Allow claims on ``host`` again; returns the drain that ended (None: it was not drained)."""
    with transaction(conn):
        row = conn.execute("DELETE FROM drains WHERE host = ? RETURNING *", (host,)).fetchone()
    return None if row is None else Drain(**dict(row))


def drains(conn: sqlite3.Connection) -> list[Drain]:
    """Every drained host, oldest drain first."""
    return [Drain(**dict(r)) for r in conn.execute("SELECT * FROM drains ORDER BY since, host")]


def is_drained(conn: sqlite3.Connection, host: str) -> bool:
    return conn.execute("SELECT EXISTS(SELECT 1 FROM drains WHERE host = ?)", (host,)).fetchone()[0] == 1
