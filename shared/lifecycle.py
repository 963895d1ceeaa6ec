"""Case moves that must keep the row, its GPU slot and its spool folder together.

``move_case`` is the one way a worker changes a case's status: the status
compare-and-set and the slot change commit in one transaction, then the folder
moves, all under the spool lock. A crash between the commit and the move is
repaired by ``shared.spool.reconcile``.
"""
from __future__ import annotations

import sqlite3
from typing import Any

from shared.config import MainLoopConfig
from shared.db import transaction
from shared.errors import RemoteError, Unreachable
from shared.spool import Spool, settle_folder
from shared.states import CaseStatus, Outcome, SlotStatus
from shared.store import Case, release_slot_of, transition

TRANSIENT_REMOTE_TEXT = (
    "No space left on device", "Disk quota exceeded", "Resource temporarily unavailable",
    "while connecting to daemon", "Connection refused (os error 111)", "Too many open files",
    "doesn't exists. Use one of these",  # a pueue group vanished; the submitter recreates it
)


def move_case(conn: sqlite3.Connection, spool: Spool, case: Case, to: CaseStatus, *, now: float,
              worker: str, detail: str = "", fields: dict[str, Any] | None = None,
              guard: dict[str, Any] | None = None, slot_to: SlotStatus | None = None) -> bool:
    """Move ``case`` from its current status to ``to`` (and its slot to ``slot_to``).

    Returns False, changing nothing, when another worker moved the case first.
    """
    with spool.lock():
        with transaction(conn):
            if not transition(conn, case.case_id, case.status, to, now=now, worker=worker,
                              detail=detail, fields=fields, guard=guard):
                return False
            if slot_to is not None:
                release_slot_of(conn, case, slot_to, now=now, worker=worker, detail=detail)
        settle_folder(conn, spool, case.case_id, now=now, worker=worker)
    return True


def backoff_seconds(policy: MainLoopConfig, attempts: int) -> float:
    """Exponential backoff: base * 2^(attempts-1), capped."""
    return min(policy.backoff_cap_seconds, policy.backoff_base_seconds * 2 ** max(0, attempts - 1))


def is_transient(exc: Exception) -> bool:
    """A RemoteError that says "try later" (full disk, pueued down) rather than "never"."""
    if not isinstance(exc, RemoteError):
        return True
    text = f"{exc.stderr}\n{exc.stdout}"
    return any(marker in text for marker in TRANSIENT_REMOTE_TEXT)


def is_outage(exc: Exception) -> bool:
    """The HPC could not be reached at all: never a reason to give up on a case.

    A dead claim (``ClaimExpired``, a subclass) still counts as an attempt, so a case
    that keeps killing its submitter does end.
    """
    return type(exc) is Unreachable


def retry_or_fail(conn: sqlite3.Connection, spool: Spool, case: Case, policy: MainLoopConfig,
                  error: Exception, *, now: float, worker: str, operation: str,
                  guard: dict[str, Any] | None = None,
                  outcome: Outcome = Outcome.SUBMIT_ERROR) -> CaseStatus | None:
    """After a failure: back to ``submitted`` with backoff, or ``failed`` once attempts run out.

    Only for failures where the remote task is known not to exist. The slot is
    freed either way. Returns the new status, or None when the case had moved.
    """
    message = f"{operation}: {type(error).__name__}: {error}"[:2000]
    error_fields = {"error_type": type(error).__name__, "error_message": message,
                    "claimed_by": None, "lease_until": None, "staged_at": None}
    if is_outage(error) or (is_transient(error) and case.attempts < policy.max_attempts):
        fields = {**error_fields, "next_attempt_at": now + backoff_seconds(policy, case.attempts)}
        moved = move_case(conn, spool, case, CaseStatus.SUBMITTED, now=now, worker=worker,
                          detail=f"retry after {message}", fields=fields, guard=guard,
                          slot_to=SlotStatus.AVAILABLE)
        return CaseStatus.SUBMITTED if moved else None
    fields = {**error_fields, "outcome": outcome.value, "completed_at": now}
    moved = move_case(conn, spool, case, CaseStatus.FAILED, now=now, worker=worker,
                      detail=f"gave up after attempt {case.attempts}: {message}", fields=fields,
                      guard=guard, slot_to=SlotStatus.AVAILABLE)
    return CaseStatus.FAILED if moved else None
