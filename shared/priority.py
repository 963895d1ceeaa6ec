"""Case priority: ``urgent`` cases are claimed before ``normal`` ones.

A case is urgent from the moment it is dropped when its folder holds the
``scanner.urgent_marker`` file or its name matches ``scanner.urgent_name_pattern``;
an operator can change it later (``mqic priority ID urgent|normal``) while it
waits. The claim order itself (and the anti-starvation rule) is
``shared.claims.URGENT_FIRST``.
"""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from shared.config import ScannerConfig
from shared.db import transaction
from shared.errors import MqicError
from shared.states import CaseStatus
from shared.store import Case, get_case, record_case_event

NORMAL, URGENT = "normal", "urgent"
PRIORITIES = (NORMAL, URGENT)
# Statuses whose priority still matters: waiting, or failed (for a later retry).
CHANGEABLE = (CaseStatus.SUBMITTED, CaseStatus.FAILED)


class PriorityRefused(MqicError):
    """The case cannot change priority (unknown, or it already has a GPU or is done)."""


def priority_at_drop(scanner: ScannerConfig, folder: Path) -> tuple[str, str]:
    """(priority, why) of a folder about to be registered."""
    if scanner.urgent_marker and (folder / scanner.urgent_marker).is_file():
        return URGENT, f"marker file {scanner.urgent_marker}"
    if scanner.urgent_name_pattern and re.search(scanner.urgent_name_pattern, folder.name):
        return URGENT, f"name matches {scanner.urgent_name_pattern!r}"
    return NORMAL, ""


def set_priority(conn: sqlite3.Connection, case_id: int, priority: str, *, now: float, worker: str) -> Case:
    """Give a waiting (or failed) case ``priority``; records an event. Raises PriorityRefused."""
    if priority not in PRIORITIES:
        raise PriorityRefused(f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
    case = get_case(conn, case_id)
    if case is None:
        raise PriorityRefused(f"case {case_id} not found")
    if case.status not in CHANGEABLE:
        raise PriorityRefused(f"case {case_id} is {case.status.value}: only a waiting (submitted) or failed"
                              f" case can change priority")
    if case.priority == priority:
        return case
    with transaction(conn):
        cursor = conn.execute("UPDATE cases SET priority = ? WHERE case_id = ? AND status = ? AND priority = ?",
                              (priority, case_id, case.status.value, case.priority))
        if cursor.rowcount != 1:
            raise PriorityRefused(f"case {case_id} changed meanwhile; look again with `mqic show {case_id}`")
        record_case_event(conn, case_id, case.status, case.status, now=now, worker=worker,
                          detail=f"priority {priority} (was {case.priority})")
    return get_case(conn, case_id)
