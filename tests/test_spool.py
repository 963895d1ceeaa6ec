"""The spool invariant and its reconcile step, at every point where a crash can split a row from its folder."""
from __future__ import annotations

import os

import pytest

from shared.states import CaseStatus
from shared.spool import misplaced_cases, move_folder, reconcile, reject, settle_folder
from shared.store import get_case, register_case, transition

NOW = 1_700_000_000.0


def drop_case(tmp_path, name="case 1"):
    folder = tmp_path / "incoming" / name
    folder.mkdir(parents=True)
    (folder / "plan.dcm").write_bytes(b"x" * 10)
    return folder


def registered(conn, spool, tmp_path, name="case 1"):
    folder = drop_case(tmp_path, name)
    case = register_case(conn, case_name=name, source_path=str(folder), now=NOW, worker="scanner")
    return case, folder


def test_register_then_settle_moves_folder_into_queued(conn, spool, tmp_path):
    case, folder = registered(conn, spool, tmp_path)
    with spool.lock():
        target = settle_folder(conn, spool, case.case_id, now=NOW, worker="scanner")
    assert target == spool.root / "queued" / f"{case.case_id}_case 1"
    assert (target / "plan.dcm").exists() and not folder.exists()
    row = get_case(conn, case.case_id)
    assert (row.spool_stage, row.case_path) == ("queued", str(target))
    assert misplaced_cases(conn) == []


def test_crash_after_insert_before_move_is_repaired(conn, spool, tmp_path):
    case, folder = registered(conn, spool, tmp_path)  # the scanner died here
    assert [c.case_id for c in misplaced_cases(conn)] == [case.case_id]
    assert reconcile(conn, spool, now=NOW, worker="reaper") == 1
    assert not folder.exists()
    assert get_case(conn, case.case_id).spool_stage == "queued"


def test_crash_after_move_before_row_update_is_repaired(conn, spool, tmp_path):
    case, folder = registered(conn, spool, tmp_path)
    os.rename(folder, spool.root / "queued" / case.folder_name)  # moved, row not updated
    assert reconcile(conn, spool, now=NOW, worker="reaper") == 1
    row = get_case(conn, case.case_id)
    assert row.spool_stage == "queued" and os.path.isdir(row.case_path)


@pytest.mark.parametrize("path,stage", [
    ([CaseStatus.SUBMITTING, CaseStatus.RUNNING], "active"),
    ([CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.COMPLETED], "done"),
    ([CaseStatus.SUBMITTING, CaseStatus.FAILED], "failed"),
])
def test_crash_after_status_change_before_move_is_repaired(conn, spool, tmp_path, path, stage):
    case, _ = registered(conn, spool, tmp_path)
    with spool.lock():
        settle_folder(conn, spool, case.case_id, now=NOW, worker="scanner")
    frm = CaseStatus.SUBMITTED
    for to in path:  # status moves, but the worker dies before moving the folder
        assert transition(conn, case.case_id, frm, to, now=NOW, worker="w")
        frm = to
    assert reconcile(conn, spool, now=NOW, worker="reaper") == 1
    row = get_case(conn, case.case_id)
    assert row.spool_stage == stage
    assert (spool.root / stage / case.folder_name / "plan.dcm").exists()
    assert reconcile(conn, spool, now=NOW, worker="reaper") == 0  # idempotent


def test_folder_found_nowhere_flags_for_review_not_failure(conn, spool, tmp_path):
    case, folder = registered(conn, spool, tmp_path)
    (folder / "plan.dcm").unlink()
    folder.rmdir()
    assert reconcile(conn, spool, now=NOW, worker="reaper") == 0
    row = get_case(conn, case.case_id)
    assert row.status is CaseStatus.SUBMITTED and row.needs_review
    assert "case folder not found" in row.review_reason


def test_move_folder_refuses_to_overwrite_and_reports_lost_race(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        move_folder(tmp_path / "a", tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        move_folder(tmp_path / "missing", tmp_path / "c")


def test_reject_sets_item_aside_with_its_reason(spool, tmp_path):
    bad = tmp_path / "incoming" / "not-a-folder.txt"
    bad.parent.mkdir()
    bad.write_text("hi")
    dest = reject(spool, bad, "not a folder", now=NOW)
    assert not bad.exists() and dest.read_text() == "hi"
    assert "not a folder" in open(f"{dest}.reason.txt").read()


def test_reconcile_and_incoming_queries_use_partial_indexes(conn):
    from shared.spool import MISPLACED_SQL
    plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + MISPLACED_SQL, (10,)))
    assert "USING INDEX cases_misplaced" in plan
    plan = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT source_path FROM cases WHERE spool_stage = 'incoming'"))
    assert "USING INDEX cases_incoming" in plan
