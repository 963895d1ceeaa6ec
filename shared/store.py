"""A case's row as a frozen dataclass, and every guarded change to it.

Its neighbours keep the other rows: ``shared.seats`` the GPU seats, ``shared.claims`` which
case goes next and to which seat, ``shared.liveness`` heartbeats and host reach.

Every status change is a compare-and-set (``... WHERE case_id=? AND status=?``)
inside ``BEGIN IMMEDIATE`` that also appends an event; ``rowcount == 1`` says
who won. A forbidden move raises ``ForbiddenTransition`` before touching the
database.
"""
from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass
from typing import Any

from shared.db import transaction
from shared.states import CaseStatus, check_case_move


@dataclass(frozen=True)
class Case:
    case_id: int
    case_name: str
    case_path: str
    source_path: str
    spool_stage: str
    status: CaseStatus
    progress: float
    slot: str | None       # column pueue_group: the pueue group, Slurm partition entry or direct slot
    task_id: int | None    # column pueue_task_id: the task's (or job's) id on its host
    remote_dir: str | None
    submitted_at: float
    status_updated_at: float
    started_at: float | None
    completed_at: float | None
    attempts: int
    next_attempt_at: float | None
    claimed_by: str | None
    lease_until: float | None
    outcome: str | None
    exit_code: int | None
    error_type: str | None
    error_message: str | None
    log_tail: str | None
    needs_review: bool
    review_reason: str | None
    staged_at: float | None
    running_since: float | None = None
    add_uncertain_until: float | None = None
    stop_requested_at: float | None = None
    # issue 12: priority, results delivery and retention (see shared.priority, .delivery, .retention)
    priority: str = "normal"
    delivered_at: float | None = None
    delivered_to: str | None = None
    delivery_attempts: int = 0
    next_delivery_at: float | None = None
    delivery_error: str | None = None
    result_checksums: str | None = None
    acknowledged_at: float | None = None
    remote_removed_at: float | None = None
    local_removed_at: float | None = None
    host: str | None = None  # issue 11: the host its remote folder and task are on

    @property
    def label(self) -> str:
        """The pueue label that ties a remote task to this case for ever."""
        return case_label(self.case_id)

    @property
    def folder_name(self) -> str:
        """The case's folder name inside the spool: ``<case_id>_<case_name>``."""
        return spool_folder_name(self.case_id, self.case_name)


# The seed's column names stay in the database; code names them for what they are on any backend.
FIELD_COLUMNS = {"slot": "pueue_group", "task_id": "pueue_task_id"}
COLUMN_FIELDS = {column: field for field, column in FIELD_COLUMNS.items()}
CASE_FIELDS = frozenset(f.name for f in dataclasses.fields(Case))

# The per-attempt columns a move resets, in one place, from narrowest to widest; each mover
# adds what it sets itself. A submitter's claim on the case (recovery's adopt clears only this):
CLAIM_CLEARS: dict[str, Any] = {"claimed_by": None, "lease_until": None, "add_uncertain_until": None}
# The submit is over and a task runs (the submitter's record_running):
SUBMIT_CLEARS: dict[str, Any] = {**CLAIM_CLEARS, "staged_at": None, "stop_requested_at": None}
# The attempt on its host is over, the case goes back to the queue or fails (lifecycle.retry_or_fail):
ATTEMPT_CLEARS: dict[str, Any] = {**SUBMIT_CLEARS, "remote_dir": None, "host": None, "running_since": None}
# An operator's retry starts the case afresh: no trace of any earlier run (actions.retry):
RETRY_CLEARS: dict[str, Any] = {
    **ATTEMPT_CLEARS, "attempts": 0, "next_attempt_at": None, "outcome": None, "exit_code": None,
    "error_type": None, "error_message": None, "log_tail": None, "completed_at": None, "started_at": None,
    "progress": 0.0, "task_id": None, "slot": None, "acknowledged_at": None,
    "remote_removed_at": None,
}


NAME_MAX_BYTES = 240


def spool_folder_name(case_id: int, case_name: str) -> str:
    """``<case_id>_<case_name>``, the name cut (on a character boundary) to fit a file system."""
    name = f"{case_id}_{case_name}"
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= NAME_MAX_BYTES:
        return name
    return encoded[:NAME_MAX_BYTES].decode("utf-8", "ignore")


def case_label(case_id: int) -> str:
    return f"mqic_case_{case_id}"


def case_from_row(row: sqlite3.Row) -> Case:
    """Build a Case; an unknown status raises UnknownStatus."""
    data = {COLUMN_FIELDS.get(column, column): value for column, value in dict(row).items()}
    data["status"] = CaseStatus.parse(data["status"])
    data["needs_review"] = bool(data["needs_review"])
    return Case(**data)


def get_case(conn: sqlite3.Connection, case_id: int) -> Case | None:
    row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
    return None if row is None else case_from_row(row)


def cases_with_status(conn: sqlite3.Connection, status: CaseStatus, limit: int = 1000) -> list[Case]:
    rows = conn.execute("SELECT * FROM cases WHERE status = ? ORDER BY case_id LIMIT ?",
                        (status.value, limit))
    return [case_from_row(r) for r in rows]


def column_of(field: str) -> str:
    """The ``cases`` column that holds ``field`` of ``Case`` (ValueError for anything else)."""
    if field not in CASE_FIELDS:
        raise ValueError(f"not a field of a case: {field!r}")
    return FIELD_COLUMNS.get(field, field)


def _assignments(fields: dict[str, Any]) -> str:
    return "".join(f", {column_of(name)} = :f_{name}" for name in fields)


