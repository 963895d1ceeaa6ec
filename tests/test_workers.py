"""Each worker's tick driven through its branches.

The fast tier drives them on the HPC in memory (``tests/memory_hpc.py``, the ``memory_hpc``
fixture) with its injected clock: time on the HPC passes only by ``clock.advance``. The few
tests at the end need the real thing (the real sshd and the pueue stand-in: the remote shell's
own errors, the CLI's own connection, the submitter process's threads) and stay in the system tier.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from shared.errors import BadOutput, RemoteError
from shared.liveness import down_hosts
from shared.recovery import recover_expired_claims
from shared.states import CaseStatus, SlotStatus
from shared.store import case_events, get_case
from shared.worker import build_context, wake_loops
from tests.conftest import get_slot, wait_until
from tests.memory_hpc import MOQUI_COMMAND, sleeps
from workers import poller, reaper, scanner, submitter

FINAL = (CaseStatus.COMPLETED, CaseStatus.FAILED)


def ctx_for(hpc_obj, name="test"):
    ctx = build_context(hpc_obj.config, name)
    ctx.clock = time.time
    return ctx


def drop(config, name, **kwargs):
    kwargs.setdefault("seconds", 0.2)
    kwargs.setdefault("batches", 4)
    kwargs.setdefault("deliveries", 1)
    kwargs.setdefault("layers_per_delivery", 2)
    return make_case(config.scanner.watch_path, name, atomic=True, **kwargs)


def registered(ctx, name, **kwargs):
    """Drop a case and let the scanner register it at ``ctx.clock()`` (seen quiet since 100 s before)."""
    drop(ctx.config, name, **kwargs)
    now = ctx.clock()
    assert scanner.tick(ctx, now - 100) == 0
    assert scanner.tick(ctx, now) == 1
    return get_case(ctx.conn, max(r[0] for r in ctx.conn.execute("SELECT case_id FROM cases")))


def submitted(ctx, name, **kwargs):
    case = registered(ctx, name, **kwargs)
    submitter.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING, case
    return case


def run_until_final(ctx, case_id, step=0.1, within=120.0):
    """Poll on the injected clock, ``step`` seconds of it between passes, until the case is final."""
    end = ctx.clock() + within
    while True:
        poller.tick(ctx, ctx.clock())
        case = get_case(ctx.conn, case_id)
        if case.status in FINAL:
            return case
        assert ctx.clock() < end, f"case {case_id} not final within {within:g} s of the HPC's clock: {case}"
        ctx.clock.advance(step)


def poll_until_final(ctx, case_id, timeout=20):
    """The system tier's: poll on the wall clock until the case is final."""
    def final():
        poller.tick(ctx, time.time())
        case = get_case(ctx.conn, case_id)
        return case if case.status in FINAL else None
    return wait_until(final, timeout=timeout, interval=0.1, message=f"case {case_id} final")


# -- scanner ---------------------------------------------------------------------------------

def test_scanner_registers_a_quiet_folder_and_moves_it_into_the_spool(memory_hpc):
    ctx = memory_hpc().context()
    t0 = ctx.clock()
    folder = drop(ctx.config, "case one")
    assert scanner.tick(ctx, t0) == 0          # first sight: not quiet long enough
    assert scanner.tick(ctx, t0 + 1) == 0
    assert scanner.tick(ctx, t0 + 2) == 1      # quiescence_period_seconds = 2
    case = get_case(ctx.conn, 1)
    assert case.status is CaseStatus.SUBMITTED and case.case_name == "case one"
    assert case.submitted_at == t0 + 2
    assert not folder.exists() and Path(case.case_path).is_dir()
    assert Path(case.case_path).parent == ctx.spool.stage_dir("queued")


def test_scanner_never_takes_a_folder_that_is_still_growing(memory_hpc):
    ctx = memory_hpc().context()
    t0 = ctx.clock()
    folder = ctx.config.scanner.watch_path / "growing"
    folder.mkdir()
    for step in range(5):
        (folder / f"layer_{step}.ptn").write_bytes(b"x" * 100)
        assert scanner.tick(ctx, t0 + 1.5 * step) == 0
    assert scanner.tick(ctx, t0 + 7.5) == 0     # last change seen at t0 + 6
    assert scanner.tick(ctx, t0 + 8) == 1


