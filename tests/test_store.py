"""The state machine: every allowed and forbidden move, compare-and-set races, migrations."""
from __future__ import annotations

import itertools
import os
import multiprocessing
import sqlite3

import pytest

from shared.claims import claim_for_staging, claim_next_case, mark_staged, release_staging
from shared.db import (
    MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, check_integrity, connect, migrate_schema, schema_version)
from shared.errors import ForbiddenTransition, UnknownStatus
from shared.liveness import forget_retired_loops, note_remote
from shared.seats import adopt_unnamed_host, release_slot_of, SeatSpec, sync_slots, transition_slot
from shared.states import ALLOWED, SLOT_ALLOWED, CaseStatus, SlotStatus
from shared.store import case_events, case_from_row, get_case, register_case, transition
from tests.conftest import get_slot

NOW = 1_700_000_000.0


def new_case(conn, name="case", now=NOW, *, moved: bool = True):
    """A registered case; ``moved``: its folder is in spool/queued, as the scanner leaves it."""
    case = register_case(conn, case_name=name, source_path=f"/drop/{name}", now=now, worker="test")
    if moved:
        conn.execute("UPDATE cases SET spool_stage = 'queued' WHERE case_id = ?", (case.case_id,))
    return get_case(conn, case.case_id)


def force_status(conn, case_id, status):
    conn.execute("UPDATE cases SET status = ? WHERE case_id = ?", (status.value, case_id))


ALL_CASE_MOVES = list(itertools.product(CaseStatus, CaseStatus))


@pytest.mark.parametrize("frm,to", ALL_CASE_MOVES, ids=[f"{a.value}->{b.value}" for a, b in ALL_CASE_MOVES])
def test_every_case_move_is_allowed_or_refused(conn, frm, to):
    case = new_case(conn)
    force_status(conn, case.case_id, frm)
    if to in ALLOWED[frm]:
        assert transition(conn, case.case_id, frm, to, now=NOW + 1, worker="w", detail="why")
        row = get_case(conn, case.case_id)
        assert row.status is to and row.status_updated_at == NOW + 1
        last = case_events(conn, case.case_id)[-1]
        assert (last["from_status"], last["to_status"], last["worker"], last["detail"]) == (frm.value, to.value, "w", "why")
    else:
        with pytest.raises(ForbiddenTransition):
            transition(conn, case.case_id, frm, to, now=NOW + 1, worker="w")
        assert get_case(conn, case.case_id).status is frm


def test_lifecycle_matches_the_specification():
    s = CaseStatus
    assert ALLOWED[s.SUBMITTED] >= {s.SUBMITTING}
    assert ALLOWED[s.SUBMITTING] >= {s.RUNNING, s.SUBMITTED}
    assert ALLOWED[s.RUNNING] >= {s.COMPLETED, s.FAILED}
    assert ALLOWED[s.COMPLETED] == frozenset()
    assert SLOT_ALLOWED == {
        SlotStatus.AVAILABLE: {SlotStatus.ASSIGNED},
        SlotStatus.ASSIGNED: {SlotStatus.AVAILABLE, SlotStatus.ZOMBIE},
        SlotStatus.ZOMBIE: {SlotStatus.AVAILABLE},
    }


def test_stale_transition_loses_and_writes_no_event(conn):
    case = new_case(conn)
    assert transition(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=NOW, worker="a")
    events = len(case_events(conn, case.case_id))
    assert not transition(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=NOW, worker="b")
    assert len(case_events(conn, case.case_id)) == events


def test_guard_columns_must_still_hold(conn):
    case = new_case(conn)
    transition(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=NOW, worker="a",
               fields={"claimed_by": "a"})
    assert not transition(conn, case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=NOW,
                          worker="b", guard={"claimed_by": "b"})
    assert transition(conn, case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=NOW,
                      worker="a", guard={"claimed_by": "a"}, fields={"task_id": 3})
    assert get_case(conn, case.case_id).task_id == 3


