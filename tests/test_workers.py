"""Each worker's tick driven through its branches against the real sshd and the pueue stand-in."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from shared.liveness import down_hosts
from shared.recovery import recover_expired_claims
from shared.seats import get_slot
from shared.states import CaseStatus, SlotStatus
from shared.store import case_events, get_case
from shared.worker import build_context, wake_loops
from tests.conftest import wait_until
from workers import poller, reaper, scanner, submitter

T0 = time.time()


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
    drop(ctx.config, name, **kwargs)
    assert scanner.tick(ctx, T0) == 0
    assert scanner.tick(ctx, T0 + 100) == 1
    return get_case(ctx.conn, max(r[0] for r in ctx.conn.execute("SELECT case_id FROM cases")))


def submitted(ctx, name, **kwargs):
    case = registered(ctx, name, **kwargs)
    submitter.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING, case
    return case


def poll_until_final(ctx, case_id, timeout=20):
    def final():
        poller.tick(ctx, time.time())
        case = get_case(ctx.conn, case_id)
        return case if case.status in (CaseStatus.COMPLETED, CaseStatus.FAILED) else None
    return wait_until(final, timeout=timeout, interval=0.1, message=f"case {case_id} final")


# -- scanner ---------------------------------------------------------------------------------

def test_scanner_registers_a_quiet_folder_and_moves_it_into_the_spool(hpc):
    ctx = ctx_for(hpc())
    folder = drop(ctx.config, "case one")
    assert scanner.tick(ctx, T0) == 0          # first sight: not quiet long enough
    assert scanner.tick(ctx, T0 + 1) == 0
    assert scanner.tick(ctx, T0 + 2) == 1      # quiescence_period_seconds = 2
    case = get_case(ctx.conn, 1)
    assert case.status is CaseStatus.SUBMITTED and case.case_name == "case one"
    assert case.submitted_at == T0 + 2
    assert not folder.exists() and Path(case.case_path).is_dir()
    assert Path(case.case_path).parent == ctx.spool.stage_dir("queued")


def test_scanner_never_takes_a_folder_that_is_still_growing(hpc):
    ctx = ctx_for(hpc())
    folder = ctx.config.scanner.watch_path / "growing"
    folder.mkdir()
    for step in range(5):
        (folder / f"layer_{step}.ptn").write_bytes(b"x" * 100)
        assert scanner.tick(ctx, T0 + 1.5 * step) == 0
    assert scanner.tick(ctx, T0 + 7.5) == 0     # last change seen at T0 + 6
    assert scanner.tick(ctx, T0 + 8) == 1


def test_scanner_ready_marker_takes_folder_at_once(hpc):
    ctx = ctx_for(hpc(scanner={"ready_marker": "_CASE_READY"}))
    drop(ctx.config, "marked", marker="_CASE_READY")
    assert scanner.tick(ctx, T0) == 1
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
def test_scanner_sets_bad_items_aside_with_a_reason(hpc, make_item, reason):
    ctx = ctx_for(hpc())
    make_item(ctx.config.scanner.watch_path)
    scanner.tick(ctx, T0)
    scanner.tick(ctx, T0 + 10)
    rejected = ctx.spool.stage_dir("rejected")
    reasons = [p.read_text() for p in rejected.glob("*.reason.txt")]
    assert len(reasons) == 1 and reason in reasons[0]
    assert os.listdir(ctx.config.scanner.watch_path) == []
    assert ctx.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0


def test_scanner_keeps_hostile_names_intact_and_same_name_twice_is_two_cases(hpc):
    ctx = ctx_for(hpc())
    name = "pt $(id); `x` 'q' \"d\" 환자"
    drop(ctx.config, name)
    scanner.tick(ctx, T0)
    scanner.tick(ctx, T0 + 5)
    drop(ctx.config, name)
    scanner.tick(ctx, T0 + 6)
    scanner.tick(ctx, T0 + 10)
    names = [r[0] for r in ctx.conn.execute("SELECT case_name FROM cases ORDER BY case_id")]
    assert names == [name, name]


def test_scanner_folder_removed_after_detection_is_forgotten(hpc):
    ctx = ctx_for(hpc())
    folder = drop(ctx.config, "fleeting")
    scanner.tick(ctx, T0)
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    folder.rmdir()
    assert scanner.tick(ctx, T0 + 10) == 0
    assert ctx.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0


# -- submitter -------------------------------------------------------------------------------

def test_submitter_uploads_and_submits_with_label_group_and_gpu(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = registered(ctx, "happy")
    assert submitter.tick(ctx, time.time()) == 1
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.task_id is not None
    assert Path(case.case_path).parent == ctx.spool.stage_dir("active")
    assert os.path.isdir(case.remote_dir) and case.remote_dir.endswith(case.folder_name)
    [task] = h.tasks_labelled(f"mqic_case_{case.case_id}")
    assert task["group"] == case.slot == "gpu_a" and task["path"] == case.remote_dir
    assert task["envs"]["CUDA_VISIBLE_DEVICES"] == "0"
    slot = get_slot(ctx.conn, "gpu_a")
    assert slot.status is SlotStatus.ASSIGNED and slot.assigned_case_id == case.case_id
    moves = [(e["from_status"], e["to_status"]) for e in case_events(ctx.conn, case.case_id)]
    assert moves == [(None, "submitted"), ("submitted", "submitting"), ("submitting", "running")]


def test_submitter_waits_when_no_slot_is_free(hpc):
    ctx = ctx_for(hpc(groups={"gpu_a": {"gpu": 0}}))
    submitted(ctx, "first", seconds=5)
    second = registered(ctx, "second")
    submitter.tick(ctx, time.time())                          # at most a pre-upload
    assert get_case(ctx.conn, second.case_id).status is CaseStatus.SUBMITTED
    assert get_slot(ctx.conn, "gpu_a").assigned_case_id != second.case_id


def test_unreachable_upload_marks_the_host_down_until_the_reaper_hears_from_it(hpc, sshd):
    ctx = ctx_for(hpc())
    case = registered(ctx, "outage")
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    sshd.stop(kill_sessions=True)
    try:
        now = time.time()
        submitter.tick(ctx, now)
        case = get_case(ctx.conn, case.case_id)
        assert case.status is CaseStatus.SUBMITTED and case.attempts == 0   # an outage uses up no attempt
        assert case.error_type == "Unreachable" and case.next_attempt_at == pytest.approx(now, abs=5)
        assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE
        assert list(down_hosts(ctx.conn)) == ["hpc"]
        assert submitter.tick(ctx, now + 1) == 0                 # no claims on a host that is down
        reaper.tick(ctx, now + reaper.PROBE_DOWN_SECONDS + 1)   # still down: the probe fails
        assert list(down_hosts(ctx.conn)) == ["hpc"]
    finally:
        sshd.start()
    reaper.tick(ctx, time.time() + 2 * reaper.PROBE_DOWN_SECONDS)
    assert down_hosts(ctx.conn) == {}
    submitter.tick(ctx, time.time())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING


def test_attempts_exhausted_fail_the_case_for_good(hpc):
    ctx = ctx_for(hpc(main_loop={"max_attempts": 1}))
    case = registered(ctx, "doomed")
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    ctx.hosts["hpc"].remote.run([*list(ctx.config.hosts[0].hpc.pueue_command), "group", "remove", "gpu_a"])   # a transient refusal of pueue add
    submitter.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "submit_error"
    assert Path(case.case_path).parent == ctx.spool.stage_dir("failed")
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE


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


def test_an_upload_failure_is_recorded_when_it_happened_not_when_the_pass_began(hpc):
    """Bug (issue 16, 8): the failure was stamped with the pass's start, before an upload that can take minutes."""
    ctx = ctx_for(hpc(hpc={"remote_base_dir": "/proc/mqic-not-writable"}))
    case = registered(ctx, "unwritable")
    submitter.host_ready(ctx, ctx.hosts["hpc"])
    before = time.time()
    submitter.tick(ctx, before - 500)  # a pass that began long before the upload failed
    failed_at = ctx.conn.execute("SELECT at FROM case_events WHERE case_id = ? AND to_status = 'failed'",
                                 (case.case_id,)).fetchone()[0]
    assert failed_at >= before


