"""Day-to-day clinic features driven tick by tick on real files, SQLite and (for retention) the real sshd:
priority, drain, results delivery, retention, notices, the readiness warning and their config errors."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sandbox.procs import processes_with
from shared.claims import claim_for_staging, claim_next_case
from shared.config import NOTIFY_EVENTS
from shared.db import connect, transaction
from shared.delivery import deliver_pending
from shared.errors import ConfigError
from shared.lifecycle import move_case
from shared.liveness import beat, note_remote
from shared.maintenance import drain, resume
from shared.notify import send_notifications
from shared.priority import PriorityRefused, set_priority
from shared.retention import apply_retention, inside_base
from shared.seats import transition_slot
from shared.settings import counters, get_setting
from shared.share_child import sha256_of
from shared.spool import settle_folder
from shared.states import CaseStatus, SlotStatus
from shared.store import flag_for_review, get_case, register_case
from shared.worker import build_context
from tests.conftest import cli, make_config, wait_until
from workers import scanner

T0 = 1_700_000_000.0
DAY = 86400.0
PAST = time.time() - 11 * DAY  # retention tests: delivery switched on then; `mqic cleanup` runs now
RESULTS = {"output/dose.raw": b"\x01" * 4000, "output/Dose.mhd": b"ObjectType = Image\n"}


def context(config, name="reaper"):
    ctx = build_context(config, name)
    beat(ctx.conn, name, now=time.time())
    return ctx


def new_case(ctx, name: str, at: float, *, files: dict[str, bytes] | None = None, priority: str = "normal"):
    """A registered case whose folder is in spool/queued (like the scanner leaves it)."""
    folder = ctx.config.scanner.watch_path / name
    folder.mkdir(parents=True)
    for relative, data in {"plan.in": b"plan\n", **(files or {})}.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    case = register_case(ctx.conn, case_name=name, source_path=str(folder), now=at, worker="test",
                         priority=priority)
    with ctx.spool.lock():
        settle_folder(ctx.conn, ctx.spool, case.case_id, now=at, worker="test")
    return get_case(ctx.conn, case.case_id)


def walk(ctx, case, *moves, at: float, **fields):
    """Move ``case`` through ``moves`` (statuses), setting ``fields`` on the last move."""
    for index, to in enumerate(moves):
        extra = fields if index == len(moves) - 1 else {}
        assert move_case(ctx.conn, ctx.spool, get_case(ctx.conn, case.case_id), to, now=at, worker="test",
                         fields=extra)
    return get_case(ctx.conn, case.case_id)


def fetch_record(files: dict[str, bytes]) -> str:
    """The record the poller keeps of fetched results: size and sha256 of each file."""
    return json.dumps({name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                       for name, data in files.items()}, sort_keys=True)


def completed(ctx, name: str, at: float, **fields):
    """A case that ran on host ``hpc`` (the one host of ``make_config``) and completed, its results
    fetched and recorded as the poller does."""
    case = new_case(ctx, name, at - 100, files=RESULTS)
    return walk(ctx, case, CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.COMPLETED, at=at,
                outcome="success", completed_at=at,
                **{"host": "hpc", "result_checksums": fetch_record(RESULTS), **fields})


def failed(ctx, name: str, at: float, **fields):
    case = new_case(ctx, name, at - 100)
    return walk(ctx, case, CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.FAILED, at=at,
                outcome="failed", completed_at=at, error_message="exit code 1", **{"host": "hpc", **fields})




# -- priority -------------------------------------------------------------------------------------

def test_claims_take_urgent_first_oldest_first_and_an_old_normal_case_is_not_starved(tmp_path):
    ctx = context(make_config(tmp_path))
    old = new_case(ctx, "old normal", T0)
    u1 = new_case(ctx, "urgent 1", T0 + 10, priority="urgent")
    n2 = new_case(ctx, "normal 2", T0 + 20)
    u2 = new_case(ctx, "urgent 2", T0 + 30, priority="urgent")
    late = new_case(ctx, "late urgent", T0 + 3610, priority="urgent")
    order = []
    for _ in range(5):
        claim = claim_next_case(ctx.conn, worker="t", now=T0 + 3615, lease_seconds=60, max_wait_seconds=3600)
        order.append(claim.case.case_id)
        transition_slot(ctx.conn, claim.slot, SlotStatus.ASSIGNED, SlotStatus.AVAILABLE, now=T0, worker="t",
                        case_id=claim.case.case_id)
    # "old normal" waited 3615 s > max_wait 3600 s: it counts as urgent and is the oldest of them;
    # "normal 2" waited 3595 s: still behind every urgent case
    assert order == [old.case_id, u1.case_id, u2.case_id, late.case_id, n2.case_id]


def test_without_the_wait_limit_urgent_cases_go_first_and_staging_follows_the_same_order(tmp_path):
    ctx = context(make_config(tmp_path))
    normal = new_case(ctx, "normal", T0)
    urgent = new_case(ctx, "urgent", T0 + 10, priority="urgent")
    staged = claim_for_staging(ctx.conn, worker="stager", now=T0 + 20, lease_seconds=60, max_wait_seconds=60)
    assert staged.case_id == urgent.case_id  # waited 10 s < 60 s: priority decides
    assert claim_for_staging(ctx.conn, worker="stager", now=T0 + 20, lease_seconds=60).case_id == normal.case_id


def test_drain_stops_claims_until_resume(tmp_path):
    ctx = context(make_config(tmp_path))
    case = new_case(ctx, "waits", T0)
    assert drain(ctx.conn, "hpc", now=T0, by="op", reason="driver update")
    assert not drain(ctx.conn, "hpc", now=T0 + 1, by="op2")  # the first drain is kept
    assert claim_next_case(ctx.conn, worker="t", now=T0 + 5, lease_seconds=60) is None
    ended = resume(ctx.conn, "hpc")
    assert (ended.drained_by, ended.reason, ended.since) == ("op", "driver update", T0)
    assert claim_next_case(ctx.conn, worker="t", now=T0 + 6, lease_seconds=60).case.case_id == case.case_id


def test_scanner_marks_urgent_by_marker_file_or_name_pattern(tmp_path):
    config = make_config(tmp_path, scanner={"quiescence_period_seconds": 0, "urgent_name_pattern": "^STAT_"})
    ctx = context(config, "scanner")
    watch = config.scanner.watch_path
    for name, marker in (("plain", None), ("marked", "_URGENT"), ("STAT_patient", None)):
        (watch / name).mkdir(parents=True)
        (watch / name / "plan.in").write_text("x")
        if marker:
            (watch / name / marker).write_text("")
    scanner.tick(ctx, T0)
    rows = {r["case_name"]: r["priority"] for r in ctx.conn.execute("SELECT case_name, priority FROM cases")}
    assert rows == {"plain": "normal", "marked": "urgent", "STAT_patient": "urgent"}
    detail = ctx.conn.execute("SELECT detail FROM case_events e JOIN cases c USING (case_id)"
                              " WHERE c.case_name = 'marked'").fetchone()[0]
    assert "urgent: marker file _URGENT" in detail


def test_operator_changes_priority_of_a_waiting_case_only(tmp_path, capsys):
    config = make_config(tmp_path)
    ctx = context(config)
    waiting = new_case(ctx, "waiting", T0)
    done = completed(ctx, "done", T0 + 10)
    code, out, err = cli(capsys, config, "priority", str(waiting.case_id), "urgent")
    assert code == 0 and "priority urgent (was normal)" in out, err
    assert get_case(ctx.conn, waiting.case_id).priority == "urgent"
    history = [e["detail"] for e in ctx.conn.execute("SELECT detail FROM case_events WHERE case_id = ?",
                                                        (waiting.case_id,))]
    assert history[-1] == "priority urgent (was normal)"
    code, _, err = cli(capsys, config, "priority", str(done.case_id), "urgent")
    assert code == 1 and "only a waiting (submitted) or failed case can change priority" in err
    code, _, err = cli(capsys, config, "priority", str(waiting.case_id), "soon")
    assert code == 2 and "invalid choice" in err
    with pytest.raises(PriorityRefused, match="not found"):
        set_priority(ctx.conn, 999, "urgent", now=T0, worker="t")
    code, out, _ = cli(capsys, config, "cases")
    assert "urgent" in [line.split()[2] for line in out.splitlines() if " waiting" in line]


# -- results delivery --------------------------------------------------------------------------------

def deliver_all(ctx, now: float, passes: int = 20) -> int:
    """Reaper passes at ``now`` (each delivers at most one case); how many were delivered."""
    return sum(deliver_pending(ctx, now) for _ in range(passes))


def delivery_config(tmp_path, **results):
    (tmp_path / "tps").mkdir(exist_ok=True)
    return make_config(tmp_path, hpc={"result_files": ["output/*"]},
                       results={"deliver_to": str(tmp_path / "tps"), "retry_seconds": 60, "expect_mount": False,
                                **results})


@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_delivery_copies_the_result_files_whole_with_checksums_and_an_event(tmp_path):
    config = delivery_config(tmp_path)
    ctx = context(config)
    assert deliver_pending(ctx, T0) == 0            # switched on now: earlier cases are not delivered
    case = completed(ctx, "pt 'A' $(id); 환자", T0 + 10)
    assert deliver_pending(ctx, T0 + 11) == 1
    target = config.results.deliver_to / case.case_name
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(RESULTS)
    assert not (target / "plan.in").exists()          # only the result files
    case = get_case(ctx.conn, case.case_id)
    sums = json.loads(case.result_checksums)        # the fetch record, which every copy was checked against
    assert sums == {name: {"size": (target / name).stat().st_size, "sha256": sha256_of(target / name)}
                    for name in RESULTS}
    assert (case.delivered_at, case.delivered_to, case.delivery_error) == (T0 + 11, str(target), None)
    assert case.status is CaseStatus.COMPLETED and Path(case.case_path).is_dir()
    assert [p.name for p in config.results.deliver_to.iterdir()] == [case.case_name]
    assert counters(ctx.conn)["results_delivered"] == 1
    assert deliver_pending(ctx, T0 + 12) == 0        # once


def test_cases_completed_before_delivery_was_switched_on_are_left_alone(tmp_path):
    config = delivery_config(tmp_path)
    ctx = context(config)
    old = completed(ctx, "old", T0)
    assert deliver_pending(ctx, T0 + 10) == 0
    assert get_case(ctx.conn, old.case_id).delivered_at is None and get_setting(ctx.conn, "results.deliver_since")


@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_failed_delivery_is_retried_shown_and_never_touches_the_case(tmp_path, capsys):
    config = delivery_config(tmp_path)
    ctx = context(config)
    deliver_pending(ctx, T0)
    case = completed(ctx, "blocked", T0 + 10)
    folder_before = sorted(p.name for p in Path(case.case_path).rglob("*"))
    # a file where the results go: the copy is made, checked, then refused; nothing is renamed
    blocker = config.results.deliver_to / "blocked"
    blocker.write_text("in the way")
    assert deliver_pending(ctx, T0 + 11) == 0
    row = get_case(ctx.conn, case.case_id)
    assert row.status is CaseStatus.COMPLETED and row.delivered_at is None and row.delivery_attempts == 1
    assert "Error" in row.delivery_error and row.next_delivery_at == T0 + 71
    assert sorted(p.name for p in Path(row.case_path).rglob("*")) == folder_before
    assert blocker.read_text() == "in the way" and [p.name for p in config.results.deliver_to.iterdir()] == ["blocked"]
    code, out, _ = cli(capsys, config, "cases")
    assert "DELIVERY FAILING" in out
    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "results delivery failing for 1 cases" in out
    assert deliver_pending(ctx, T0 + 30) == 0 and get_case(ctx.conn, case.case_id).delivery_attempts == 1  # waits
    blocker.unlink()
    assert deliver_pending(ctx, T0 + 71) == 1
    row = get_case(ctx.conn, case.case_id)
    assert row.delivery_error is None and row.delivery_attempts == 2
    assert (config.results.deliver_to / "blocked" / "output" / "dose.raw").read_bytes() == RESULTS["output/dose.raw"]
    events = [r[0] for r in ctx.conn.execute("SELECT detail FROM case_events WHERE case_id = ?", (case.case_id,))]
    assert sum("delivery failed" in e for e in events) == 1 and "results delivered to" in events[-1]


@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_an_earlier_folder_of_the_same_name_is_replaced_and_a_file_is_refused(tmp_path):
    config = delivery_config(tmp_path, checksums=False)
    ctx = context(config)
    deliver_pending(ctx, T0)
    old = config.results.deliver_to / "again"
    (old / "output").mkdir(parents=True)
    (old / "output" / "stale.raw").write_text("old")
    (config.results.deliver_to / "clash").write_text("a file")
    again, clash = completed(ctx, "again", T0 + 10), completed(ctx, "clash", T0 + 10)
    assert deliver_all(ctx, T0 + 11) == 1
    assert sorted(p.name for p in (old / "output").iterdir()) == ["Dose.mhd", "dose.raw"]
    assert get_case(ctx.conn, again.case_id).result_checksums == fetch_record(RESULTS)  # the fetch record stays
    assert "exists and is not a folder" in get_case(ctx.conn, clash.case_id).delivery_error
    assert sorted(p.name for p in config.results.deliver_to.iterdir()) == ["again", "clash"]


def test_a_case_without_result_files_is_not_delivered_and_says_why(tmp_path):
    config = delivery_config(tmp_path)
    ctx = context(config)
    deliver_pending(ctx, T0)
    case = walk(ctx, new_case(ctx, "empty", T0), CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.COMPLETED,
                at=T0 + 10, completed_at=T0 + 10, host="hpc")
    deliver_pending(ctx, T0 + 11)
    assert "no result files (output/*)" in get_case(ctx.conn, case.case_id).delivery_error


# -- retention ------------------------------------------------------------------------------------

def remote_folder(ctx, case, base: str) -> str:
    path = f"{base}/{case.folder_name}"
    os.makedirs(f"{path}/output", exist_ok=True)
    Path(f"{path}/output/dose.raw").write_bytes(b"remote")
    return path


@pytest.fixture
def retained(hpc, tmp_path):
    """A real HPC, delivery on since ``PAST`` and both retention rules (remote 10 days, local 30 days)."""
    (tmp_path / "tps").mkdir()
    h = hpc(results={"deliver_to": str(tmp_path / "tps"), "expect_mount": False},
            retention={"remote_days": 10, "local_days": 30})
    ctx = context(h.config)
    deliver_pending(ctx, PAST)  # delivery switched on 11 days ago
    return ctx, ctx.hosts["hpc"].remote.base_dir()


def test_retention_removes_exactly_what_its_rules_allow(retained, capsys):
    ctx, base = retained
    cases = {}

    def add(name, maker, **fields):
        case = maker(ctx, name, PAST + 10)
        remote_dir = remote_folder(ctx, case, base)
        with transaction(ctx.conn):
            ctx.conn.execute("UPDATE cases SET remote_dir = ? WHERE case_id = ?", (remote_dir, case.case_id))
        for key, value in fields.items():
            with transaction(ctx.conn):
                ctx.conn.execute(f"UPDATE cases SET {key} = ? WHERE case_id = ?", (value, case.case_id))
        cases[name] = get_case(ctx.conn, case.case_id)

    add("done", completed)
    add("undelivered", completed)
    add("flagged", completed)
    add("altered", completed)
    add("failed", failed)
    add("acked", failed)
    add("acked, task may run", failed)
    add("recent", completed, completed_at=PAST + 2 * DAY)  # ended 9 days ago
    assert deliver_all(ctx, PAST + 11) == 5
    for name in ("undelivered",):
        with transaction(ctx.conn):
            ctx.conn.execute("UPDATE cases SET delivered_at = NULL, delivery_error = 'share offline'"
                             " WHERE case_id = ?", (cases[name].case_id,))
    flag_for_review(ctx.conn, get_case(ctx.conn, cases["flagged"].case_id), "looks odd", now=PAST, worker="t")
    (Path(cases["altered"].case_path) / "output" / "dose.raw").write_bytes(b"changed")
    for name in ("acked", "acked, task may run"):
        assert cli(capsys, ctx.config, "ack", str(cases[name].case_id))[0] == 0
    with transaction(ctx.conn):
        ctx.conn.execute("UPDATE gpu_resources SET status = 'zombie', assigned_case_id = ? WHERE pueue_group = 'gpu_a'",
                         (cases["acked, task may run"].case_id,))

    code, out, _ = cli(capsys, ctx.config, "cleanup", "--dry-run")  # nothing happens, only a plan
    assert code == 0 and "2 folders would be removed" in out
    assert all(os.path.isdir(c.remote_dir) for c in cases.values())
    assert "not acknowledged (`mqic ack" in out and "results not delivered yet (share offline)" in out

    assert apply_retention(ctx, time.time()) == 2
    gone = {name for name, c in cases.items() if not os.path.isdir(c.remote_dir)}
    assert gone == {"done", "acked"}
    assert get_case(ctx.conn, cases["altered"].case_id).needs_review  # its local results changed: look at it
    assert all(Path(c.case_path).is_dir() for c in cases.values())     # local_days is 30
    assert counters(ctx.conn)["retention_remote_removed"] == 2

    assert apply_retention(ctx, PAST + 31 * DAY) == 2  # "done" goes locally, "recent" remotely
    rows = {name: get_case(ctx.conn, c.case_id) for name, c in cases.items()}
    assert {n for n, r in rows.items() if r.local_removed_at} == {"done"}
    assert not Path(rows["done"].case_path).exists() and rows["done"].status is CaseStatus.COMPLETED
    assert Path(rows["acked"].case_path).is_dir()                         # failed folders stay local
    assert rows["recent"].remote_removed_at == PAST + 31 * DAY              # 10 days after it ended
    assert not any(ctx.spool.root.joinpath(".staging").iterdir())
    events = [r[0] for r in ctx.conn.execute("SELECT detail FROM case_events WHERE case_id = ?",
                                             (rows["done"].case_id,))]
    assert any("remote folder" in e and "removed by retention" in e for e in events)
    assert any("local folder" in e and "removed by retention" in e for e in events)


def test_retention_leaves_a_drained_host_alone_and_refuses_folders_outside_the_base(retained, tmp_path):
    ctx, base = retained
    case = completed(ctx, "outside", PAST + 10)
    outside = tmp_path / "precious"
    outside.mkdir()
    with transaction(ctx.conn):
        ctx.conn.execute("UPDATE cases SET remote_dir = ? WHERE case_id = ?", (str(outside), case.case_id))
    link = completed(ctx, "link", PAST + 10)
    os.symlink(outside, f"{base}/{link.folder_name}")
    with transaction(ctx.conn):
        ctx.conn.execute("UPDATE cases SET remote_dir = ? WHERE case_id = ?", (f"{base}/{link.folder_name}",
                                                                              link.case_id))
    deliver_all(ctx, PAST + 11)
    drain(ctx.conn, "hpc", now=PAST, by="op")
    assert apply_retention(ctx, time.time()) == 0 and not get_case(ctx.conn, case.case_id).needs_review
    resume(ctx.conn, "hpc")
    assert apply_retention(ctx, time.time()) == 0
    assert outside.is_dir() and os.path.islink(f"{base}/{link.folder_name}")
    assert "not a folder directly inside" in get_case(ctx.conn, case.case_id).review_reason
    assert "outside" in get_case(ctx.conn, link.case_id).review_reason
    assert not inside_base("/base", "/base/../etc") and not inside_base("/base", "/base") \
        and inside_base("/base", "/base/7_x")


def test_mqic_cleanup_removes_what_the_plan_allows_and_reports_it(retained, capsys):
    ctx, base = retained
    case = completed(ctx, "old", PAST - 40 * DAY)  # before delivery was switched on: not due
    remote_dir = remote_folder(ctx, case, base)
    with transaction(ctx.conn):
        ctx.conn.execute("UPDATE cases SET remote_dir = ? WHERE case_id = ?", (remote_dir, case.case_id))
    code, out, _ = cli(capsys, ctx.config, "cleanup")
    assert code == 0 and "2 folders removed" in out, out
    assert "removed      remote case" in out and "removed      local  case" in out
    assert not os.path.exists(remote_dir) and not Path(case.case_path).exists()


def test_local_folder_gone_without_retention_is_flagged_not_marked(retained):
    ctx, _ = retained
    case = completed(ctx, "vanished", PAST - 40 * DAY)
    shutil.rmtree(case.case_path)
    assert apply_retention(ctx, PAST + 1) == 0
    row = get_case(ctx.conn, case.case_id)
    assert row.needs_review and "missing" in row.review_reason and row.local_removed_at is None


# -- notices --------------------------------------------------------------------------------------------

RECORDER = """import json, os, sys
line = sys.stdin.read()
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"stdin": json.loads(line), "summary": os.environ["MQIC_SUMMARY"]}) + "\\n")
"""


def notify_config(tmp_path, command, **notify):
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    return make_config(tmp_path, notify={"command": command, "timeout_seconds": 2, "retry_seconds": 5,
                                         "unreachable_after_minutes": 10, **notify})


def settle(ctx, now, condition, timeout=10):
    return wait_until(lambda: (send_notifications(ctx, now), condition())[1], timeout=timeout, interval=0.05,
                      message="notices settled")


@pytest.mark.system
def test_completed_failed_and_flagged_cases_reach_the_notifier_as_json(tmp_path):
    log = tmp_path / "notices.jsonl"
    config = notify_config(tmp_path, [sys.executable, str(tmp_path / "recorder.py"), str(log)])
    ctx = context(config)
    before = completed(ctx, "before", time.time() - 5)  # before notices were switched on: not sent
    now = time.time() + 1
    send_notifications(ctx, now)
    ok = completed(ctx, "ok", now + 1)
    bad = failed(ctx, "bad", now + 2)
    flag_for_review(ctx.conn, get_case(ctx.conn, ok.case_id), "odd", now=now + 3, worker="reaper")
    settle(ctx, now + 4, lambda: log.exists() and len(log.read_text().splitlines()) == 3)
    got = [json.loads(line) for line in log.read_text().splitlines()]
    by_event = {g["stdin"]["event"]: g for g in got}
    assert set(by_event) == {"case_completed", "case_failed", "case_flagged"}
    assert by_event["case_failed"]["stdin"]["case_id"] == bad.case_id
    assert by_event["case_failed"]["stdin"]["error"] == "exit code 1"
    assert by_event["case_flagged"]["summary"] == f"MQIC: case {ok.case_id} 'ok' needs review: odd"
    assert all(g["stdin"]["case_id"] != before.case_id for g in got)
    settle(ctx, now + 5, lambda: counters(ctx.conn).get("notices_sent") == 3)
    assert ctx.conn.execute("SELECT COUNT(*) FROM notices WHERE sent_at IS NULL").fetchone()[0] == 0


@pytest.mark.system
def test_a_hanging_notifier_never_holds_up_a_tick_and_is_killed_then_given_up(tmp_path):
    token = f"hang-{os.getpid()}-{time.time_ns()}"
    config = notify_config(tmp_path, [sys.executable, "-c", "import sys, time; time.sleep(3600)", token],
                           max_attempts=2, timeout_seconds=1)
    ctx = context(config)
    now = time.time()
    send_notifications(ctx, now)
    for name in ("a", "b"):
        completed(ctx, name, now + 1)
    started = time.monotonic()
    for _ in range(5):
        send_notifications(ctx, now + 2)
    assert time.monotonic() - started < 0.5                   # a notifier started, never waited for
    [sending] = ctx.memory.notices_sending.values()
    assert sending.process.poll() is None
    settle(ctx, now + 2, lambda: ctx.conn.execute("SELECT COUNT(*) FROM notices WHERE last_error IS NOT NULL"
                                                  ).fetchone()[0] == 2)
    assert processes_with(token) == []                         # killed at the time limit
    errors = {r[0] for r in ctx.conn.execute("SELECT last_error FROM notices")}
    assert errors == {"no answer within 1 s (killed)"}
    settle(ctx, now + 8, lambda: ctx.conn.execute("SELECT COUNT(*) FROM notices WHERE gave_up_at IS NOT NULL"
                                                  ).fetchone()[0] == 2)
    assert counters(ctx.conn)["notices_failed"] == 4 and processes_with(token) == []


@pytest.mark.system
def test_failing_or_missing_notifier_is_recorded_with_its_error(tmp_path):
    config = notify_config(tmp_path, [sys.executable, "-c", "import sys; print('smtp down', file=sys.stderr); sys.exit(3)"])
    ctx = context(config)
    now = time.time()
    send_notifications(ctx, now)
    completed(ctx, "x", now + 1)
    settle(ctx, now + 2, lambda: ctx.conn.execute("SELECT last_error FROM notices").fetchone()[0])
    assert ctx.conn.execute("SELECT last_error FROM notices").fetchone()[0] == "exit code 3: smtp down"
    missing = notify_config(tmp_path / "m", ["/nonexistent/notifier"])
    ctx2 = context(missing)
    send_notifications(ctx2, now)
    completed(ctx2, "y", now + 1)
    send_notifications(ctx2, now + 2)
    assert "cannot start /nonexistent/notifier" in ctx2.conn.execute("SELECT last_error FROM notices").fetchone()[0]


@pytest.mark.system
def test_an_hpc_outage_is_reported_once_after_the_limit_and_its_end_once(tmp_path):
    log = tmp_path / "notices.jsonl"
    config = notify_config(tmp_path, [sys.executable, str(tmp_path / "recorder.py"), str(log)],
                           events=["unreachable"])
    ctx = context(config)
    beat(ctx.conn, "poller", now=T0)
    note_remote(ctx.conn, "hpc", "poller", ok=False, now=T0, error="Unreachable: no answer within 20s")
    send_notifications(ctx, T0)                              # outage starts at T0
    send_notifications(ctx, T0 + 9 * 60)                     # 9 min: not yet
    assert ctx.conn.execute("SELECT COUNT(*) FROM notices").fetchone()[0] == 0
    note_remote(ctx.conn, "hpc", "poller", ok=False, now=T0 + 10 * 60, error="Unreachable: no answer within 20s")
    send_notifications(ctx, T0 + 10 * 60)
    send_notifications(ctx, T0 + 20 * 60)                    # once per outage (its notifier may still run)
    note_remote(ctx.conn, "hpc", "poller", ok=True, now=T0 + 21 * 60)
    send_notifications(ctx, T0 + 21 * 60)
    settle(ctx, T0 + 21 * 60, lambda: counters(ctx.conn).get("notices_sent") == 2)
    got = [json.loads(line)["stdin"] for line in log.read_text().splitlines()]
    assert [g["event"] for g in got] == ["hpc_unreachable", "hpc_reachable"]
    assert "UNREACHABLE for 10 min: Unreachable: no answer" in got[0]["text"]
    assert "reachable again after 21 min" in got[1]["text"]


# -- readiness, config -----------------------------------------------------------------------------------

@pytest.mark.system
def test_doctor_warns_without_a_ready_marker_or_a_quiet_period_of_30_seconds(tmp_path, capsys):
    config = make_config(tmp_path)  # quiet period 2 s, no marker; the HPC does not answer
    code, out, _ = cli(capsys, config, "doctor")
    assert "WARN readiness: no scanner.ready_marker and a quiet period of only 2 s" in out
    assert "ready marker" in out.split("WARN readiness")[1]
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    config = make_config(tmp_path / "b", scanner={"quiescence_period_seconds": 30})
    assert "OK   readiness: a folder is taken after 30 s" in cli(capsys, config, "doctor")[1]
    config = make_config(tmp_path / "c", scanner={"ready_marker": "_CASE_READY"})
    assert "OK   readiness: a folder is taken once _CASE_READY exists" in cli(capsys, config, "doctor")[1]


BAD = [
    ({"scanner": {"urgent_marker": "a/b"}}, "scanner.urgent_marker: got 'a/b', expected a plain file name"),
    ({"scanner": {"ready_marker": "_GO", "urgent_marker": "_GO"}}, "scanner.urgent_marker: got '_GO', expected a name other"),
    ({"scanner": {"urgent_name_pattern": "(x"}}, "scanner.urgent_name_pattern: got '(x', expected a regular expression"),
    ({"scheduling": {"max_wait_minutes": 0}}, "scheduling.max_wait_minutes: got 0, expected a number > 0"),
    ({"results": {"deliver_to": "/srv/tps"}}, "results.deliver_to: got '/srv/tps', expected result_files of host hpc"),
    ({"results": {"deliver_to": "incoming/x"}, "hpc": {"result_files": ["out/*"]}},
     "expected a folder outside scanner.watch_path"),
    ({"results": {"checksums": "yes"}}, "results.checksums: got 'yes', expected true or false"),
    ({"retention": {"remote_days": -1}}, "retention.remote_days: got -1, expected a number > 0"),
    ({"retention": {"remote_days": 7}}, "retention.remote_days: got 7, expected result_files of host hpc"),
    ({"retention": {"local_dayz": 7}}, "retention.local_dayz: unknown key"),
    ({"notify": {"command": "curl -d @- https://x"}}, "notify.command: got 'curl -d @- https://x', expected a list"),
    ({"notify": {"events": ["done"]}}, f"notify.events: got ['done'], expected a list of {', '.join(NOTIFY_EVENTS)}"),
    ({"notify": {"timeout_seconds": 0}}, "notify.timeout_seconds: got 0, expected a number > 0"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_clinic_config_mistakes_are_named_precisely(tmp_path, override, message):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, **override)
    assert message in str(caught.value)


def test_clinic_config_defaults(tmp_path):
    config = make_config(tmp_path)
    assert config.scanner.urgent_marker == "_URGENT" and config.scanner.urgent_name_pattern is None
    assert config.scheduling.max_wait_seconds == 3600
    assert config.results.deliver_to is None and config.results.checksums is True
    assert (config.retention.remote_days, config.retention.local_days) == (None, None)
    assert config.notify.command == () and config.notify.events == NOTIFY_EVENTS


def test_migration_adds_the_columns_and_starts_the_notice_cursor_at_the_newest_event(tmp_path):
    from shared.db import MIGRATIONS, migrate_schema
    conn = connect(tmp_path / "old.db", migrate=False)
    ours = next(i for i, script in enumerate(MIGRATIONS) if "CREATE TABLE drains" in script)
    migrate_schema(conn, target=ours)  # the schema just before this migration
    with transaction(conn):  # a slot row as the versions of then wrote it
        conn.execute("INSERT INTO gpu_resources (pueue_group, status, gpu, updated_at)"
                     " VALUES ('gpu_a', 'available', '0', ?)", (T0,))
        conn.execute("INSERT INTO cases (case_name, case_path, source_path, spool_stage, status, submitted_at,"
                     " status_updated_at) VALUES ('x', '/p', '/p', 'queued', 'submitted', 1, 1)")
        conn.execute("INSERT INTO case_events (case_id, to_status, at, worker) VALUES (1, 'submitted', 1, 't')")
    migrate_schema(conn)
    assert get_case(conn, 1).priority == "normal" and int(get_setting(conn, "notify.cursor")) == 1
    conn.close()


# -- the README's two notifier examples, run as written ----------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_notify_examples() -> list[dict]:
    blocks = README.read_text().split("```yaml\n")[1:]
    return [yaml.safe_load(block.split("```")[0])["notify"] for block in blocks if block.startswith("notify:")]


def run_example(tmp_path, notify: dict, case_maker) -> None:
    ctx = context(make_config(tmp_path, notify={**notify, "timeout_seconds": 10}))
    now = time.time()
    send_notifications(ctx, now)
    case_maker(ctx, now + 1)
    settle(ctx, now + 2, lambda: counters(ctx.conn).get("notices_sent", 0) + counters(ctx.conn).get("notices_failed", 0))
    assert counters(ctx.conn).get("notices_sent") == 1, ctx.conn.execute("SELECT last_error FROM notices").fetchall()


@pytest.mark.system
def test_readme_mail_example_sends_a_mail_through_sendmail(tmp_path, monkeypatch):
    mail, = [n for n in readme_notify_examples() if "sendmail" in " ".join(n["command"])]
    fake = tmp_path / "sendmail"
    fake.write_text('#!/bin/sh\n[ "$1" = "-t" ] || exit 9\ncat > "$FAKE_SENDMAIL_OUT"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_SENDMAIL_OUT", str(tmp_path / "mail.txt"))
    mail["command"] = [word.replace("/usr/sbin/sendmail", str(fake)) for word in mail["command"]]
    run_example(tmp_path, mail, lambda ctx, at: (completed(ctx, "fine", at), failed(ctx, "pt 'x'\nBcc: evil", at)))
    headers, body = (tmp_path / "mail.txt").read_text().split("\n\n", 1)
    assert headers.splitlines() == ["To: physics-oncall@hospital.example",
                                    "Subject: MQIC: case 2 \"pt 'x'\\nBcc: evil\" FAILED (failed): exit code 1"]
    assert json.loads(body)["event"] == "case_failed"   # the completed case is not in this example's events


@pytest.mark.system
def test_readme_webhook_example_posts_the_json_with_curl(tmp_path):
    hook, = [n for n in readme_notify_examples() if n["command"][0] == "curl"]
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hooks/3f9a1c"
        hook["command"] = [url if word.startswith("https://") else word for word in hook["command"]]
        run_example(tmp_path, hook, lambda ctx, at: completed(ctx, "pt_0042", at))
    finally:
        server.shutdown()
    [(path, content_type, payload)] = received
    assert path == "/hooks/3f9a1c" and content_type == "application/json"
    assert payload["text"] == "MQIC: case 1 'pt_0042' completed" and payload["event"] == "case_completed"


def test_the_day_to_day_queries_read_only_their_partial_indexes(tmp_path):
    """With 100,000 completed cases, a pass must not read them all: each query searches the index
    that holds only the rows it is about (undelivered, not yet removed remotely or locally)."""
    from shared import queries
    from shared import delivery, notify, retention
    conn = connect(tmp_path / "plans.db")

    def plan(sql: str, params) -> str:
        return " | ".join(r["detail"] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))

    expected = [
        (queries.UNDELIVERED_SQL, (), "cases_undelivered"),
        (delivery.DUE_SQL, {"since": 1, "now": 2, "limit": 3}, "cases_undelivered"),
        (retention.REMOTE_DUE_SQL + retention.ORDER, {"cutoff": 1, "since": 2, "limit": 3}, "cases_remote_kept"),
        (retention.REMOTE_CANDIDATES_SQL + retention.ORDER, {"cutoff": 1, "limit": 3}, "cases_remote_kept"),
        (retention.LOCAL_DUE_SQL + retention.ORDER, {"cutoff": 1, "since": 2, "limit": 3}, "cases_local_kept"),
        (notify.CLAIM_SQL, {"w": "x", "now": 1, "lease": 2}, "notices_due"),
        (queries.NOTICES_SQL, (), "notices_due"),
    ]
    for sql, params, index in expected:
        details = plan(sql, params)
        assert f"USING INDEX {index}" in details and "TEMP B-TREE" not in details, (sql, details)
    assert "USING INTEGER PRIMARY KEY (rowid>?)" in plan(notify.EVENTS_SQL, (1, 2))  # only the new events
    conn.close()


def test_an_operators_retry_waits_its_turn_behind_urgent_cases(tmp_path):
    """Bug: a retry kept the drop time, so an old normal case counted as waiting past
    scheduling.max_wait_minutes and was claimed before urgent cases already waiting."""
    from shared.actions import Operator, retry
    ctx = context(make_config(tmp_path))
    old = failed(ctx, "old normal", T0, host=None)
    urgent = new_case(ctx, "urgent", T0 + 5000, priority="urgent")
    assert retry(Operator(ctx.conn, ctx.config, "operator"), [old.case_id], now=T0 + 5005)[0][1].startswith("failed")
    retried = get_case(ctx.conn, old.case_id)
    assert retried.submitted_at == T0 + 5005
    claim = claim_next_case(ctx.conn, worker="t", now=T0 + 5010, lease_seconds=60, max_wait_seconds=3600)
    assert claim.case.case_id == urgent.case_id
    first_event = ctx.conn.execute("SELECT at FROM case_events WHERE case_id = ? ORDER BY event_id LIMIT 1",
                                   (old.case_id,)).fetchone()[0]
    assert first_event == T0 - 100  # the drop time stays in the history