def _guard_sql(guard: dict[str, Any]) -> str:
    """`` AND col IS :g_col`` for each guarded column (the columns are checked to be ours)."""
    return "".join(f" AND {column_of(name)} IS :g_{name}" for name in guard)


def _guard_params(guard: dict[str, Any]) -> dict[str, Any]:
    return {f"g_{k}": v for k, v in guard.items()}


def record_case_event(conn: sqlite3.Connection, case_id: int, frm: CaseStatus | None,
                      to: CaseStatus, *, now: float, worker: str, detail: str = "") -> None:
    conn.execute(
        "INSERT INTO case_events (case_id, from_status, to_status, at, worker, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (case_id, None if frm is None else frm.value, to.value, now, worker, detail))


def transition(conn: sqlite3.Connection, case_id: int, frm: CaseStatus, to: CaseStatus, *,
               now: float, worker: str, detail: str = "", fields: dict[str, Any] | None = None,
               guard: dict[str, Any] | None = None) -> bool:
    """Move case ``case_id`` from ``frm`` to ``to`` if it is still in ``frm``.

    ``fields`` are extra columns to set; ``guard`` extra columns that must still
    hold (e.g. ``claimed_by``). Returns True when this call won the race, False
    when the row had already moved. Raises ForbiddenTransition for a move that
    ALLOWED does not list.
    """
    check_case_move(frm, to)
    fields = dict(fields or {})
    guard = dict(guard or {})
    where = _guard_sql(guard)
    params = {"id": case_id, "frm": frm.value, "to": to.value, "now": now,
              **{f"f_{k}": v for k, v in fields.items()}, **_guard_params(guard)}
    with transaction(conn):
        cursor = conn.execute(
            f"UPDATE cases SET status = :to, status_updated_at = :now{_assignments(fields)}"
            f" WHERE case_id = :id AND status = :frm{where}", params)
        if cursor.rowcount != 1:
            return False
        record_case_event(conn, case_id, frm, to, now=now, worker=worker, detail=detail)
        return True


def update_case(conn: sqlite3.Connection, case_id: int, status: CaseStatus,
                fields: dict[str, Any], *, guard: dict[str, Any] | None = None) -> bool:
    """Set ``fields`` on a case that is still in ``status`` (no status change, no event)."""
    guard = dict(guard or {})
    where = _guard_sql(guard)
    params = {"id": case_id, "status": status.value, **{f"f_{k}": v for k, v in fields.items()},
              **_guard_params(guard)}
    with transaction(conn):
        cursor = conn.execute(
            f"UPDATE cases SET case_id = case_id{_assignments(fields)}"
            f" WHERE case_id = :id AND status = :status{where}", params)
        return cursor.rowcount == 1


def register_case(conn: sqlite3.Connection, *, case_name: str, source_path: str, now: float,
                  worker: str, priority: str = "normal", why: str = "") -> Case:
    """Insert a new ``submitted`` case whose folder is still at ``source_path``.

    The row starts in spool stage ``incoming``; the caller then moves the folder
    into the spool (see ``shared.spool``), and a crash in between is repaired by
    the spool reconcile step. ``priority`` (``normal``/``urgent``, with ``why``
    for the event) is set in the same insert, so no claim ever sees it unset.
    Returns the new row.
    """
    with transaction(conn):
        cursor = conn.execute(
            "INSERT INTO cases (case_name, case_path, source_path, spool_stage, status,"
            " submitted_at, status_updated_at, priority)"
            f" VALUES (?, ?, ?, 'incoming', {CaseStatus.SUBMITTED.sql}, ?, ?, ?)",
            (case_name, source_path, source_path, now, now, priority))
        case_id = cursor.lastrowid
        record_case_event(conn, case_id, None, CaseStatus.SUBMITTED, now=now, worker=worker,
                          detail=f"registered from {source_path}" + (f"; {priority}: {why}" if why else ""))
    return get_case(conn, case_id)


def case_still(conn: sqlite3.Connection, case: Case, guard: dict[str, Any]) -> bool:
    """True while the row of ``case`` still has its status and the ``guard`` column values."""
    where = _guard_sql(guard)
    row = conn.execute(f"SELECT 1 FROM cases WHERE case_id = :id AND status = :status{where}",
                       {"id": case.case_id, "status": case.status.value,
                        **_guard_params(guard)}).fetchone()
    return row is not None


def case_events(conn: sqlite3.Connection, case_id: int) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM case_events WHERE case_id = ? ORDER BY event_id",
                        (case_id,)).fetchall()


def flag_for_review(conn: sqlite3.Connection, case: Case, reason: str, *, now: float,
                    worker: str) -> bool:
    """Set the operator-review flag on a case (once); records an event with the reason."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET needs_review = 1, review_reason = ? WHERE case_id = ? AND status = ?"
            " AND needs_review = 0", (reason, case.case_id, case.status.value))
        if cursor.rowcount != 1:
            return False
        record_case_event(conn, case.case_id, case.status, case.status, now=now, worker=worker,
                          detail=f"flagged for review: {reason}")
        return True


def clear_review(conn: sqlite3.Connection, case_id: int, *, now: float, worker: str) -> bool:
    with transaction(conn):
        row = conn.execute("UPDATE cases SET needs_review = 0, review_reason = NULL"
                           " WHERE case_id = ? AND needs_review = 1 RETURNING status",
                           (case_id,)).fetchone()
        if row is None:
            return False
        status = CaseStatus.parse(row["status"])
        record_case_event(conn, case_id, status, status, now=now, worker=worker,
                          detail="review flag acknowledged")
        return True


