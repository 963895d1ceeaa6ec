"""Small named values kept in the database: cursors, "since" stamps and counters.

The ``settings`` table holds what a worker would otherwise keep in memory but a
restart or another process needs (the notifier's event cursor, when delivery was
first switched on, the outage the notifier already reported). Counters
(``count.<name>``) only grow and feed the exporter's ``*_total`` metrics.
"""
from __future__ import annotations

import sqlite3
from typing import Any

from shared.db import transaction

COUNT_PREFIX = "count."


def get_setting(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def put_setting(conn: sqlite3.Connection, key: str, value: Any, *, now: float) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)"
                     " ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                     (key, value, now))


def delete_setting(conn: sqlite3.Connection, key: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM settings WHERE key = ?", (key,))


def bump(conn: sqlite3.Connection, name: str, *, now: float, by: int = 1) -> None:
    """Add ``by`` to the counter ``name`` (joins the caller's transaction if one is open)."""
    with transaction(conn):
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)"
                     " ON CONFLICT(key) DO UPDATE SET value = value + excluded.value,"
                     " updated_at = excluded.updated_at", (COUNT_PREFIX + name, by, now))


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    """Every counter by name (without the ``count.`` prefix)."""
    rows = conn.execute("SELECT key, value FROM settings WHERE key >= ? AND key < ?",
                        (COUNT_PREFIX, COUNT_PREFIX[:-1] + chr(ord(".") + 1)))
    return {r[0][len(COUNT_PREFIX):]: int(r[1]) for r in rows}


def since(conn: sqlite3.Connection, key: str, enabled: bool, *, now: float) -> float | None:
    """When a feature was first seen switched on (stored under ``key``); None while it is off.

    Switching it off forgets the stamp, so switching it on again starts afresh.
    """
    stamp = get_setting(conn, key)
    if not enabled:
        if stamp is not None:
            delete_setting(conn, key)
        return None
    if stamp is None:
        with transaction(conn):
            conn.execute("INSERT OR IGNORE INTO settings (key, value, updated_at) VALUES (?, ?, ?)", (key, now, now))
        stamp = get_setting(conn, key)
    return float(stamp)
