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
from shared.errors import RemoteError, TransientRemoteError, Unreachable
from shared.seats import release_slot_of
from shared.spool import Spool, settle_folder
from shared.states import CaseStatus, Outcome, SlotStatus
from shared.store import ATTEMPT_CLEARS, Case, transition
from shared.tasks import counts_as_attempt


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
    """Worth another attempt: anything but a RemoteError that says "never" (e.g. a refused path);
    a ``TransientRemoteError`` (a full disk, a slot the scheduler lost) passes. Types only."""
    if not isinstance(exc, RemoteError) or not counts_as_attempt(exc):
        return True
    return isinstance(exc, TransientRemoteError)


def retry_or_fail(conn: sqlite3.Connection, spool: Spool, case: Case, policy: MainLoopConfig,
                  error: Exception, *, now: float, worker: str, operation: str,
                  guard: dict[str, Any] | None = None,
                  outcome: Outcome = Outcome.SUBMIT_ERROR) -> CaseStatus | None:
    """After a failure that is not a task's verdict (an upload or submit error, an unreachable
    host): back to ``submitted`` with backoff, or ``failed`` once attempts run out.

    Only for failures where no remote task of this attempt can still run. The attempt
    is counted only when the failure is the case's own (``counts_as_attempt``): an
    outage never uses one up. The slot is freed either way. Returns the new status,
    or None when the case had moved.
    """
    counted = counts_as_attempt(error)
    return requeue_or_fail(conn, spool, case, policy, type(error).__name__, f"{operation}: {type(error).__name__}: {error}",
                           counted=counted, retry=not counted or is_transient(error), outcome=outcome,
                           at_once=isinstance(error, Unreachable), now=now, worker=worker, guard=guard)


def requeue_or_fail(conn: sqlite3.Connection, spool: Spool, case: Case, policy: MainLoopConfig,
                    error_type: str, message: str, *, counted: bool, retry: bool, outcome: Outcome,
                    now: float, worker: str, guard: dict[str, Any] | None = None, at_once: bool = False,
                    slot_to: SlotStatus = SlotStatus.AVAILABLE) -> CaseStatus | None:
    """Back to ``submitted`` (after backoff, or ``at_once``), or ``failed`` with ``outcome``.

    ``counted``: the failure uses up one of the case's attempts; ``retry``: it is worth
    another one. The case runs again unless the attempt is counted and either not worth
    retrying or the last one. The seat becomes ``slot_to`` either way. A task's verdict
    (``shared.verdicts``) gives every argument; ``retry_or_fail`` derives them from an error.
    """
    message = message[:2000]
    attempts = case.attempts + counted
    error_fields = {**ATTEMPT_CLEARS, "error_type": error_type, "error_message": message, "attempts": attempts}
    if not counted or (retry and attempts < policy.max_attempts):
        # An unreachable host gets no claims until it answers, so the case may go to another host at once.
        delay = 0.0 if at_once else backoff_seconds(policy, max(1, attempts))
        fields = {**error_fields, "next_attempt_at": now + delay}
        why = f"attempt {attempts} of {policy.max_attempts} used" if counted else "no attempt used"
        moved = move_case(conn, spool, case, CaseStatus.SUBMITTED, now=now, worker=worker,
                          detail=f"retry ({why}) after {message}", fields=fields, guard=guard, slot_to=slot_to)
        return CaseStatus.SUBMITTED if moved else None
    fields = {**error_fields, "outcome": outcome.value, "completed_at": now}
    moved = move_case(conn, spool, case, CaseStatus.FAILED, now=now, worker=worker,
                      detail=f"gave up after attempt {attempts}: {message}", fields=fields,
                      guard=guard, slot_to=slot_to)
    return CaseStatus.FAILED if moved else None
