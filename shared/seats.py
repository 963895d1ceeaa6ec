"""GPU seats (``gpu_resources`` rows): what a seat is, its guarded moves and events, and keeping
the seats in step with the configured slots.

A seat moves ``available -> assigned -> available | zombie`` (``shared.states.SLOT_ALLOWED``), each move a
compare-and-set inside ``BEGIN IMMEDIATE`` that appends an event.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Iterable

from shared.db import transaction
from shared.states import SlotStatus, check_slot_move
from shared.store import Case, case_still


@dataclass(frozen=True)
class Slot:
    """One seat of a (host, group or partition): it holds one case at a time."""
    slot_id: int
    host: str
    slot: str    # column pueue_group: the slot (pueue group, Slurm partition entry, direct slot) it belongs to
    seat: int
    status: SlotStatus
    assigned_case_id: int | None
    gpu: str | None
    updated_at: float

    @property
    def name(self) -> str:
        """``host/group`` (and ``#seat`` past the first): how logs and screens name it."""
        return f"{self.host}/{self.slot}" + (f"#{self.seat}" if self.seat else "")


def slot_from_row(row: sqlite3.Row) -> Slot:
    data = dict(row)
    data["slot"] = data.pop("pueue_group")  # the seed's column name (shared.store.FIELD_COLUMNS)
    data["status"] = SlotStatus.parse(data["status"])
    return Slot(**data)


def slot_of_case(conn: sqlite3.Connection, case_id: int) -> Slot | None:
    """The seat that names ``case_id`` (assigned to it, or a zombie left by it)."""
    row = conn.execute("SELECT * FROM gpu_resources WHERE assigned_case_id = ? ORDER BY slot_id LIMIT 1",
                       (case_id,)).fetchone()
    return None if row is None else slot_from_row(row)


def all_slots(conn: sqlite3.Connection) -> list[Slot]:
    return [slot_from_row(r) for r in conn.execute("SELECT * FROM gpu_resources ORDER BY host, pueue_group, seat")]


def record_slot_event(conn: sqlite3.Connection, slot: Slot, frm: SlotStatus | None,
                      to: SlotStatus, *, case_id: int | None, now: float, worker: str,
                      detail: str = "") -> None:
    conn.execute(
        "INSERT INTO slot_events (host, pueue_group, seat, from_status, to_status, case_id, at, worker, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (slot.host, slot.slot, slot.seat, None if frm is None else frm.value, to.value, case_id, now,
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
