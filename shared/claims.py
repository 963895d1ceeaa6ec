"""Which waiting case goes next, and to which seat: claims, their leases, and pre-upload claims.

A claim is one compare-and-set (``submitted -> submitting``) that also takes a free seat; the
claim order (urgent or aged first, then the oldest) and a seat's usability (host not drained,
reachable, its GPU not blocked) are SQL fragments kept here, in one place, and so is which free
seat a case takes (``seat_rank``), also when each host claims for itself (``claim_next_case(host=)``).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Iterable

from shared.db import transaction
from shared.processes import pid_alive
from shared.seats import Slot, slot_from_row, transition_slot
from shared.states import CaseStatus, SlotStatus
from shared.store import Case, case_from_row, record_case_event, update_case


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
# it may be pre-uploaded); then the seat free longest. ``busy`` is how many seats of the seat's
# slot are taken (counted by ``_free_seats``).
def seat_rank(seat: Slot, busy: int, case_host: str | None) -> tuple:
    """Where ``seat`` stands among the free seats for a case whose folder is on ``case_host`` (lowest first)."""
    return busy, seat.host != case_host, seat.updated_at, seat.host, seat.slot, seat.seat


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
        return self.slot.slot

    @property
    def gpu(self) -> str | None:
        return self.slot.gpu


def claim_next_case(conn: sqlite3.Connection, *, worker: str, now: float, lease_seconds: float,
                    seats: Iterable[tuple[str, str]] | None = None,
                    max_wait_seconds: float | None = None, host: str | None = None) -> Claim | None:
    """Atomically take the next eligible ``submitted`` case (its folder in spool/queued) and a free seat for it.

    Next means urgent first, oldest first within a priority, a normal case waiting
    longer than ``max_wait_seconds`` counting as urgent (``URGENT_FIRST``). The seat
    is one of ``seats`` ((host, group) pairs; None: any) on a host that is neither
    drained nor last seen unreachable, the first in ``seat_rank``. In one ``BEGIN IMMEDIATE``:
    the case moves to ``submitting`` with a lease for ``worker`` and that host, and
    the seat to ``assigned``. Returns None (and changes nothing) when there is no
    eligible case or no usable seat.

    ``host``: the claim of that host's own loop (hosts claim in parallel). The waiting cases
    are handed the free seats of ``seats`` in claim order as one claim after another would
    (each its best seat); the first case handed a seat of ``host`` is taken, the cases before
    it are left to the hosts of their better seats. So a case goes to whichever host has the
    best room for it, as with one claim at a time, and no host waits for another's claims.
    """
    allowed = None if seats is None else set(seats)
    if not _any(conn, f"SELECT 1 FROM cases WHERE {CLAIMABLE}") or \
            not _any(conn, f"SELECT 1 FROM gpu_resources WHERE status = {SlotStatus.AVAILABLE.sql} AND {SEAT_USABLE}"
                           + ("" if host is None else " AND host = :host"), {"host": host}):
        return None  # nothing to do: no write lock taken
    with transaction(conn):
        free, busy = _free_seats(conn, allowed)
        if not free:
            return None
        rows = conn.execute(
            f"SELECT * FROM cases WHERE {CLAIMABLE}"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= :now)"
            " AND (claimed_by IS NULL OR lease_until < :now)"
            f" ORDER BY {URGENT_FIRST} LIMIT :n",
            {"now": now, "aged": _aged(now, max_wait_seconds), "n": 1 if host is None else len(free)}).fetchall()
        planned = _first_planned(rows, free, busy, host)
        if planned is None:
            return None
        row, slot = planned
        row = conn.execute(
            f"UPDATE cases SET status = {CaseStatus.SUBMITTING.sql}, status_updated_at = :now, claimed_by = :w,"
            " lease_until = :lease, pueue_group = :g, host = :h,"
            " remote_dir = CASE WHEN host IS :h THEN remote_dir END,"  # a pre-upload elsewhere is not used
            " staged_at = CASE WHEN host IS :h THEN staged_at END"
            f" WHERE case_id = :id AND status = {CaseStatus.SUBMITTED.sql}"
            " RETURNING *", {"now": now, "w": worker, "lease": now + lease_seconds, "g": slot.slot,
                             "h": slot.host, "id": row["case_id"]}).fetchone()
        case = case_from_row(row)
        record_case_event(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=now,
                          worker=worker, detail=f"claimed with slot {slot.name} (attempt {case.attempts + 1})")
        if not transition_slot(conn, slot, SlotStatus.AVAILABLE, SlotStatus.ASSIGNED,
                               now=now, worker=worker, case_id=case.case_id):
            raise RuntimeError("slot changed inside an immediate transaction")
        return Claim(case=case, slot=slot)


def _first_planned(rows: list[sqlite3.Row], free: list[Slot], busy: dict[tuple[str, str], int],
                   host: str | None) -> tuple[sqlite3.Row, Slot] | None:
    """The first (case, seat) of the plan that gives each case in ``rows`` its best free seat in
    turn whose seat is on ``host`` (any host: the first case's)."""
    free, busy = list(free), dict(busy)
    for row in rows:
        if not free:
            return None
        best = min(free, key=lambda seat: seat_rank(seat, busy[(seat.host, seat.slot)], row["host"]))
        if host is None or best.host == host:
            return row, best
        free.remove(best)  # that case goes to the other host's seat: the next case is planned without it
        busy[(best.host, best.slot)] += 1
    return None


def _any(conn: sqlite3.Connection, query: str, params: dict | None = None) -> bool:
    return conn.execute(f"SELECT EXISTS({query})", params or {}).fetchone()[0] == 1


def _free_seats(conn: sqlite3.Connection,
                allowed: set[tuple[str, str]] | None) -> tuple[list[Slot], dict[tuple[str, str], int]]:
    """The seats that can be handed out (of ``allowed``), and per (host, slot) how many of its seats are taken."""
    busy = _taken_per_slot(conn)
    rows = conn.execute(f"SELECT * FROM gpu_resources WHERE status = {SlotStatus.AVAILABLE.sql} AND {SEAT_USABLE}"
                        " ORDER BY host, pueue_group, seat").fetchall()
    free = [slot_from_row(r) for r in rows if allowed is None or (r["host"], r["pueue_group"]) in allowed]
    return free, busy


def renew_lease(conn: sqlite3.Connection, case_id: int, *, worker: str, now: float,
                lease_seconds: float, status: CaseStatus = CaseStatus.SUBMITTING) -> bool:
    """Extend the lease of a case (``submitting``, or ``submitted`` while staging) held by ``worker``."""
    return update_case(conn, case_id, status, {"lease_until": now + lease_seconds},
                       guard={"claimed_by": worker})


def free_slots(conn: sqlite3.Connection, seats: Iterable[tuple[str, str]] | None = None) -> int:
    """How many seats (of ``seats``, (host, group) pairs; None: any) could be handed out now."""
    return len(_free_seats(conn, None if seats is None else set(seats))[0])


def _taken_per_slot(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """Per (host, slot): how many of its seats are taken."""
    return {(r["host"], r["pueue_group"]): r["taken"] for r in conn.execute(
        f"SELECT host, pueue_group, SUM(status <> {SlotStatus.AVAILABLE.sql}) AS taken FROM gpu_resources"
        " GROUP BY host, pueue_group")}


def idle_slots(conn: sqlite3.Connection, host: str | None = None) -> set[tuple[str, str]]:
    """The (host, slot) pairs (of ``host``, or of every host) with no seat taken: a GPU with nothing on it."""
    return {pair for pair, taken in _taken_per_slot(conn).items() if not taken and (host is None or pair[0] == host)}


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
    """Claims whose lease ran out, or whose owner process is gone (a SIGKILLed submitter renews
    nothing: its claims need not hold their seats until the lease ends). Every worker runs on this
    workstation, so a claim's pid (``<worker>:<pid>``) is a process here; a pid reused by another
    process only makes the claim wait for its lease, as before."""
    rows = conn.execute(f"SELECT * FROM cases WHERE status = {CaseStatus.SUBMITTING.sql}"
                        " AND (lease_until < :now OR claimed_by IS NOT NULL) ORDER BY case_id",
                        {"now": now})
    cases = [case_from_row(r) for r in rows]
    return [c for c in cases if (c.lease_until or 0) < now or owner_gone(c.claimed_by)][:limit]


def owner_gone(claimed_by: str | None) -> bool:
    """True when ``claimed_by`` names a process id that no longer exists here."""
    pid = (claimed_by or "").rpartition(":")[2]
    return pid.isdigit() and not pid_alive(int(pid))
