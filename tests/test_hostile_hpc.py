"""An HPC that drops answers and reuses ids, against the real workers, sshd and the stand-in.

These tests use only the workers' ticks and the operator CLI, so each one also shows
the defect on a version without the fix.
"""
from __future__ import annotations

import time

from sandbox.procs import is_alive
from shared.states import CaseStatus
from shared.store import get_case
from shared.recovery import recover_expired_claims
from tests.conftest import wait_until
from tests.test_workers import ctx_for, registered, submitted
from workers import poller, reaper, submitter

# Once (while the flag exists) `pueue add` hangs without an answer, so our ssh gives up, and
# its request reaches the daemon only 3 s later: the task is stored after the client gave up
# (``<shim>.late`` holds the pid of that late add).
LATE_ADD = """#!/bin/sh
real="$(dirname "$0")/hpc0/bin/pueue"
if [ "$1" = add ] && [ -e "$0.flag" ]; then
  rm -f "$0.flag"
  nohup sh -c 'echo $$ > "$1.partial" && mv "$1.partial" "$1"; shift; sleep 3; exec "$@"' sh "$0.late" "$real" "$@" >/dev/null 2>&1 &
  sleep 8   # well past our 2 s command timeout and the late add (3 s)
fi
exec "$real" "$@"
"""


def test_a_lost_add_answer_never_runs_the_case_twice(hpc, tmp_path):
    slow = tmp_path / "late-add-pueue"
    slow.write_text(LATE_ADD)
    slow.chmod(0o755)
    h = hpc(hpc={"pueue_command": str(slow), "command_timeout_seconds": 2},
            main_loop={"lease_seconds": 5, "backoff_base_seconds": 1})
    ctx = ctx_for(h)
    case = registered(ctx, "late add")
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    slow.with_name(slow.name + ".flag").touch()
    submitter.tick(ctx, time.time())                         # our ssh gives up; the add is still in flight

    def settled():
        now = time.time()
        recover_expired_claims(ctx, now)
        submitter.tick(ctx, now)
        poller.tick(ctx, now)
        return get_case(ctx.conn, case.case_id).status is CaseStatus.COMPLETED

    wait_until(settled, timeout=60, interval=0.5, message="case completed")
    late = slow.with_name(slow.name + ".late")
    wait_until(lambda: late.exists() and not is_alive(int(late.read_text())), timeout=30,
               message="the late add landed")
    assert len(h.tasks_labelled(case.label)) == 1            # one remote task: never run twice


def reused_by_foreign_task(h, case):
    """Our task finished; another user cleans, and their new task takes our recorded id."""
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="our task done")
    assert h.pueue("clean").returncode == 0
    foreign = h.pueue("add", "--print-task-id", "-g", case.slot, "--label", "other_user_job",
                      "--", "sleep 30")
    assert int(foreign.stdout.strip().splitlines()[-1]) == case.task_id
    wait_until(lambda: h.tasks_labelled("other_user_job")[0]["status"].get("Running"), message="foreign running")


def foreign_still_running(h) -> bool:
    time.sleep(1)  # pueue reports a kill a moment after it happens
    return bool(h.tasks_labelled("other_user_job")[0]["status"].get("Running"))


def test_a_timeout_never_kills_another_users_task_that_took_our_id(hpc):
    h = hpc(main_loop={"running_case_timeout_hours": 1 / 3600})
    ctx = ctx_for(h)
    case = submitted(ctx, "finished, poller behind", seconds=0.1)
    reused_by_foreign_task(h, case)
    later = time.time() + 2 * 3600
    reaper.tick(ctx, later)
    poller.tick(ctx, later)
    assert foreign_still_running(h)
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.COMPLETED   # from its exit record


def test_cancel_never_kills_another_users_task_that_took_our_id(hpc):
    from console.cli import main as mqic
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "cancelled after its id was reused", seconds=0.1)
    reused_by_foreign_task(h, case)
    assert mqic(["--config", str(h.config_path), "cancel", str(case.case_id)]) == 0
    reaper.tick(ctx, time.time())
    assert foreign_still_running(h)


def test_case_values_reach_the_task_as_environment_variables_never_as_code(hpc, tmp_path):
    from pathlib import Path
    from sandbox.hpc import remote_command
    h = hpc(hpc={"remote_command": remote_command() + ' && printf %s "$MQIC_CASE_NAME" > arrived.txt',
                 "result_files": ["output/*", "arrived.txt"]})
    ctx = ctx_for(h)
    name = 'x"; touch pwned; echo "$(touch pwned2)` touch pwned3`'
    case = submitted(ctx, name, seconds=0.1)
    wait_until(lambda: poller.tick(ctx, time.time()) >= 0 and get_case(ctx.conn, case.case_id).status
               is CaseStatus.COMPLETED, message="completed")
    case = get_case(ctx.conn, case.case_id)
    assert Path(case.case_path, "arrived.txt").read_text() == name
    assert not list(tmp_path.rglob("pwned*"))