def test_scanner_ready_marker_takes_folder_at_once(memory_hpc):
    ctx = memory_hpc(scanner={"ready_marker": "_CASE_READY"}).context()
    drop(ctx.config, "marked", marker="_CASE_READY")
    assert scanner.tick(ctx, ctx.clock()) == 1
    assert get_case(ctx.conn, 1).status is CaseStatus.SUBMITTED


@pytest.mark.parametrize("make_item,reason", [
    (lambda w: (w / "notes.txt").write_text("hi"), "is a file, not a folder"),
    (lambda w: os.symlink("/etc", w / "link"), "is a symlink"),
    (lambda w: (w / "empty").mkdir(), "is an empty folder"),
    (lambda w: (make_case(w, "escape", deliveries=1, layers_per_delivery=1),
                os.symlink("/etc/passwd", w / "escape" / "passwd")), "symlink leading outside the case"),
    (lambda w: (make_case(w, "fifo", deliveries=1, layers_per_delivery=1), os.mkfifo(w / "fifo" / "pipe")),
     "contains a special file"),
])
def test_scanner_sets_bad_items_aside_with_a_reason(memory_hpc, make_item, reason):
    ctx = memory_hpc().context()
    make_item(ctx.config.scanner.watch_path)
    scanner.tick(ctx, ctx.clock())
    scanner.tick(ctx, ctx.clock() + 10)
    rejected = ctx.spool.stage_dir("rejected")
    reasons = [p.read_text() for p in rejected.glob("*.reason.txt")]
    assert len(reasons) == 1 and reason in reasons[0]
    assert os.listdir(ctx.config.scanner.watch_path) == []
    assert ctx.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0


def test_scanner_keeps_hostile_names_intact_and_same_name_twice_is_two_cases(memory_hpc):
    ctx = memory_hpc().context()
    t0 = ctx.clock()
    name = "pt $(id); `x` 'q' \"d\" 환자"
    drop(ctx.config, name)
    scanner.tick(ctx, t0)
    scanner.tick(ctx, t0 + 5)
    drop(ctx.config, name)
    scanner.tick(ctx, t0 + 6)
    scanner.tick(ctx, t0 + 10)
    names = [r[0] for r in ctx.conn.execute("SELECT case_name FROM cases ORDER BY case_id")]
    assert names == [name, name]


def test_scanner_folder_removed_after_detection_is_forgotten(memory_hpc):
    ctx = memory_hpc().context()
    folder = drop(ctx.config, "fleeting")
    scanner.tick(ctx, ctx.clock())
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    folder.rmdir()
    assert scanner.tick(ctx, ctx.clock() + 10) == 0
    assert ctx.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0


# -- submitter -------------------------------------------------------------------------------