def claim_and_die(ctx, name, *, add_task: bool, hpc_obj=None):
    """Leave a case as a crashed submitter would: submitting, lease expired, maybe task added."""
    from shared.backends import pueue
    from shared.claims import claim_next_case
    case = registered(ctx, name)
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    claim = claim_next_case(ctx.conn, worker="dead:1", now=time.time() - 1000, lease_seconds=10)
    if add_task:
        remote_dir = ctx.hosts["hpc"].remote.upload(Path(claim.case.case_path), claim.case.folder_name, case_id=case.case_id).remote_dir
        pueue.submit(ctx.hosts["hpc"].remote, list(ctx.config.hosts[0].hpc.pueue_command), group=claim.group, label=claim.case.label,
                     workdir=remote_dir, command="true")
    return case


def test_recovery_finds_the_task_of_a_crashed_submitter_by_label(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = claim_and_die(ctx, "crashed after add", add_task=True)
    submitter.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.task_id is not None
    assert len(h.tasks_labelled(case.label)) == 1          # never a second remote job


def test_recovery_retries_when_the_task_is_proven_absent(hpc):
    ctx = ctx_for(hpc())
    case = claim_and_die(ctx, "crashed before add", add_task=False)
    recover_expired_claims(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.claimed_by is None
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE


def test_recovery_waits_while_the_hpc_cannot_tell(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = claim_and_die(ctx, "crashed, daemon down", add_task=False)
    h.ctl("stop")
    recover_expired_claims(ctx, time.time())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.SUBMITTING
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.ASSIGNED


# -- poller ----------------------------------------------------------------------------------

def test_poller_completes_a_successful_case_and_fetches_results(hpc):
    ctx = ctx_for(hpc())
    case = submitted(ctx, "success", seconds=0.3)
    case = poll_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.COMPLETED and case.outcome == "success" and case.progress == 100
    assert Path(case.case_path).parent == ctx.spool.stage_dir("done")
    assert list(Path(case.case_path, "output").iterdir())  # result_files: output/*
    assert get_slot(ctx.conn, "gpu_a").status is SlotStatus.AVAILABLE


def test_poller_fails_a_failed_case_with_exit_code_and_log_tail(hpc):
    ctx = ctx_for(hpc())
    case = submitted(ctx, "failure", mode="fail")
    case = poll_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "failed" and case.exit_code == 1
    assert "FATAL ERROR" in case.log_tail
    assert Path(case.case_path).parent == ctx.spool.stage_dir("failed")
    slot = get_slot(ctx.conn, case.slot)
    assert slot.status is SlotStatus.ZOMBIE
    reaper.tick(ctx, time.time())                         # group idle: the zombie is reclaimed
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE


def test_a_task_killed_by_a_signal_we_did_not_send_is_requeued_and_runs_again(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "killed outside", seconds=30)
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Running"), message="task running")
    h.pueue("kill", str(case.task_id))
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task killed")
    poller.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.attempts == 1 and case.error_type == "TaskKilled"
    assert h.tasks_labelled(case.label) == []                  # the killed task left pueue's list
    assert "killed by a signal we did not send" in case_events(ctx.conn, case.case_id)[-1]["detail"]
    submitter.tick(ctx, case.next_attempt_at + 1)
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING
    assert len(h.tasks_labelled(case.label)) == 1


def test_killed_again_and_again_fails_as_killed_once_attempts_run_out(hpc):
    h = hpc(main_loop={"max_attempts": 1})
    ctx = ctx_for(h)
    case = submitted(ctx, "killed for good", seconds=30)
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Running"), message="task running")
    h.pueue("kill", str(case.task_id))
    case = poll_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "killed"


def test_poller_tracks_progress_only_when_it_changes(hpc):
    ctx = ctx_for(hpc())
    case = submitted(ctx, "progress", seconds=3, batches=4)
    wait_until(lambda: poller.tick(ctx, time.time()) and get_case(ctx.conn, case.case_id).progress > 0,
               timeout=15, message="progress")
    progress = get_case(ctx.conn, case.case_id).progress
    assert 0 < progress <= 100


def test_poller_changes_nothing_when_unreachable_or_garbage(hpc, sshd):
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "steady", seconds=30)
    before = get_case(ctx.conn, case.case_id)
    h.ctl("garbage", "2")
    assert poller.tick(ctx, time.time()) == 0
    sshd.stop(kill_sessions=True)
    try:
        assert poller.tick(ctx, time.time()) == 0
    finally:
        sshd.start()
    after = get_case(ctx.conn, case.case_id)
    assert after.status is CaseStatus.RUNNING and after.status_updated_at == before.status_updated_at


def test_a_finished_task_that_pueue_forgot_completes_from_its_exit_record(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "cleaned while the poller was away", seconds=0.1)
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task done")
    h.pueue("clean")                                        # another user cleans; the poller was behind
    poller.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.COMPLETED and case.outcome == "success"
    assert list(Path(case.case_path, "output").iterdir())   # results fetched, nothing run twice
    assert h.tasks_labelled(case.label) == []


def test_a_failed_task_that_pueue_forgot_fails_from_its_record_with_its_log_tail(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "failed, then cleaned", mode="fail")
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task done")
    h.pueue("clean")
    case = poll_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.FAILED and case.exit_code == 1 and "FATAL ERROR" in case.log_tail


def test_a_task_gone_without_an_exit_record_is_run_again(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "vanishing", seconds=0.1)
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task done")
    Path(case.remote_dir, ".mqic", "exit_status").unlink()   # it never got to record its exit
    h.pueue("clean")
    poller.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.error_type == "TaskVanished" and case.attempts == 1


def test_a_daemon_restart_requeues_the_killed_case_and_resumes_the_group(hpc):
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = ctx_for(h)
    first = submitted(ctx, "running at restart", seconds=30)
    h.pueue("add", "-g", "gpu_a", "--", "sleep 1")        # a queued task makes pueued pause the group
    h.ctl("restart")
    assert h.status()["groups"]["gpu_a"]["status"] == "Paused"
    poller.tick(ctx, time.time())
    case = get_case(ctx.conn, first.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.error_type == "TaskKilled"
    assert h.status()["groups"]["gpu_a"]["status"] == "Running"


def test_a_paused_group_is_logged_once_not_every_pass(hpc, caplog):
    h = hpc(groups={"gpu_a": {"gpu": 0}}, pueue={"resume_paused_groups": False})
    ctx = ctx_for(h)
    caplog.set_level("INFO", logger="mqic")
    submitted(ctx, "behind a paused group", seconds=30)
    assert h.pueue("pause", "-g", "gpu_a").returncode == 0
    for offset in (0, 1, 2, 60):
        poller.tick(ctx, T0 + offset)
    assert caplog.text.count("is PAUSED") == 1
    poller.tick(ctx, T0 + 301)                               # reminded every few minutes
    assert caplog.text.count("is PAUSED") == 2
    h.pueue("start", "-g", "gpu_a")
    poller.tick(ctx, T0 + 302)
    assert "gpu_a is running again" in caplog.text


# -- reaper ----------------------------------------------------------------------------------

def test_a_case_past_its_timeout_on_the_hpc_clock_is_failed_and_its_task_stopped(hpc):
    h = hpc(main_loop={"running_case_timeout_hours": 1 / 3600})
    ctx = ctx_for(h)
    case = submitted(ctx, "hangs", mode="hang")
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Running"), message="task running")
    poller.tick(ctx, time.time() + 48 * 3600)                # our clock alone never times out
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING
    time.sleep(2.1)                                          # over one second on the HPC's clock, which reads whole seconds
    poller.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.FAILED and case.outcome == "timed_out" and case.stop_requested_at
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.ZOMBIE
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="stopped by SIGTERM")
    reaper.tick(ctx, time.time())
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE
    poller.tick(ctx, time.time())                            # the poller does not touch it again
    assert get_case(ctx.conn, case.case_id).outcome == "timed_out"


def test_no_timeout_while_the_hpc_cannot_be_reached(hpc, sshd):
    ctx = ctx_for(hpc(main_loop={"running_case_timeout_hours": 1 / 3600}))
    case = submitted(ctx, "slow", seconds=30)
    time.sleep(1.2)
    sshd.stop(kill_sessions=True)
    try:
        later = time.time() + 48 * 3600
        poller.tick(ctx, later)
        reaper.tick(ctx, later)
    finally:
        sshd.start()
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING


def test_a_task_that_finished_in_time_completes_even_when_seen_late(hpc):
    h = hpc(main_loop={"running_case_timeout_hours": 1 / 3600})
    ctx = ctx_for(h)
    case = submitted(ctx, "quick", seconds=0.1)
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task done")
    time.sleep(1.2)                                          # the poller comes back late
    reaper.tick(ctx, time.time() + 48 * 3600)
    case = poll_until_final(ctx, case.case_id)
    assert case.status is CaseStatus.COMPLETED


def test_reaper_flags_a_stuck_case_for_review_without_failing_it(hpc):
    ctx = ctx_for(hpc())
    case = submitted(ctx, "quiet", seconds=30)
    reaper.flag_stuck(ctx, time.time() + 31 * 60)
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.needs_review and "no progress" in case.review_reason
    assert reaper.flag_stuck(ctx, time.time() + 62 * 60) == 0   # flagged once


def test_reaper_reports_stale_worker_heartbeats(hpc):
    from shared.liveness import beat
    ctx = ctx_for(hpc())
    beat(ctx.conn, "poller", now=T0)
    assert reaper.check_heartbeats(ctx, T0 + 10) == []
    assert reaper.check_heartbeats(ctx, T0 + 301) == ["poller"]


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


def test_waiting_cases_are_pre_uploaded_while_every_gpu_is_busy(hpc):
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = ctx_for(h)
    first = submitted(ctx, "busy", seconds=1)
    waiting = registered(ctx, "waiting")
    assert submitter.tick(ctx, time.time()) == 0            # no free slot
    assert submitter.stage_tick(ctx, time.time()) == 1      # so the stager uploads ahead
    staged = get_case(ctx.conn, waiting.case_id)
    assert staged.status is CaseStatus.SUBMITTED and staged.staged_at and staged.claimed_by is None
    assert os.path.isdir(staged.remote_dir)
    assert submitter.stage_tick(ctx, time.time()) == 0      # one staged case per group is enough
    poll_until_final(ctx, first.case_id)
    marker = Path(staged.remote_dir, "staged-marker")
    marker.write_text("the very same folder")               # proves no second upload replaces it
    submitter.tick(ctx, time.time())
    running = get_case(ctx.conn, waiting.case_id)
    assert running.status is CaseStatus.RUNNING and running.remote_dir == staged.remote_dir
    assert marker.exists() and running.staged_at is None
    details = [e["detail"] for e in case_events(ctx.conn, waiting.case_id)]
    assert any(d.startswith("pre-uploaded to") for d in details)


def test_a_staged_case_whose_remote_folder_vanished_is_uploaded_again(hpc):
    import shutil
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = ctx_for(h)
    first = submitted(ctx, "busy", seconds=0.5)
    waiting = registered(ctx, "waiting")
    submitter.stage_tick(ctx, time.time())
    shutil.rmtree(get_case(ctx.conn, waiting.case_id).remote_dir)
    poll_until_final(ctx, first.case_id)
    submitter.tick(ctx, time.time())
    case = get_case(ctx.conn, waiting.case_id)
    assert case.status is CaseStatus.RUNNING and os.path.isdir(case.remote_dir)


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
