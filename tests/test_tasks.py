"""shared.tasks: resolving a case's task, its exit record, stopping it, orphans and attempts."""
from __future__ import annotations

import dataclasses
import subprocess
import time
from datetime import datetime, timezone

import pytest

from shared import tasks
from shared.backends import model, pueue
from shared.errors import BadOutput, ClaimExpired, RemoteError, SchedulerOutage, Unreachable
from shared.backends.pueue import PueueBackend
from shared.remote import Remote, TransferUnsupported, UnsafeControlDir
from shared.states import CaseStatus
from shared.store import get_case, register_case, update_case
from tests.conftest import wait_until

T = model.TaskState


def task(task_id, label, state, **extra) -> model.TaskInfo:
    return model.TaskInfo(id=task_id, label=label, group="gpu_a", state=state, **extra)


def snapshot(*items, hpc_time=None, host="hpc") -> model.Snapshot:
    return model.Snapshot(tasks={t.id: t for t in items}, hpc_time=hpc_time, host=host)


@pytest.fixture
def case(conn):
    registered = register_case(conn, case_name="c", source_path="/x", now=0, worker="t")
    update_case(conn, registered.case_id, CaseStatus.SUBMITTED,
                {"task_id": 4, "remote_dir": "/hpc/1_c", "status": "running", "host": "hpc"})
    return dataclasses.replace(get_case(conn, registered.case_id), status=CaseStatus.RUNNING)


def test_resolve_reads_the_recorded_task_only_while_it_carries_our_label(case):
    assert tasks.resolve(case, snapshot(task(4, case.label, T.RUNNING))).found is tasks.Found.RUNNING
    assert tasks.resolve(case, snapshot(task(4, case.label, T.QUEUED))).found is tasks.Found.WAITING
    done = tasks.resolve(case, snapshot(task(4, case.label, T.FAILED, exit_code=3)))
    assert (done.found, done.result, done.exit_code) == (tasks.Found.FINISHED, T.FAILED, 3)
    reused = snapshot(task(4, "other_user_job", T.RUNNING))
    assert tasks.resolve(case, reused).found is tasks.Found.UNKNOWN          # its record was not read
    assert tasks.needs_record(case, reused)


@pytest.mark.parametrize("record, found, result", [
    (0, tasks.Found.FINISHED, T.SUCCESS),
    (2, tasks.Found.FINISHED, T.FAILED),
    (tasks.Record.MISSING, tasks.Found.ABSENT, None),
    (tasks.Record.UNREADABLE, tasks.Found.UNKNOWN, None),
])
def test_a_forgotten_task_is_resolved_from_its_exit_record(case, record, found, result):
    link = tasks.resolve(case, snapshot(), {case.remote_dir: record})
    assert (link.found, link.result, link.from_record) == (found, result, found is tasks.Found.FINISHED)


def test_an_unknown_pueue_state_is_could_not_tell(case):
    assert tasks.resolve(case, snapshot(task(4, case.label, T.UNKNOWN))).found is tasks.Found.UNKNOWN


def test_overdue_only_on_the_hpc_clock_and_only_while_running(case):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    running = task(4, case.label, T.RUNNING, start=start)
    link = tasks.resolve(case, snapshot(running))
    assert not tasks.overdue(link, snapshot(running), 60)                     # no HPC clock: never
    assert not tasks.overdue(link, snapshot(running, hpc_time=start.timestamp() + 59), 60)
    assert tasks.overdue(link, snapshot(running, hpc_time=start.timestamp() + 61), 60)
    queued = task(4, case.label, T.QUEUED)
    assert not tasks.overdue(tasks.resolve(case, snapshot(queued)), snapshot(queued, hpc_time=1e12), 60)


def test_orphans_are_our_labelled_unfinished_tasks_that_no_case_owns(case):
    submitting = dataclasses.replace(case, case_id=2, status=CaseStatus.SUBMITTING, slot="gpu_a")
    completed = dataclasses.replace(case, case_id=3, status=CaseStatus.COMPLETED)
    snap = snapshot(task(4, case.label, T.RUNNING), task(5, case.label, T.QUEUED),
                    task(6, "mqic_case_2", T.RUNNING), task(7, "mqic_case_3", T.RUNNING),
                    task(8, "mqic_case_3", T.SUCCESS), task(9, "mqic_case_99", T.RUNNING),
                    task(10, "someone_else", T.RUNNING),
                    dataclasses.replace(task(11, "mqic_case_2", T.QUEUED), group="gpu_b"))
    cases = {c.case_id: c for c in (case, submitting, completed)}
    assert tasks.our_case_ids(snap) == [1, 2, 3, 99]
    assert sorted(t.id for t, _ in tasks.orphans(snap, cases)) == [5, 7, 11]   # 11: not the claimed slot's group


def test_a_case_owns_no_task_on_a_host_it_does_not_live_on(case):
    """A case that moved to host b before it ever started on host a: a late add on a is an orphan."""
    on_a = snapshot(task(4, case.label, T.RUNNING), host="a")
    moved = dataclasses.replace(case, host="b")
    assert [t.id for t, _ in tasks.orphans(on_a, {case.case_id: moved})] == [4]
    assert tasks.orphans(on_a, {case.case_id: dataclasses.replace(case, host="a")}) == []


@pytest.mark.parametrize("error, counted", [
    (Unreachable("ssh: connect: Connection refused"), False),
    (BadOutput("garbage"), False),
    (SchedulerOutage(["pueue"], 1, 'I/O error at path "/run/pueue.socket" while connecting to daemon'), False),
    (RemoteError(["scp"], 1, "scp: /x: Permission denied"), True),
    (ClaimExpired("claim of submitter:1 expired"), True),
    (TransferUnsupported(["scp upload"], 255, "scp: Connection closed; set hpc.transfer: tar"), False),
    (UnsafeControlDir("/tmp/mqic-ssh-0 is a symlink"), False),
])
def test_only_a_failure_of_the_case_counts_as_an_attempt(error, counted):
    assert tasks.counts_as_attempt(error) is counted


@pytest.mark.parametrize("command, code", [("true", 0), ("exit 3", 3), ("cd /; exit 5", 5),
                                           ("echo hi; false", 1)])
@pytest.mark.system
def test_the_wrapper_records_the_exit_status_in_the_case_folder(tmp_path, command, code):
    result = subprocess.run(["sh", "-c", tasks.wrap_command(command)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == code
    assert (tmp_path / ".mqic" / "exit_status").read_text().strip() == str(code)
    assert not (tmp_path / ".mqic" / "exit_status.part").exists()


def test_exit_records_and_output_tail_are_read_in_one_call_each(hpc, tmp_path):
    h = hpc()
    remote = Remote(h.config.hosts[0].hpc)
    done, running, gone = tmp_path / "done dir", tmp_path / "running", tmp_path / "gone"
    for folder in (done, running):
        (folder / ".mqic").mkdir(parents=True)
    (done / ".mqic" / "exit_status").write_text("7\n")
    (done / ".mqic" / "output.log").write_text("a\nb\nFATAL ERROR: x\n")
    records = tasks.read_exit_records(remote, [str(done), str(running), str(gone)])
    assert records == {str(done): 7, str(running): tasks.Record.MISSING, str(gone): tasks.Record.MISSING}
    assert tasks.read_output_tail(remote, str(done), 2).splitlines() == ["b", "FATAL ERROR: x"]


def test_stop_sends_sigterm_then_sigkill_after_the_grace(hpc, conn, case, tmp_path):
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    remote, cmd = Remote(h.config.hosts[0].hpc), list(h.config.hosts[0].hpc.pueue_command)
    pueue.ensure_groups(remote, cmd, {"gpu_a": 1})
    stubborn = pueue.submit(remote, cmd, group="gpu_a", label=case.label, workdir=str(tmp_path),
                            command="trap '' TERM; sleep 60")
    wait_until(lambda: pueue.statuses(remote, cmd).tasks[stubborn].state is T.RUNNING, message="running")
    backend = PueueBackend(remote, cmd, 20)
    failed = dataclasses.replace(case, status=CaseStatus.FAILED)
    conn.execute("UPDATE cases SET status = 'failed' WHERE case_id = ?", (case.case_id,))
    mine = tasks.unfinished(failed, pueue.statuses(remote, cmd))
    assert tasks.stop(conn, backend, 10, failed, mine, now=100) == [f"sigterm {stubborn}"]
    failed = get_case(conn, case.case_id)
    assert failed.stop_requested_at == 100
    time.sleep(1)
    assert pueue.statuses(remote, cmd).tasks[stubborn].state is T.RUNNING         # it ignores SIGTERM
    mine = tasks.unfinished(failed, pueue.statuses(remote, cmd))
    assert tasks.stop(conn, backend, 10, failed, mine, now=105) == []           # within the grace
    assert tasks.stop(conn, backend, 10, failed, mine, now=111) == [f"sigkill {stubborn}"]
    wait_until(lambda: pueue.statuses(remote, cmd).tasks[stubborn].state is T.KILLED, message="killed")


def test_stop_refuses_a_task_without_the_case_label(conn, case):
    with pytest.raises(ValueError):
        tasks.stop(conn, None, 1, case, [task(4, "other", T.RUNNING)], now=0)