@pytest.mark.parametrize("frm,to", list(itertools.product(SlotStatus, SlotStatus)))
def test_every_slot_move_is_allowed_or_refused(conn, frm, to):
    case = new_case(conn)
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0, "0")], now=NOW, worker="t")
    conn.execute("UPDATE gpu_resources SET status = ?, assigned_case_id = ?",
                 (frm.value, None if frm is SlotStatus.AVAILABLE else case.case_id))
    holder = None if frm is SlotStatus.AVAILABLE else case.case_id
    if to in SLOT_ALLOWED[frm]:
        assert transition_slot(conn, get_slot(conn, "gpu_a"), frm, to, now=NOW, worker="w", case_id=case.case_id if holder is None else holder)
        slot = get_slot(conn, "gpu_a")
        assert slot.status is to
        assert slot.assigned_case_id == (None if to is SlotStatus.AVAILABLE else case.case_id)
    else:
        with pytest.raises(ForbiddenTransition):
            transition_slot(conn, get_slot(conn, "gpu_a"), frm, to, now=NOW, worker="w", case_id=holder)


def test_claim_takes_oldest_case_and_a_slot_atomically(conn):
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0, "0")], now=NOW, worker="t")
    older, newer = new_case(conn, "old", NOW), new_case(conn, "new", NOW + 5)
    claim = claim_next_case(conn, worker="sub-1", now=NOW + 10, lease_seconds=60)
    assert claim.case.case_id == older.case_id and claim.group == "gpu_a" and claim.gpu == "0"
    assert claim.case.status is CaseStatus.SUBMITTING and claim.case.claimed_by == "sub-1"
    assert claim.case.lease_until == NOW + 70 and claim.case.attempts == 0  # counted only on failure
    slot = get_slot(conn, "gpu_a")
    assert slot.status is SlotStatus.ASSIGNED and slot.assigned_case_id == older.case_id
    # No free slot: the newer case waits untouched.
    assert claim_next_case(conn, worker="sub-1", now=NOW + 10, lease_seconds=60) is None
    assert get_case(conn, newer.case_id).status is CaseStatus.SUBMITTED


def test_a_claim_whose_owner_process_is_gone_is_recovered_before_its_lease_ends(conn):
    """A SIGKILLed submitter held its seats for the whole lease (the two-host chaos run: seats held by
    dead claims most of an outage). A live owner's claim, or one naming no pid, waits for its lease."""
    import os
    from shared.claims import expired_leases
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0), SeatSpec("hpc", "gpu_b", 0), SeatSpec("hpc", "gpu_c", 0)],
               now=NOW, worker="t")
    dead_pid = int(open("/proc/sys/kernel/pid_max").read()) + 7  # no process can have it
    owners = [f"submitter@gpu1:{dead_pid}", f"submitter@gpu1:{os.getpid()}", "sub-1"]
    claims = []
    for owner in owners:
        new_case(conn, owner)
        claims.append(claim_next_case(conn, worker=owner, now=NOW + 10, lease_seconds=60))
    assert [c.case_id for c in expired_leases(conn, NOW + 20)] == [claims[0].case.case_id]
    assert [c.case_id for c in expired_leases(conn, NOW + 71)] == [c.case.case_id for c in claims]


def test_claim_respects_backoff(conn):
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0)], now=NOW, worker="t")
    case = new_case(conn)
    conn.execute("UPDATE cases SET next_attempt_at = ? WHERE case_id = ?", (NOW + 100, case.case_id))
    assert claim_next_case(conn, worker="w", now=NOW + 99, lease_seconds=60) is None
    assert get_slot(conn, "gpu_a").status is SlotStatus.AVAILABLE
    assert claim_next_case(conn, worker="w", now=NOW + 100, lease_seconds=60).case.case_id == case.case_id


def test_release_slot_only_by_its_holder(conn):
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0)], now=NOW, worker="t")
    new_case(conn)
    claim = claim_next_case(conn, worker="w", now=NOW, lease_seconds=60)
    other = new_case(conn, "other")
    assert not transition_slot(conn, get_slot(conn, "gpu_a"), SlotStatus.ASSIGNED, SlotStatus.AVAILABLE, now=NOW,
                               worker="w", case_id=other.case_id)
    assert release_slot_of(conn, claim.case, SlotStatus.ZOMBIE, now=NOW, worker="w")
    assert get_slot(conn, "gpu_a").assigned_case_id == claim.case.case_id  # a zombie remembers whose