def test_submitter_uploads_and_submits_with_label_group_and_gpu(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = registered(ctx, "happy")
    assert submitter.tick(ctx, ctx.clock()) == 1
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.task_id is not None
    assert Path(case.case_path).parent == ctx.spool.stage_dir("active")
    assert os.path.isdir(case.remote_dir) and case.remote_dir.endswith(case.folder_name)
    [task] = sandbox.tasks_labelled(f"mqic_case_{case.case_id}")
    assert task.group == case.slot == "gpu_a" and task.path == case.remote_dir
    assert sandbox.hpc.tasks[task.id].run.env["CUDA_VISIBLE_DEVICES"] == "0"
    slot = get_slot(ctx.conn, "gpu_a")
    assert slot.status is SlotStatus.ASSIGNED and slot.assigned_case_id == case.case_id
    moves = [(e["from_status"], e["to_status"]) for e in case_events(ctx.conn, case.case_id)]
    assert moves == [(None, "submitted"), ("submitted", "submitting"), ("submitting", "running")]


def test_submitter_waits_when_no_slot_is_free(memory_hpc):
    ctx = memory_hpc(groups={"gpu_a": {"gpu": 0}}).context()
    submitted(ctx, "first", seconds=5)
    second = registered(ctx, "second")
    submitter.tick(ctx, ctx.clock())                          # at most a pre-upload
    assert get_case(ctx.conn, second.case_id).status is CaseStatus.SUBMITTED
    assert get_slot(ctx.conn, "gpu_a").assigned_case_id != second.case_id


def test_unreachable_upload_marks_the_host_down_until_the_reaper_hears_from_it(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = registered(ctx, "outage")
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    sandbox.hpc.down = True
    now = ctx.clock()
    submitter.tick(ctx, now)
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.attempts == 0   # an outage uses up no attempt
    assert case.error_type == "Unreachable" and case.next_attempt_at == pytest.approx(now, abs=5)
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE
    assert list(down_hosts(ctx.conn)) == ["hpc"]
    calls = len(sandbox.hpc.calls)
    assert submitter.tick(ctx, now + 1) == 0                 # no claims on a host that is down
    assert len(sandbox.hpc.calls) == calls                   # nor any call to it
    sandbox.clock.advance(reaper.PROBE_DOWN_SECONDS + 1)
    reaper.tick(ctx, ctx.clock())                            # still down: the probe fails
    assert list(down_hosts(ctx.conn)) == ["hpc"] and sandbox.hpc.calls[-1] == "true"
    sandbox.hpc.down = False
    sandbox.clock.advance(reaper.PROBE_DOWN_SECONDS + 1)
    reaper.tick(ctx, ctx.clock())
    assert down_hosts(ctx.conn) == {}
    submitter.tick(ctx, ctx.clock())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING


def test_attempts_exhausted_fail_the_case_for_good(memory_hpc):
    sandbox = memory_hpc(main_loop={"max_attempts": 1})
    ctx = sandbox.context()
    case = registered(ctx, "doomed")
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    sandbox.hpc.remove_slot("gpu_a")                         # a transient refusal of the submit
    submitter.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "submit_error"
    assert Path(case.case_path).parent == ctx.spool.stage_dir("failed")
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE


def test_an_upload_failure_is_recorded_when_it_happened_not_when_the_pass_began(memory_hpc):
    """Bug (issue 16, 8): the failure was stamped with the pass's start, before an upload that can take minutes."""
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = registered(ctx, "unwritable")
    submitter.host_ready(ctx, ctx.hosts["hpc"])
    sandbox.hpc.fail_next("upload", RemoteError(["tar upload"], 2, "mkdir: cannot create directory: Permission denied"))
    before = ctx.clock()
    submitter.tick(ctx, before - 500)  # a pass that began long before the upload failed
    failed_at = ctx.conn.execute("SELECT at FROM case_events WHERE case_id = ? AND to_status = 'failed'",
                                 (case.case_id,)).fetchone()[0]
    assert failed_at >= before


def claim_and_die(ctx, name, *, add_task: bool):
    """Leave a case as a crashed submitter would: submitting, lease expired, maybe task added."""
    from shared.claims import claim_next_case
    case = registered(ctx, name)
    host = ctx.hosts["hpc"]
    assert submitter.host_ready(ctx, host)
    claim = claim_next_case(ctx.conn, worker="dead:1", now=ctx.clock() - 1000, lease_seconds=10)
    if add_task:
        remote_dir = host.remote.upload(Path(claim.case.case_path), claim.case.folder_name,
                                        case_id=case.case_id).remote_dir
        host.backend.submit(slot=claim.group, label=claim.case.label, workdir=remote_dir, command=MOQUI_COMMAND,
                            env={})
    return case


def test_recovery_finds_the_task_of_a_crashed_submitter_by_label(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = claim_and_die(ctx, "crashed after add", add_task=True)
    submitter.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.task_id is not None
    assert len(sandbox.tasks_labelled(case.label)) == 1      # never a second remote job


def test_recovery_retries_when_the_task_is_proven_absent(memory_hpc):
    ctx = memory_hpc().context()
    case = claim_and_die(ctx, "crashed before add", add_task=False)
    recover_expired_claims(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.claimed_by is None
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE


def test_recovery_waits_while_the_hpc_cannot_tell(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = claim_and_die(ctx, "crashed, daemon down", add_task=False)
    sandbox.hpc.scheduler_down = True
    recover_expired_claims(ctx, ctx.clock())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.SUBMITTING
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.ASSIGNED


# -- poller ----------------------------------------------------------------------------------

def test_poller_completes_a_successful_case_and_fetches_results(memory_hpc):
    ctx = memory_hpc().context()
    case = submitted(ctx, "success", seconds=0.3)
    case = run_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.COMPLETED and case.outcome == "success" and case.progress == 100
    assert Path(case.case_path).parent == ctx.spool.stage_dir("done")
    assert list(Path(case.case_path, "output").iterdir())  # result_files: output/*
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE


def test_poller_fails_a_failed_case_with_exit_code_and_log_tail(memory_hpc):
    ctx = memory_hpc().context()
    case = submitted(ctx, "failure", mode="fail")
    case = run_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "failed" and case.exit_code == 1
    assert "FATAL ERROR" in case.log_tail
    assert Path(case.case_path).parent == ctx.spool.stage_dir("failed")
    slot = get_slot(ctx.conn, case.slot)
    assert slot.status is SlotStatus.ZOMBIE
    reaper.tick(ctx, ctx.clock())                         # group idle: the zombie is reclaimed
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE


def test_a_task_killed_by_a_signal_we_did_not_send_is_requeued_and_runs_again(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = submitted(ctx, "killed outside", seconds=30)
    assert sandbox.tasks_labelled(case.label)[0].state.is_active
    sandbox.hpc.kill(case.task_id)
    poller.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.attempts == 1 and case.error_type == "TaskKilled"
    assert sandbox.tasks_labelled(case.label) == []          # the killed task left the scheduler's list
    assert "killed by a signal we did not send" in case_events(ctx.conn, case.case_id)[-1]["detail"]
    sandbox.clock.now = case.next_attempt_at + 1
    submitter.tick(ctx, ctx.clock())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING
    assert len(sandbox.tasks_labelled(case.label)) == 1


def test_killed_again_and_again_fails_as_killed_once_attempts_run_out(memory_hpc):
    sandbox = memory_hpc(main_loop={"max_attempts": 1})
    ctx = sandbox.context()
    case = submitted(ctx, "killed for good", seconds=30)
    assert sandbox.tasks_labelled(case.label)[0].state.is_active
    sandbox.hpc.kill(case.task_id)
    case = run_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "killed"


def test_poller_tracks_progress_only_when_it_changes(memory_hpc):
    ctx = memory_hpc().context()
    case = submitted(ctx, "progress", seconds=3, batches=4)
    poller.tick(ctx, ctx.clock())                            # its start is recorded; no batch done yet
    assert get_case(ctx.conn, case.case_id).progress == 0
    ctx.clock.advance(1)                                     # one batch of four on the HPC's clock
    assert poller.tick(ctx, ctx.clock()) == 1
    assert get_case(ctx.conn, case.case_id).progress == 25
    assert poller.tick(ctx, ctx.clock()) == 0                # nothing new: no change


def test_poller_changes_nothing_when_unreachable_or_garbage(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = submitted(ctx, "steady", seconds=30)
    before = get_case(ctx.conn, case.case_id)
    sandbox.hpc.fail_next("snapshot", BadOutput("pueue status: expected JSON, got 'garbage'"))
    assert poller.tick(ctx, ctx.clock()) == 0
    sandbox.hpc.down = True
    assert poller.tick(ctx, ctx.clock()) == 0
    sandbox.hpc.down = False
    after = get_case(ctx.conn, case.case_id)
    assert after.status is CaseStatus.RUNNING and after.status_updated_at == before.status_updated_at


def test_a_finished_task_that_pueue_forgot_completes_from_its_exit_record(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = submitted(ctx, "cleaned while the poller was away", seconds=0.1)
    sandbox.clock.advance(1)
    assert sandbox.tasks_labelled(case.label)[0].state.is_done
    sandbox.hpc.clean()                                      # another user cleans; the poller was behind
    poller.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.COMPLETED and case.outcome == "success"
    assert list(Path(case.case_path, "output").iterdir())   # results fetched, nothing run twice
    assert sandbox.tasks_labelled(case.label) == []


def test_a_failed_task_that_pueue_forgot_fails_from_its_record_with_its_log_tail(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = submitted(ctx, "failed, then cleaned", mode="fail")
    sandbox.clock.advance(1)
    assert sandbox.tasks_labelled(case.label)[0].state.is_done
    sandbox.hpc.clean()
    case = run_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.FAILED and case.exit_code == 1 and "FATAL ERROR" in case.log_tail


def test_a_task_gone_without_an_exit_record_is_run_again(memory_hpc):
    sandbox = memory_hpc()
    ctx = sandbox.context()
    case = submitted(ctx, "vanishing", seconds=0.1)
    sandbox.clock.advance(1)
    assert sandbox.tasks_labelled(case.label)[0].state.is_done
    Path(case.remote_dir, ".mqic", "exit_status").unlink()   # it never got to record its exit
    sandbox.hpc.clean()
    poller.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.error_type == "TaskVanished" and case.attempts == 1


def test_a_daemon_restart_requeues_the_killed_case_and_resumes_the_group(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0}}, programs={"sleep 1": sleeps(1)})
    ctx = sandbox.context()
    first = submitted(ctx, "running at restart", seconds=30)
    sandbox.hpc.submit("gpu_a", "someone_else", str(sandbox.hpc.base), "sleep 1", {}, False)
    sandbox.hpc.restart()                                    # a queued task makes the daemon pause the group
    assert sandbox.hpc.paused == {"gpu_a"}
    poller.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, first.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.error_type == "TaskKilled"
    assert sandbox.hpc.paused == set() and "resume_slot" in sandbox.hpc.calls


def test_a_paused_group_is_logged_once_not_every_pass(memory_hpc, caplog):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0}}, pueue={"resume_paused_groups": False})
    ctx = sandbox.context()
    caplog.set_level("INFO", logger="mqic")
    submitted(ctx, "behind a paused group", seconds=30)
    sandbox.hpc.pause("gpu_a")
    t0 = ctx.clock()
    for offset in (0, 1, 2, 60):
        poller.tick(ctx, t0 + offset)
    assert caplog.text.count("is PAUSED") == 1
    poller.tick(ctx, t0 + 301)                               # reminded every few minutes
    assert caplog.text.count("is PAUSED") == 2
    sandbox.hpc.paused.discard("gpu_a")                      # an operator resumes it
    poller.tick(ctx, t0 + 302)
    assert "gpu_a is running again" in caplog.text


# -- reaper ----------------------------------------------------------------------------------

def test_a_case_past_its_timeout_on_the_hpc_clock_is_failed_and_its_task_stopped(memory_hpc):
    sandbox = memory_hpc(main_loop={"running_case_timeout_hours": 1 / 3600})
    ctx = sandbox.context()
    case = submitted(ctx, "hangs", mode="hang")
    assert sandbox.tasks_labelled(case.label)[0].state.is_active
    poller.tick(ctx, ctx.clock() + 48 * 3600)                # our clock alone never times out
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING
    sandbox.clock.advance(1.1)                               # over one second on the HPC's clock
    poller.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "timed_out" and case.stop_requested_at
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.ZOMBIE
    assert sandbox.tasks_labelled(case.label)[0].state.is_done    # stopped by SIGTERM
    reaper.tick(ctx, ctx.clock())
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE
    poller.tick(ctx, ctx.clock())                            # the poller does not touch it again
    assert get_case(ctx.conn, case.case_id).outcome == "timed_out"


def test_no_timeout_while_the_hpc_cannot_be_reached(memory_hpc):
    sandbox = memory_hpc(main_loop={"running_case_timeout_hours": 1 / 3600})
    ctx = sandbox.context()
    case = submitted(ctx, "slow", seconds=30)
    sandbox.clock.advance(1.2)
    sandbox.hpc.down = True
    later = ctx.clock() + 48 * 3600
    poller.tick(ctx, later)
    reaper.tick(ctx, later)
    sandbox.hpc.down = False
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING


def test_a_task_that_finished_in_time_completes_even_when_seen_late(memory_hpc):
    sandbox = memory_hpc(main_loop={"running_case_timeout_hours": 1 / 3600})
    ctx = sandbox.context()
    case = submitted(ctx, "quick", seconds=0.1)
    sandbox.clock.advance(1.2)                               # the poller comes back late
    reaper.tick(ctx, ctx.clock() + 48 * 3600)
    case = run_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.COMPLETED


def test_reaper_flags_a_stuck_case_for_review_without_failing_it(memory_hpc):
    ctx = memory_hpc().context()
    case = submitted(ctx, "quiet", seconds=30)
    reaper.flag_stuck(ctx, ctx.clock() + 31 * 60)
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.needs_review and "no progress" in case.review_reason
    assert reaper.flag_stuck(ctx, ctx.clock() + 62 * 60) == 0   # flagged once


def test_reaper_reports_stale_worker_heartbeats(memory_hpc):
    from shared.liveness import beat
    ctx = memory_hpc().context()
    t0 = ctx.clock()
    beat(ctx.conn, "poller", now=t0)
    assert reaper.check_heartbeats(ctx, t0 + 10) == []
    assert reaper.check_heartbeats(ctx, t0 + 301) == ["poller"]


def test_waiting_cases_are_pre_uploaded_while_every_gpu_is_busy(memory_hpc):
    ctx = memory_hpc(groups={"gpu_a": {"gpu": 0}}).context()
    first = submitted(ctx, "busy", seconds=1)
    waiting = registered(ctx, "waiting")
    assert submitter.tick(ctx, ctx.clock()) == 0            # no free slot
    assert submitter.stage_tick(ctx, ctx.clock()) == 1      # so the stager uploads ahead
    staged = get_case(ctx.conn, waiting.case_id)
    assert staged.status is CaseStatus.SUBMITTED and staged.staged_at and staged.claimed_by is None
    assert os.path.isdir(staged.remote_dir)
    assert submitter.stage_tick(ctx, ctx.clock()) == 0      # one staged case per group is enough
    run_until_final(ctx, first.case_id)
    marker = Path(staged.remote_dir, "staged-marker")
    marker.write_text("the very same folder")               # proves no second upload replaces it
    submitter.tick(ctx, ctx.clock())
    running = get_case(ctx.conn, waiting.case_id)
    assert running.status is CaseStatus.RUNNING and running.remote_dir == staged.remote_dir
    assert marker.exists() and running.staged_at is None
    details = [e["detail"] for e in case_events(ctx.conn, waiting.case_id)]
    assert any(d.startswith("pre-uploaded to") for d in details)


def test_a_staged_case_whose_remote_folder_vanished_is_uploaded_again(memory_hpc):
    ctx = memory_hpc(groups={"gpu_a": {"gpu": 0}}).context()
    first = submitted(ctx, "busy", seconds=0.5)
    waiting = registered(ctx, "waiting")
    submitter.stage_tick(ctx, ctx.clock())
    shutil.rmtree(get_case(ctx.conn, waiting.case_id).remote_dir)
    run_until_final(ctx, first.case_id)
    submitter.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, waiting.case_id)
    assert case.status is CaseStatus.RUNNING and os.path.isdir(case.remote_dir)


# -- the system tier: what needs the real sshd and pueue stand-in ------------------------------------

def test_pueue_missing_on_the_hpc_holds_cases_back_with_a_clear_log(hpc, caplog):
    ctx = ctx_for(hpc(hpc={"pueue_command": "/nonexistent/pueue"}))
    case = registered(ctx, "no pueue")
    submitter.tick(ctx, time.time())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.SUBMITTED
    assert "/nonexistent/pueue: No such file or directory" in caplog.text


def test_remote_error_during_upload_is_a_permanent_failure(hpc):
    ctx = ctx_for(hpc(hpc={"remote_base_dir": "/proc/mqic-not-writable"}))
    case = registered(ctx, "unwritable")
    submitter.host_ready(ctx, ctx.hosts["hpc"])
    submitter.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.FAILED and case.error_type == "RemoteError"
    assert "mkdir" in case.error_message and case.outcome == "submit_error"


def test_the_stager_thread_of_the_process_pre_uploads_while_every_gpu_is_busy(hpc):
    """Bug: the stager thread had a state of its own, so it never saw a host made ready and never staged."""
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = ctx_for(h)
    submitted(ctx, "busy", seconds=5)
    waiting = registered(ctx, "waiting")
    assert submitter.tick(ctx, time.time()) == 0            # no free seat: the main loop leaves it
    submitter.start_loops(ctx)                              # the stager as the process runs it
    try:
        staged = wait_until(lambda: get_case(ctx.conn, waiting.case_id).staged_at, timeout=20,
                            message="the stager thread pre-uploads the waiting case")
    finally:
        ctx.stop.set()
        wake_loops(ctx)
        for thread in ctx.memory.helper_threads:
            thread.join(timeout=30)
    assert staged and get_case(ctx.conn, waiting.case_id).host == "hpc"
    h.pueue("kill", "--all")


def test_operator_retry_frees_the_label_so_the_retry_has_the_only_task(hpc, capsys):
    from console.cli import main as mqic
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = ctx_for(h)
    case = submitted(ctx, "retry me", mode="fail")
    poll_until_final(ctx, case.case_id)
    reaper.tick(ctx, time.time())
    assert mqic(["--config", str(h.config_path), "retry", str(case.case_id)]) == 0
    assert h.tasks_labelled(case.label) == []                # the old, failed task was removed
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.SUBMITTED
    submitter.tick(ctx, time.time())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING
    assert len(h.tasks_labelled(case.label)) == 1


def test_reaper_removes_a_cancelled_case_task_that_is_still_queued(hpc):
    from console.cli import main as mqic
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = ctx_for(h)
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    assert h.pueue("pause", "-g", "gpu_a").returncode == 0    # the task will wait in the queue
    case = submitted(ctx, "queued then cancelled")
    assert mqic(["--config", str(h.config_path), "cancel", str(case.case_id)]) == 0
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.ZOMBIE
    assert h.tasks_labelled(case.label) == []                # the queued task was removed at once
    reaper.tick(ctx, time.time())                            # the group is clean: slot freed
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE
