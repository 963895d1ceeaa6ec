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
    host: str | None = None  # issue 11: the host its remote folder and task are on

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
    """One seat of a (host, group or partition): it holds one case at a time."""
    slot_id: int
    host: str
    pueue_group: str
    seat: int
    status: SlotStatus
    assigned_case_id: int | None
    gpu: str | None
    updated_at: float

    @property
    def name(self) -> str:
        """``host/group`` (and ``#seat`` past the first): how logs and screens name it."""
        return f"{self.host}/{self.pueue_group}" + (f"#{self.seat}" if self.seat else "")


CASE_COLUMNS = frozenset(f.name for f in dataclasses.fields(Case))

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
    "progress": 0.0, "pueue_task_id": None, "pueue_group": None, "acknowledged_at": None,
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


def get_slot(conn: sqlite3.Connection, group: str, *, host: str = "hpc", seat: int = 0) -> Slot | None:
    """Seat ``seat`` of ``group`` on ``host`` (the default names the one host of a config without ``hosts:``)."""
    row = conn.execute("SELECT * FROM gpu_resources WHERE host = ? AND pueue_group = ? AND seat = ?",
                       (host, group, seat)).fetchone()
    return None if row is None else slot_from_row(row)


def slot_of_case(conn: sqlite3.Connection, case_id: int) -> Slot | None:
    """The seat that names ``case_id`` (assigned to it, or a zombie left by it)."""
    row = conn.execute("SELECT * FROM gpu_resources WHERE assigned_case_id = ? ORDER BY slot_id LIMIT 1",
                       (case_id,)).fetchone()
    return None if row is None else slot_from_row(row)


def all_slots(conn: sqlite3.Connection) -> list[Slot]:
    return [slot_from_row(r) for r in conn.execute("SELECT * FROM gpu_resources ORDER BY host, pueue_group, seat")]


def _assignments(fields: dict[str, Any]) -> str:
    unknown = set(fields) - CASE_COLUMNS
    if unknown:
        raise ValueError(f"not a cases column: {sorted(unknown)}")
    return "".join(f", {name} = :f_{name}" for name in fields)


def _guard_sql(guard: dict[str, Any]) -> str:
    """`` AND col IS :g_col`` for each guarded column (the columns are checked to be ours)."""
    _assignments(guard)
    return "".join(f" AND {name} IS :g_{name}" for name in guard)


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


def record_slot_event(conn: sqlite3.Connection, slot: Slot, frm: SlotStatus | None,
                      to: SlotStatus, *, case_id: int | None, now: float, worker: str,
                      detail: str = "") -> None:
    conn.execute(
        "INSERT INTO slot_events (host, pueue_group, seat, from_status, to_status, case_id, at, worker, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (slot.host, slot.pueue_group, slot.seat, None if frm is None else frm.value, to.value, case_id, now,
         worker, detail))


def transition_slot(conn: sqlite3.Connection, slot: Slot, frm: SlotStatus, to: SlotStatus, *,
                    now: float, worker: str, case_id: int | None, detail: str = "") -> bool:
    """Move seat ``slot`` from ``frm`` to ``to``, guarded on status and assigned case.

    ``case_id`` must be the case the seat currently names (None for an
    available seat); the new assignment is that case when ``to`` is assigned,
    else kept for a zombie (so the reaper knows whose task it was) and cleared
    for available.
    """
    check_slot_move(frm, to)
    new_case = case_id if to is not SlotStatus.AVAILABLE else None
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE gpu_resources SET status = ?, assigned_case_id = ?, updated_at = ?"
            " WHERE slot_id = ? AND status = ? AND assigned_case_id IS ?",
            (to.value, new_case, now, slot.slot_id, frm.value, case_id if frm is not SlotStatus.AVAILABLE else None))
        if cursor.rowcount != 1:
            return False
        record_slot_event(conn, slot, frm, to, case_id=case_id, now=now, worker=worker, detail=detail)
        return True


def release_slot_of(conn: sqlite3.Connection, case: Case, to: SlotStatus, *, now: float,
                    worker: str, detail: str = "", guard: dict[str, Any] | None = None) -> bool:
    """Free (or mark zombie) the seat held by ``case``, if it still holds one (and, with
    ``guard``, only while the case row still has ``case.status`` and those column values)."""
    with transaction(conn):
        if guard is not None and not case_still(conn, case, guard):
            return False
        row = conn.execute("SELECT * FROM gpu_resources"
                           f" WHERE assigned_case_id = ? AND status = {SlotStatus.ASSIGNED.sql}",
                           (case.case_id,)).fetchone()
        if row is None:
            return False
        return transition_slot(conn, slot_from_row(row), SlotStatus.ASSIGNED, to, now=now,
                               worker=worker, case_id=case.case_id, detail=detail)


def case_still(conn: sqlite3.Connection, case: Case, guard: dict[str, Any]) -> bool:
    """True while the row of ``case`` still has its status and the ``guard`` column values."""
    where = _guard_sql(guard)
    row = conn.execute(f"SELECT 1 FROM cases WHERE case_id = :id AND status = :status{where}",
                       {"id": case.case_id, "status": case.status.value,
                        **_guard_params(guard)}).fetchone()
    return row is not None


@dataclass(frozen=True)
class SeatSpec:
    """A seat the config asks for: ``seat`` runs from 0 to the slot's depth - 1."""
    host: str
    group: str
    seat: int
    gpu: str | None = None


def seat_specs(config) -> list[SeatSpec]:
    """Every seat of every configured host and slot (``depth`` seats per slot)."""
    return [SeatSpec(host.name, slot.name, seat, slot.gpu)
            for host in config.hosts for slot in host.slots for seat in range(slot.depth)]


def sync_slots(conn: sqlite3.Connection, seats: Iterable[SeatSpec], *, now: float, worker: str) -> list[str]:
    """Make a row for every configured seat and drop free rows the config no longer has.

    A seat that is not configured but still holds a case (assigned or zombie) stays
    until it is free; the claim never hands it out. Returns the added seats' names.
    """
    wanted = list(seats)
    added = []
    with transaction(conn):
        for spec in wanted:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO gpu_resources (host, pueue_group, seat, status, gpu, updated_at)"
                f" VALUES (?, ?, ?, {SlotStatus.AVAILABLE.sql}, ?, ?)",
                (spec.host, spec.group, spec.seat, spec.gpu, now))
            conn.execute("UPDATE gpu_resources SET gpu = ? WHERE host = ? AND pueue_group = ? AND seat = ?",
                         (spec.gpu, spec.host, spec.group, spec.seat))
            if cursor.rowcount == 1:
                slot = slot_from_row(conn.execute("SELECT * FROM gpu_resources WHERE slot_id = ?",
                                                  (cursor.lastrowid,)).fetchone())
                record_slot_event(conn, slot, None, SlotStatus.AVAILABLE, case_id=None, now=now,
                                  worker=worker, detail="slot created from config")
                added.append(slot.name)
        keys = {(spec.host, spec.group, spec.seat) for spec in wanted}
        for row in conn.execute(f"SELECT * FROM gpu_resources WHERE status = {SlotStatus.AVAILABLE.sql}").fetchall():
            if (row["host"], row["pueue_group"], row["seat"]) not in keys:
                conn.execute(f"DELETE FROM gpu_resources WHERE slot_id = ? AND status = {SlotStatus.AVAILABLE.sql}",
                             (row["slot_id"],))
    return added


def adopt_unnamed_host(conn: sqlite3.Connection, host: str, address: str) -> int:
    """Give rows written before hosts had names (host '') the name ``host``; return how many.

    Drains were keyed by the host's address (``hpc.host``) then: they move to the name.
    """
    with transaction(conn):
        if address != host:
            conn.execute("UPDATE OR IGNORE drains SET host = ? WHERE host = ?", (host, address))
        count = conn.execute("UPDATE cases SET host = ? WHERE host = ''", (host,)).rowcount
        for row in conn.execute("SELECT * FROM gpu_resources WHERE host = ''").fetchall():
            taken = conn.execute("SELECT 1 FROM gpu_resources WHERE host = ? AND pueue_group = ? AND seat = ?",
                                 (host, row["pueue_group"], row["seat"])).fetchone()
            if taken is None:
                conn.execute("UPDATE gpu_resources SET host = ? WHERE slot_id = ?", (host, row["slot_id"]))
                count += 1
        conn.execute("UPDATE slot_events SET host = ? WHERE host = ''", (host,))
    return count


# Claim order: urgent first, oldest first within a priority. A normal case that has
# waited longer than ``max_wait_seconds`` counts as urgent (anti-starvation): older than
# every urgent case that arrives later, it is claimed before them.
URGENT_FIRST = ("CASE WHEN priority = 'urgent' OR submitted_at <= :aged THEN 0 ELSE 1 END,"
                " submitted_at, case_id")
# Only a case whose folder is in spool/queued may be claimed or pre-uploaded: a registered
# case is still in the drop folder (stage ``incoming``) until the scanner has moved it.
CLAIMABLE = f"status = {CaseStatus.SUBMITTED.sql} AND spool_stage = 'queued'"
# A seat can be handed out when its host is neither drained nor last seen unreachable.
# issue 21: nor is its GPU one that nvidia-smi shows lost or not answering, or busy with someone
# else's process under ``gpus.avoid_foreign`` (``gpus.blocks_claims``, kept by shared.gpus). A seat
# names its GPUs as CUDA_VISIBLE_DEVICES does (indexes or UUIDs, comma-separated); one that names
# none is never held back.
SEAT_GPU_USABLE = ("NOT EXISTS (SELECT 1 FROM gpus WHERE gpus.host = gpu_resources.host AND gpus.blocks_claims = 1"
                   " AND (instr(',' || replace(gpu_resources.gpu, ' ', '') || ',', ',' || gpus.gpu_index || ',') > 0"
                   " OR (gpus.uuid <> '' AND instr(',' || replace(gpu_resources.gpu, ' ', '') || ',',"
                   " ',' || gpus.uuid || ',') > 0)))")
SEAT_USABLE = ("host NOT IN (SELECT host FROM drains)"
               " AND host NOT IN (SELECT host FROM host_reach WHERE ok = 0)"
               f" AND {SEAT_GPU_USABLE}")
# Fill idle GPUs before queueing behind a running case; then the case's own host (where
# it may be pre-uploaded); then the seat free longest.
SEAT_ORDER = ("(SELECT COUNT(*) FROM gpu_resources AS b WHERE b.host = gpu_resources.host"
              f" AND b.pueue_group = gpu_resources.pueue_group AND b.status <> {SlotStatus.AVAILABLE.sql}),"
              " host IS NOT :case_host, updated_at, host, pueue_group, seat")


def _aged(now: float, max_wait_seconds: float | None) -> float | None:
    return None if max_wait_seconds is None else now - max_wait_seconds


def waiting_in_claim_order(conn: sqlite3.Connection, *, now: float,
                           max_wait_seconds: float | None = None) -> list[Case]:
    """Every ``submitted`` case in the order the claim takes them (``URGENT_FIRST``), for
    estimates and screens; backoff and staging claims are left to the caller."""
    rows = conn.execute(f"SELECT * FROM cases WHERE status = {CaseStatus.SUBMITTED.sql} ORDER BY {URGENT_FIRST}",
                        {"aged": _aged(now, max_wait_seconds)})
    return [case_from_row(r) for r in rows]


@dataclass(frozen=True)
class Claim:
    case: Case
    slot: Slot

    @property
    def host(self) -> str:
        return self.slot.host

    @property
    def group(self) -> str:
        return self.slot.pueue_group

    @property
    def gpu(self) -> str | None:
        return self.slot.gpu


def claim_next_case(conn: sqlite3.Connection, *, worker: str, now: float, lease_seconds: float,
                    seats: Iterable[tuple[str, str]] | None = None,
                    max_wait_seconds: float | None = None) -> Claim | None:
    """Atomically take the next eligible ``submitted`` case (its folder in spool/queued) and a free seat for it.

    Next means urgent first, oldest first within a priority, a normal case waiting
    longer than ``max_wait_seconds`` counting as urgent (``URGENT_FIRST``). The seat
    is one of ``seats`` ((host, group) pairs; None: any) on a host that is neither
    drained nor last seen unreachable, in ``SEAT_ORDER``. In one ``BEGIN IMMEDIATE``:
    the case moves to ``submitting`` with a lease for ``worker`` and that host, and
    the seat to ``assigned``. Returns None (and changes nothing) when there is no
    eligible case or no usable seat.
    """
    allowed = None if seats is None else set(seats)
    if not _any(conn, f"SELECT 1 FROM cases WHERE {CLAIMABLE}") or \
            not _any(conn, f"SELECT 1 FROM gpu_resources WHERE status = {SlotStatus.AVAILABLE.sql} AND {SEAT_USABLE}"):
        return None  # nothing to do: no write lock taken
    with transaction(conn):
        if not _free_seats(conn, allowed, None):
            return None
        row = conn.execute(
            f"SELECT * FROM cases WHERE {CLAIMABLE}"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= :now)"
            " AND (claimed_by IS NULL OR lease_until < :now)"
            f" ORDER BY {URGENT_FIRST} LIMIT 1", {"now": now, "aged": _aged(now, max_wait_seconds)}).fetchone()
        if row is None:
            return None
        slot = _free_seats(conn, allowed, row["host"])[0]
        row = conn.execute(
            f"UPDATE cases SET status = {CaseStatus.SUBMITTING.sql}, status_updated_at = :now, claimed_by = :w,"
            " lease_until = :lease, pueue_group = :g, host = :h,"
            " remote_dir = CASE WHEN host IS :h THEN remote_dir END,"  # a pre-upload elsewhere is not used
            " staged_at = CASE WHEN host IS :h THEN staged_at END"
            f" WHERE case_id = :id AND status = {CaseStatus.SUBMITTED.sql}"
            " RETURNING *", {"now": now, "w": worker, "lease": now + lease_seconds, "g": slot.pueue_group,
                             "h": slot.host, "id": row["case_id"]}).fetchone()
        case = case_from_row(row)
        record_case_event(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=now,
                          worker=worker, detail=f"claimed with slot {slot.name} (attempt {case.attempts + 1})")
        if not transition_slot(conn, slot, SlotStatus.AVAILABLE, SlotStatus.ASSIGNED,
                               now=now, worker=worker, case_id=case.case_id):
            raise RuntimeError("slot changed inside an immediate transaction")
        return Claim(case=case, slot=slot)


def _any(conn: sqlite3.Connection, query: str) -> bool:
    return conn.execute(f"SELECT EXISTS({query})").fetchone()[0] == 1


def _free_seats(conn: sqlite3.Connection, allowed: set[tuple[str, str]] | None, case_host: str | None) -> list[Slot]:
    rows = conn.execute(f"SELECT * FROM gpu_resources WHERE status = {SlotStatus.AVAILABLE.sql} AND {SEAT_USABLE}"
                        f" ORDER BY {SEAT_ORDER}", {"case_host": case_host}).fetchall()
    return [slot_from_row(r) for r in rows if allowed is None or (r["host"], r["pueue_group"]) in allowed]


def renew_lease(conn: sqlite3.Connection, case_id: int, *, worker: str, now: float,
                lease_seconds: float, status: CaseStatus = CaseStatus.SUBMITTING) -> bool:
    """Extend the lease of a case (``submitting``, or ``submitted`` while staging) held by ``worker``."""
    return update_case(conn, case_id, status, {"lease_until": now + lease_seconds},
                       guard={"claimed_by": worker})


def free_slots(conn: sqlite3.Connection, seats: Iterable[tuple[str, str]] | None = None) -> int:
    """How many seats (of ``seats``, (host, group) pairs; None: any) could be handed out now."""
    return len(_free_seats(conn, None if seats is None else set(seats), None))


def staged_waiting(conn: sqlite3.Connection, host: str | None = None) -> int:
    """How many ``submitted`` cases are already uploaded (to ``host``, or anywhere) and wait for a seat."""
    return conn.execute(f"SELECT COUNT(*) FROM cases WHERE status = {CaseStatus.SUBMITTED.sql}"
                        " AND staged_at IS NOT NULL"
                        " AND (:host IS NULL OR host = :host)", {"host": host}).fetchone()[0]


def claim_for_staging(conn: sqlite3.Connection, *, worker: str, now: float, lease_seconds: float,
                      max_wait_seconds: float | None = None, skip: int = 0) -> Case | None:
    """Take the next ``submitted``, not yet staged, unclaimed case in spool/queued for a pre-upload.

    Same order as ``claim_next_case`` (urgent first), past the first ``skip`` cases of
    that queue: those are the ones the free seats take next (a pre-upload racing their
    claim would only make the claim pass them over). The caller has chosen a host that
    is neither drained nor unreachable. The case keeps its status; only
    ``claimed_by``/``lease_until`` mark the work, so ``claim_next_case`` leaves it
    alone until the lease ends.
    """
    if not _any(conn, f"SELECT 1 FROM cases WHERE {CLAIMABLE} AND staged_at IS NULL"):
        return None
    with transaction(conn):
        row = conn.execute(
            "WITH queue AS (SELECT case_id, staged_at, ROW_NUMBER() OVER (ORDER BY"
            f"  {URGENT_FIRST}) AS place FROM cases WHERE {CLAIMABLE}"
            "   AND (next_attempt_at IS NULL OR next_attempt_at <= :now)"
            "   AND (claimed_by IS NULL OR lease_until < :now))"
            " UPDATE cases SET claimed_by = :w, lease_until = :lease"
            " WHERE case_id = (SELECT case_id FROM queue WHERE place > :skip AND staged_at IS NULL"
            f"   ORDER BY place LIMIT 1) AND status = {CaseStatus.SUBMITTED.sql} RETURNING *",
            {"w": worker, "now": now, "lease": now + lease_seconds, "skip": skip,
             "aged": _aged(now, max_wait_seconds)}).fetchone()
    return None if row is None else case_from_row(row)


def mark_staged(conn: sqlite3.Connection, case: Case, *, host: str, remote_dir: str, worker: str, now: float,
                detail: str) -> bool:
    """Record a verified pre-upload to ``host`` and release the staging claim (records an event)."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET host = ?, remote_dir = ?, staged_at = ?, claimed_by = NULL, lease_until = NULL"
            f" WHERE case_id = ? AND status = {CaseStatus.SUBMITTED.sql} AND claimed_by = ?",
            (host, remote_dir, now, case.case_id, worker))
        if cursor.rowcount != 1:
            return False
        record_case_event(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTED, now=now,
                          worker=worker, detail=detail)
        return True


def release_staging(conn: sqlite3.Connection, case_id: int, *, worker: str) -> bool:
    return update_case(conn, case_id, CaseStatus.SUBMITTED, {"claimed_by": None, "lease_until": None},
                       guard={"claimed_by": worker})


def expired_leases(conn: sqlite3.Connection, now: float, limit: int = 100) -> list[Case]:
    rows = conn.execute(f"SELECT * FROM cases WHERE status = {CaseStatus.SUBMITTING.sql} AND lease_until < ?"
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