def test_unknown_status_in_a_row_raises(conn):
    case = new_case(conn)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute("UPDATE cases SET status = 'exploded' WHERE case_id = ?", (case.case_id,))
    row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case.case_id,)).fetchone()
    with pytest.raises(UnknownStatus):
        case_from_row(row)


def test_check_constraint_refuses_unknown_status(conn):
    case = new_case(conn)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE cases SET status = 'exploded' WHERE case_id = ?", (case.case_id,))


def _claimer(db_path, worker, rounds, queue):
    conn = connect(db_path)
    won = []
    for _ in range(rounds):
        claim = claim_next_case(conn, worker=worker, now=NOW, lease_seconds=60)
        if claim:
            won.append(claim.case.case_id)
            # Give the slot back so the race goes on for the next case.
            transition(conn, claim.case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=NOW, worker=worker)
            release_slot_of(conn, claim.case, SlotStatus.AVAILABLE, now=NOW, worker=worker)
    queue.put(won)


def test_processes_racing_for_the_same_cases_never_share_one(db_path):
    conn = connect(db_path)
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0), SeatSpec("hpc", "gpu_b", 0)], now=NOW, worker="t")
    ids = [new_case(conn, f"c{i}").case_id for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db_path, f"w{i}", 40, queue)) for i in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    claimed = [cid for won in results for cid in won]
    assert sorted(claimed) == ids  # every case exactly once
    assert all(len(won) > 0 for won in results) or len(claimed) == len(ids)
    moves = conn.execute("SELECT case_id, COUNT(*) FROM case_events WHERE to_status='submitting' GROUP BY case_id").fetchall()
    assert all(count == 1 for _, count in moves)


def test_migrates_an_old_database_forward_keeping_rows(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    migrate_schema(old, target=1)
    old.execute("INSERT INTO cases (case_name, case_path, source_path, spool_stage, status, submitted_at,"
                " status_updated_at) VALUES ('legacy', '/s/q/1_legacy', '/d/legacy', 'queued', 'submitted', 1, 1)")
    old.close()
    conn = connect(path)
    assert schema_version(conn) == SCHEMA_VERSION == len(MIGRATIONS)
    case = get_case(conn, 1)
    assert case.case_name == "legacy" and case.needs_review is False
    assert conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 0
    check_integrity(conn)
    connect(path).close()  # opening again is a no-op


def test_a_one_host_database_becomes_the_named_host_without_losing_a_running_case(tmp_path):
    path = tmp_path / "v6.db"
    old = sqlite3.connect(path, isolation_level=None)
    migrate_schema(old, target=6)
    old.execute("INSERT INTO cases (case_name, case_path, source_path, spool_stage, status, submitted_at,"
                " status_updated_at, pueue_group, pueue_task_id, remote_dir) VALUES"
                " ('running', '/s/active/1_running', '/d/running', 'active', 'running', 1, 1, 'gpu_a', 7, '/r/1')")
    old.execute("INSERT INTO cases (case_name, case_path, source_path, spool_stage, status, submitted_at,"
                " status_updated_at) VALUES ('waiting', '/s/queued/2_waiting', '/d/waiting', 'queued', 'submitted', 1, 1)")
    old.execute("INSERT INTO gpu_resources (pueue_group, status, assigned_case_id, gpu, updated_at)"
                " VALUES ('gpu_a', 'assigned', 1, '0', 1)")
    old.execute("INSERT INTO drains (host, since, drained_by) VALUES ('hpc.example.org', 1, 'op')")
    old.close()
    conn = connect(path)
    assert adopt_unnamed_host(conn, "gpu1", "hpc.example.org") == 2
    assert (get_case(conn, 1).host, get_case(conn, 2).host) == ("gpu1", None)   # the waiting case is on no host yet
    seat = get_slot(conn, "gpu_a", host="gpu1")
    assert (seat.status, seat.assigned_case_id, seat.seat) == (SlotStatus.ASSIGNED, 1, 0)
    assert [r[0] for r in conn.execute("SELECT host FROM drains")] == ["gpu1"]  # a drain keeps holding
    sync_slots(conn, [SeatSpec("gpu1", "gpu_a", 0, "0"), SeatSpec("gpu1", "gpu_a", 1, "0")], now=2, worker="t")
    assert release_slot_of(conn, get_case(conn, 1), SlotStatus.AVAILABLE, now=3, worker="t")
    check_integrity(conn)


def test_refuses_a_database_from_a_newer_program(tmp_path):
    path = tmp_path / "new.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(SchemaTooNew):
        connect(path)


def test_connection_pragmas_and_readonly(db_path, conn):
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    new_case(conn)
    reader = connect(db_path, readonly=True)
    assert reader.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("DELETE FROM cases")


def seats(conn, *specs):
    sync_slots(conn, [SeatSpec(*spec) for spec in specs], now=NOW, worker="t")


def test_a_slot_of_depth_two_holds_two_cases_and_idle_gpus_fill_first(conn):
    seats(conn, ("a", "gpu", 0), ("a", "gpu", 1), ("b", "gpu", 0))
    ids = [new_case(conn, f"c{i}", NOW + i).case_id for i in range(4)]
    claims = [claim_next_case(conn, worker="w", now=NOW + 10, lease_seconds=60) for _ in range(4)]
    assert [c.case.case_id for c in claims[:3]] == ids[:3] and claims[3] is None
    # the first two go to the two idle GPUs (one per host); only then is a case queued behind one
    assert {claims[0].host, claims[1].host} == {"a", "b"} and (claims[2].host, claims[2].slot.seat) == ("a", 1)
    assert [get_case(conn, c.case.case_id).host for c in claims[:3]] == [c.host for c in claims[:3]]


def test_no_seat_of_a_drained_or_unreachable_host_is_handed_out(conn):
    seats(conn, ("a", "gpu", 0), ("b", "gpu", 0))
    conn.execute("INSERT INTO drains (host, since, drained_by) VALUES ('a', 0, 'op')")
    note_remote(conn, "b", "poller", ok=False, now=NOW, error="Connection refused")
    new_case(conn)
    assert claim_next_case(conn, worker="w", now=NOW + 1, lease_seconds=60) is None
    note_remote(conn, "b", "reaper", ok=True, now=NOW + 2)
    assert claim_next_case(conn, worker="w", now=NOW + 3, lease_seconds=60).host == "b"


def test_a_case_pre_uploaded_to_one_host_prefers_it_but_forgets_the_upload_elsewhere(conn):
    seats(conn, ("a", "gpu", 0), ("b", "gpu", 0))
    case = new_case(conn)
    conn.execute("UPDATE cases SET claimed_by = 'stager' WHERE case_id = ?", (case.case_id,))
    assert mark_staged(conn, case, host="b", remote_dir="/b/1_x", worker="stager", now=NOW, detail="staged")
    claim = claim_next_case(conn, worker="w", now=NOW + 1, lease_seconds=60)
    assert claim.host == "b" and claim.case.remote_dir == "/b/1_x" and claim.case.staged_at == NOW
    other = new_case(conn, "other")
    conn.execute("UPDATE cases SET claimed_by = 'stager' WHERE case_id = ?", (other.case_id,))
    assert mark_staged(conn, other, host="b", remote_dir="/b/2_x", worker="stager", now=NOW, detail="staged")
    moved = claim_next_case(conn, worker="w", now=NOW + 2, lease_seconds=60)  # only host a has room
    assert moved.host == "a" and moved.case.remote_dir is None and moved.case.staged_at is None


def test_seats_follow_the_configured_depth_and_a_busy_seat_outlives_its_removal(conn):
    seats(conn, ("a", "gpu", 0), ("a", "gpu", 1))
    new_case(conn)
    claim = claim_next_case(conn, worker="w", now=NOW, lease_seconds=60)
    seats(conn, ("a", "gpu", 1 - claim.slot.seat))   # depth 2 -> 1, the other seat kept
    rows = conn.execute("SELECT seat, status FROM gpu_resources ORDER BY seat").fetchall()
    assert [tuple(r) for r in rows] == sorted([(claim.slot.seat, "assigned"), (1 - claim.slot.seat, "available")])
    assert release_slot_of(conn, claim.case, SlotStatus.AVAILABLE, now=NOW, worker="w")
    seats(conn, ("a", "gpu", 1 - claim.slot.seat))
    assert conn.execute("SELECT COUNT(*) FROM gpu_resources").fetchone()[0] == 1


def test_staging_leaves_the_head_of_the_queue_to_the_free_seats(conn):
    """Bug (test_e2e_clinic, urgent first): a pre-upload took the urgent case a freed seat was about
    to claim, so the claim passed it over and took the next one."""
    first, second, third = (new_case(conn, name, NOW + i) for i, name in enumerate(("a", "b", "c")))
    staged = claim_for_staging(conn, worker="stager", now=NOW + 10, lease_seconds=60, skip=1)
    assert staged.case_id == second.case_id
    assert claim_for_staging(conn, worker="stager", now=NOW + 10, lease_seconds=60).case_id == first.case_id


def test_a_registered_case_not_yet_moved_into_the_spool_is_neither_claimed_nor_pre_uploaded(conn):
    """Issue 16 (6a): the scanner registers a case, then moves its folder into spool/queued. In
    between, a pre-upload would tar a folder that is not where the row says; the claim waits too."""
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0, "0")], now=NOW, worker="t")
    waiting = new_case(conn, "still-in-drop-folder", NOW, moved=False)
    assert waiting.spool_stage == "incoming"
    assert claim_for_staging(conn, worker="stager", now=NOW + 1, lease_seconds=60) is None
    assert claim_next_case(conn, worker="sub", now=NOW + 1, lease_seconds=60) is None
    conn.execute("UPDATE cases SET spool_stage = 'queued' WHERE case_id = ?", (waiting.case_id,))
    assert claim_for_staging(conn, worker="stager", now=NOW + 2, lease_seconds=60).case_id == waiting.case_id
    release_staging(conn, waiting.case_id, worker="stager")
    assert claim_next_case(conn, worker="sub", now=NOW + 3, lease_seconds=60).case.case_id == waiting.case_id


