"""Rows of the state database as frozen dataclasses, and every guarded change to them.

Every status change is a compare-and-set (``... WHERE case_id=? AND status=?``)
inside ``BEGIN IMMEDIATE`` that also appends an event; ``rowcount == 1`` says
who won. A forbidden move raises ``ForbiddenTransition`` before touching the
database.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
from dataclasses import dataclass
from typing import Any, Iterable

from shared.db import transaction
from shared.states import CaseStatus, SlotStatus, check_case_move, check_slot_move


@dataclass(frozen=True)
class Case:
    case_id: int
    case_name: str
    case_path: str
    source_path: str
    spool_stage: str
    status: CaseStatus
    progress: float
    pueue_group: str | None
    pueue_task_id: int | None
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

    @property
    def label(self) -> str:
        """The pueue label that ties a remote task to this case for ever."""
        return case_label(self.case_id)

    @property
    def folder_name(self) -> str:
        """The case's folder name inside the spool: ``<case_id>_<case_name>``."""
        return spool_folder_name(self.case_id, self.case_name)


@dataclass(frozen=True)
class Slot:
    pueue_group: str
    status: SlotStatus
    assigned_case_id: int | None
    gpu: str | None
    updated_at: float


CASE_COLUMNS = frozenset(f.name for f in dataclasses.fields(Case))


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
    data = dict(row)
    data["status"] = CaseStatus.parse(data["status"])
    data["needs_review"] = bool(data["needs_review"])
    return Case(**data)


def slot_from_row(row: sqlite3.Row) -> Slot:
    data = dict(row)
    data["status"] = SlotStatus.parse(data["status"])
    return Slot(**data)


def get_case(conn: sqlite3.Connection, case_id: int) -> Case | None:
    row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
    return None if row is None else case_from_row(row)


def cases_with_status(conn: sqlite3.Connection, status: CaseStatus, limit: int = 1000) -> list[Case]:
    rows = conn.execute("SELECT * FROM cases WHERE status = ? ORDER BY case_id LIMIT ?",
                        (status.value, limit))
    return [case_from_row(r) for r in rows]


def get_slot(conn: sqlite3.Connection, group: str) -> Slot | None:
    row = conn.execute("SELECT * FROM gpu_resources WHERE pueue_group = ?", (group,)).fetchone()
    return None if row is None else slot_from_row(row)


def all_slots(conn: sqlite3.Connection) -> list[Slot]:
    return [slot_from_row(r) for r in conn.execute("SELECT * FROM gpu_resources ORDER BY pueue_group")]


def _assignments(fields: dict[str, Any]) -> str:
    unknown = set(fields) - CASE_COLUMNS
    if unknown:
        raise ValueError(f"not a cases column: {sorted(unknown)}")
    return "".join(f", {name} = :f_{name}" for name in fields)


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
    _assignments(guard)
    where = "".join(f" AND {name} IS :g_{name}" for name in guard)
    params = {"id": case_id, "frm": frm.value, "to": to.value, "now": now,
              **{f"f_{k}": v for k, v in fields.items()}, **{f"g_{k}": v for k, v in guard.items()}}
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
    _assignments(guard)
    where = "".join(f" AND {name} IS :g_{name}" for name in guard)
    params = {"id": case_id, "status": status.value, **{f"f_{k}": v for k, v in fields.items()},
              **{f"g_{k}": v for k, v in guard.items()}}
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
            " submitted_at, status_updated_at, priority) VALUES (?, ?, ?, 'incoming', 'submitted', ?, ?, ?)",
            (case_name, source_path, source_path, now, now, priority))
        case_id = cursor.lastrowid
        record_case_event(conn, case_id, None, CaseStatus.SUBMITTED, now=now, worker=worker,
                          detail=f"registered from {source_path}" + (f"; {priority}: {why}" if why else ""))
    return get_case(conn, case_id)


def record_slot_event(conn: sqlite3.Connection, group: str, frm: SlotStatus | None,
                      to: SlotStatus, *, case_id: int | None, now: float, worker: str,
                      detail: str = "") -> None:
    conn.execute(
        "INSERT INTO slot_events (pueue_group, from_status, to_status, case_id, at, worker, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (group, None if frm is None else frm.value, to.value, case_id, now, worker, detail))


def transition_slot(conn: sqlite3.Connection, group: str, frm: SlotStatus, to: SlotStatus, *,
                    now: float, worker: str, case_id: int | None, detail: str = "") -> bool:
    """Move slot ``group`` from ``frm`` to ``to``, guarded on status and assigned case.

    ``case_id`` must be the case the slot currently names (None for an
    available slot); the new assignment is that case when ``to`` is assigned,
    else kept for a zombie (so the reaper knows whose task it was) and cleared
    for available.
    """
    check_slot_move(frm, to)
    new_case = case_id if to is not SlotStatus.AVAILABLE else None
    with transaction(conn):
        if frm is SlotStatus.AVAILABLE:
            cursor = conn.execute(
                "UPDATE gpu_resources SET status = ?, assigned_case_id = ?, updated_at = ?"
                " WHERE pueue_group = ? AND status = ?", (to.value, new_case, now, group, frm.value))
        else:
            cursor = conn.execute(
                "UPDATE gpu_resources SET status = ?, assigned_case_id = ?, updated_at = ?"
                " WHERE pueue_group = ? AND status = ? AND assigned_case_id IS ?",
                (to.value, new_case, now, group, frm.value, case_id))
        if cursor.rowcount != 1:
            return False
        record_slot_event(conn, group, frm, to, case_id=case_id, now=now, worker=worker, detail=detail)
        return True


def release_slot_of(conn: sqlite3.Connection, case: Case, to: SlotStatus, *, now: float,
                    worker: str, detail: str = "") -> bool:
    """Free (or mark zombie) the slot held by ``case``, if it still holds one."""
    if case.pueue_group is None:
        return False
    return transition_slot(conn, case.pueue_group, SlotStatus.ASSIGNED, to, now=now,
                           worker=worker, case_id=case.case_id, detail=detail)


def sync_slots(conn: sqlite3.Connection, groups: Iterable[tuple[str, str | None]], *,
               now: float, worker: str) -> list[str]:
    """Make sure every configured ``(group, gpu)`` has a slot row; return the added groups."""
    added = []
    with transaction(conn):
        for group, gpu in groups:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO gpu_resources (pueue_group, status, gpu, updated_at)"
                " VALUES (?, 'available', ?, ?)", (group, gpu, now))
            conn.execute("UPDATE gpu_resources SET gpu = ? WHERE pueue_group = ?", (gpu, group))
            if cursor.rowcount == 1:
                record_slot_event(conn, group, None, SlotStatus.AVAILABLE, case_id=None, now=now,
                                  worker=worker, detail="slot created from config")
                added.append(group)
    return added


# Claim order: urgent first, oldest first within a priority. A normal case that has
# waited longer than ``max_wait_seconds`` counts as urgent (anti-starvation): older than
# every urgent case that arrives later, it is claimed before them.
URGENT_FIRST = ("CASE WHEN priority = 'urgent' OR submitted_at <= :aged THEN 0 ELSE 1 END,"
                " submitted_at, case_id")
# One HPC host today: any drained host stops every claim (with several, match the slot's host).
NOT_DRAINED = "NOT EXISTS (SELECT 1 FROM drains)"


def _aged(now: float, max_wait_seconds: float | None) -> float | None:
    return None if max_wait_seconds is None else now - max_wait_seconds


@dataclass(frozen=True)
class Claim:
    case: Case
    group: str
    gpu: str | None


def claim_next_case(conn: sqlite3.Connection, *, worker: str, now: float, lease_seconds: float,
                    groups: Iterable[str] | None = None,
                    max_wait_seconds: float | None = None) -> Claim | None:
    """Atomically take the next eligible ``submitted`` case and an available slot.

    Next means urgent first, oldest first within a priority, a normal case waiting
    longer than ``max_wait_seconds`` counting as urgent (``URGENT_FIRST``). In one
    ``BEGIN IMMEDIATE``: the case moves to ``submitting`` with a lease for
    ``worker`` and the slot to ``assigned``. Returns None (and changes nothing)
    when there is no eligible case, no free slot among ``groups``, or a host is
    drained (``shared.maintenance``).
    """
    allowed = list(groups) if groups is not None else None
    if not _any(conn, "SELECT 1 FROM cases WHERE status = 'submitted'") or \
            not _any(conn, "SELECT 1 FROM gpu_resources WHERE status = 'available'") or \
            _any(conn, "SELECT 1 FROM drains"):
        return None  # nothing to do: no write lock taken
    with transaction(conn):
        slot = _free_slot(conn, allowed)
        if slot is None:
            return None
        row = conn.execute(
            "UPDATE cases SET status = 'submitting', status_updated_at = :now, claimed_by = :w,"
            " lease_until = :lease, pueue_group = :g"
            " WHERE case_id = (SELECT case_id FROM cases WHERE status = 'submitted'"
            "   AND (next_attempt_at IS NULL OR next_attempt_at <= :now)"
            "   AND (claimed_by IS NULL OR lease_until < :now)"
            f"  AND {NOT_DRAINED} ORDER BY {URGENT_FIRST} LIMIT 1) AND status = 'submitted' RETURNING *",
            {"now": now, "w": worker, "lease": now + lease_seconds, "g": slot.pueue_group,
             "aged": _aged(now, max_wait_seconds)}).fetchone()
        if row is None:
            return None
        case = case_from_row(row)
        record_case_event(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=now,
                          worker=worker, detail=f"claimed with slot {slot.pueue_group} (attempt {case.attempts + 1})")
        if not transition_slot(conn, slot.pueue_group, SlotStatus.AVAILABLE, SlotStatus.ASSIGNED,
                               now=now, worker=worker, case_id=case.case_id):
            raise RuntimeError("slot changed inside an immediate transaction")
        return Claim(case=case, group=slot.pueue_group, gpu=slot.gpu)


def _any(conn: sqlite3.Connection, query: str) -> bool:
    return conn.execute(f"SELECT EXISTS({query})").fetchone()[0] == 1


def _free_slot(conn: sqlite3.Connection, groups: list[str] | None) -> Slot | None:
    rows = conn.execute("SELECT * FROM gpu_resources WHERE status = 'available'"
                        " ORDER BY updated_at, pueue_group").fetchall()
    for row in rows:
        if groups is None or row["pueue_group"] in groups:
            return slot_from_row(row)
    return None


def renew_lease(conn: sqlite3.Connection, case_id: int, *, worker: str, now: float,
                lease_seconds: float, status: CaseStatus = CaseStatus.SUBMITTING) -> bool:
    """Extend the lease of a case (``submitting``, or ``submitted`` while staging) held by ``worker``."""
    return update_case(conn, case_id, status, {"lease_until": now + lease_seconds},
                       guard={"claimed_by": worker})


def free_slots(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM gpu_resources WHERE status = 'available'").fetchone()[0]


def staged_waiting(conn: sqlite3.Connection) -> int:
    """How many ``submitted`` cases are already uploaded and waiting for a GPU."""
    return conn.execute("SELECT COUNT(*) FROM cases WHERE status = 'submitted'"
                        " AND staged_at IS NOT NULL").fetchone()[0]


def claim_for_staging(conn: sqlite3.Connection, *, worker: str, now: float,
                      lease_seconds: float, max_wait_seconds: float | None = None) -> Case | None:
    """Take the next ``submitted``, not yet staged, unclaimed case for a pre-upload.

    Same order as ``claim_next_case`` (urgent first) and nothing while a host is
    drained. The case keeps its status; only ``claimed_by``/``lease_until`` mark
    the work, so ``claim_next_case`` leaves it alone until the lease ends.
    """
    if not _any(conn, "SELECT 1 FROM cases WHERE status = 'submitted' AND staged_at IS NULL"):
        return None
    with transaction(conn):
        row = conn.execute(
            "UPDATE cases SET claimed_by = :w, lease_until = :lease"
            " WHERE case_id = (SELECT case_id FROM cases WHERE status = 'submitted'"
            "   AND staged_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= :now)"
            "   AND (claimed_by IS NULL OR lease_until < :now)"
            f"  AND {NOT_DRAINED} ORDER BY {URGENT_FIRST} LIMIT 1) AND status = 'submitted' RETURNING *",
            {"w": worker, "now": now, "lease": now + lease_seconds,
             "aged": _aged(now, max_wait_seconds)}).fetchone()
    return None if row is None else case_from_row(row)


def mark_staged(conn: sqlite3.Connection, case: Case, *, remote_dir: str, worker: str, now: float,
                detail: str) -> bool:
    """Record a verified pre-upload and release the staging claim (records an event)."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET remote_dir = ?, staged_at = ?, claimed_by = NULL, lease_until = NULL"
            " WHERE case_id = ? AND status = 'submitted' AND claimed_by = ?",
            (remote_dir, now, case.case_id, worker))
        if cursor.rowcount != 1:
            return False
        record_case_event(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTED, now=now,
                          worker=worker, detail=detail)
        return True


def release_staging(conn: sqlite3.Connection, case_id: int, *, worker: str) -> bool:
    return update_case(conn, case_id, CaseStatus.SUBMITTED, {"claimed_by": None, "lease_until": None},
                       guard={"claimed_by": worker})


def expired_leases(conn: sqlite3.Connection, now: float, limit: int = 100) -> list[Case]:
    rows = conn.execute("SELECT * FROM cases WHERE status = 'submitting' AND lease_until < ?"
                        " ORDER BY case_id LIMIT ?", (now, limit))
    return [case_from_row(r) for r in rows]


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


def note_remote(conn: sqlite3.Connection, name: str, *, ok: bool, now: float, error: str | None = None) -> None:
    """Record whether this worker's last HPC call got through (Unreachable is not ok)."""
    with transaction(conn):
        conn.execute("UPDATE workers SET remote_ok = ?, remote_checked_at = ?, remote_error = ? WHERE name = ?",
                     (int(ok), now, None if ok else (error or "")[:500], name))