def test_the_per_attempt_resets_name_case_columns_and_widen_in_order():
    from shared.store import ATTEMPT_CLEARS, CASE_FIELDS, CLAIM_CLEARS, RETRY_CLEARS, SUBMIT_CLEARS
    assert set(RETRY_CLEARS) <= CASE_FIELDS
    assert set(CLAIM_CLEARS) < set(SUBMIT_CLEARS) < set(ATTEMPT_CLEARS) < set(RETRY_CLEARS)


def test_a_process_forgets_the_heartbeats_of_loops_it_no_longer_runs(conn):
    """Bug: after a host left the config (or an upgrade renamed the stager loop), its loop's row
    stayed and the reaper and `mqic health` reported a stale worker for ever."""
    dead_pid = 2 ** 22 + 12345  # above Linux's pid_max: never a live process
    for name, pid in [("submitter@gpu1", os.getpid()), ("submitter@gone", os.getpid()),
                      ("submitter-stager", dead_pid), ("submitter-2", os.getppid()),
                      ("submitter", os.getpid()), ("poller@gone", dead_pid)]:
        conn.execute("INSERT INTO workers (name, pid, host, started_at, heartbeat) VALUES (?, ?, 'ws', 0, 0)",
                     (name, pid))
    conn.commit()

    retired = forget_retired_loops(conn, "submitter", {"submitter", "submitter@gpu1"})

    assert sorted(retired) == ["submitter-stager", "submitter@gone"]
    left = {row[0] for row in conn.execute("SELECT name FROM workers")}
    assert left == {"submitter", "submitter@gpu1", "submitter-2", "poller@gone"}  # another live process's, another family's
