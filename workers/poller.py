"""poller: follows every ``running`` case with one ``pueue status`` and one ``pueue log`` per pass.

Success: results are fetched, the case completes and its slot is freed. Failure,
kill or spawn failure: the case fails with its exit code and last log lines and
the slot becomes a zombie until the reaper sees the group idle. A task missing
from the queue is looked up by label in the same snapshot; proven absent, the case
is retried. Unreachable HPC, garbage output or an unknown pueue state change
nothing: "could not tell" is never "failed".
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from shared import pueue
from shared.doorbell import listen, ring
from shared.errors import RemoteFailure
from shared.lifecycle import move_case, retry_or_fail
from shared.logs import for_case
from shared.states import CaseStatus, Outcome, SlotStatus
from shared.spool import merge_into, settle_folder
from shared.store import Case, cases_with_status, get_case, release_slot_of, update_case
from shared.worker import Context, note_reach, per_item, worker_main

FAILED_OUTCOMES = {
    pueue.TaskState.FAILED: Outcome.FAILED,
    pueue.TaskState.KILLED: Outcome.KILLED,
    pueue.TaskState.FAILED_TO_SPAWN: Outcome.FAILED_TO_SPAWN,
    pueue.TaskState.DEPENDENCY_FAILED: Outcome.FAILED,
    pueue.TaskState.ERRORED: Outcome.FAILED,
}
LOGGED_PAUSED = "logged_paused_groups"


class TaskVanished(RemoteFailure):
    """The case's task is no longer in pueue's list (cleaned or removed) and left no result."""


def task_of(case: Case, snapshot: pueue.Snapshot) -> pueue.TaskInfo | None:
    """The case's task: by recorded id if the label still matches (ids are reused), else by label."""
    task = snapshot.tasks.get(case.pueue_task_id) if case.pueue_task_id is not None else None
    if task is not None and task.label == case.label:
        return task
    found = snapshot.by_label(case.label)
    return max(found, key=lambda t: t.id) if found else None


def fetch_snapshot(ctx: Context) -> pueue.Snapshot | None:
    try:
        snapshot = pueue.statuses(ctx.remote, ctx.pueue_cmd, timeout=ctx.config.hpc.command_timeout_seconds)
    except RemoteFailure as exc:
        note_reach(ctx, exc)
        ctx.log.warning("pueue status could not be read (%s: %s); nothing changed, trying again",
                        type(exc).__name__, exc, extra=for_case(None, "poll", exc))
        return None
    note_reach(ctx, None)
    return snapshot


def fetch_logs(ctx: Context, task_ids: list[int]) -> dict[int, str] | None:
    """The log tails of ``task_ids``, or None when ``pueue log`` could not be read this pass."""
    try:
        return pueue.logs(ctx.remote, ctx.pueue_cmd, task_ids, lines=ctx.config.pueue.log_lines,
                          timeout=ctx.config.hpc.command_timeout_seconds)
    except RemoteFailure as exc:
        ctx.log.warning("pueue log could not be read (%s)", exc, extra=for_case(None, "poll_logs", exc))
        return None


def handle_paused_groups(ctx: Context, snapshot: pueue.Snapshot) -> None:
    ours = {g.name for g in ctx.config.pueue.groups}
    paused = [g for g in snapshot.paused_groups() if g in ours]
    for group in paused:
        ctx.log.error("pueue group %s is PAUSED on the HPC (pueued restarted?); queued cases wait%s",
                      group, "; resuming it" if ctx.config.pueue.resume_paused_groups else
                      "; resume it with `pueue start -g " + group + "`",
                      extra={"operation": "poll", "error_type": "GroupPaused"})
        if ctx.config.pueue.resume_paused_groups:
            try:
                pueue.resume_group(ctx.remote, ctx.pueue_cmd, group)
            except RemoteFailure as exc:
                ctx.log.warning("could not resume %s: %s", group, exc, extra=for_case(None, "resume", exc))


def complete(ctx: Context, case: Case, task: pueue.TaskInfo, now: float) -> bool:
    """Fetch results into a private folder, then, only if this worker wins the move, file them."""
    staging = ctx.spool.staging_dir(f"results-{case.case_id}")
    try:
        if ctx.config.hpc.result_files:
            free_gpu_early(ctx, case, now)
            if not fetch_results(ctx, case, task, staging):
                return False
        with ctx.spool.lock():
            current = get_case(ctx.conn, case.case_id)
            if current is None or current.status is not CaseStatus.RUNNING:
                return False  # another poller finished it first
            folder = settle_folder(ctx.conn, ctx.spool, case.case_id, now=now, worker=ctx.name)
            if staging.exists() and folder is not None:  # None: flagged for review, results stay remote
                merge_into(staging, folder)
            moved = move_case(ctx.conn, ctx.spool, current, CaseStatus.COMPLETED, now=now, worker=ctx.name,
                              detail=f"pueue task {task.id} succeeded", slot_to=SlotStatus.AVAILABLE,
                              fields={"outcome": Outcome.SUCCESS.value, "exit_code": 0, "progress": 100.0,
                                      "completed_at": now, "pueue_task_id": task.id})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if moved:
        ring(ctx.spool.root, "submitter")
        ctx.log.info("case %d completed", case.case_id, extra=for_case(case.case_id, "complete"))
    return moved


def free_gpu_early(ctx: Context, case: Case, now: float) -> None:
    """The task is over, so its GPU is free: hand the slot on before the download."""
    if release_slot_of(ctx.conn, case, SlotStatus.AVAILABLE, now=now, worker=ctx.name,
                       detail=f"task of case {case.case_id} succeeded; results being fetched"):
        ring(ctx.spool.root, "submitter")


def fetch_results(ctx: Context, case: Case, task: pueue.TaskInfo, staging: Path) -> bool:
    staging.mkdir(parents=True, exist_ok=True)
    try:
        names = ctx.remote.download_results(task.path or case.remote_dir, ctx.config.hpc.result_files, staging)
    except RemoteFailure as exc:
        ctx.log.warning("case %d: result download failed (%s); will retry", case.case_id, exc,
                        extra=for_case(case.case_id, "download", exc))
        return False
    ctx.log.info("case %d: fetched %d result files", case.case_id, len(names),
                 extra=for_case(case.case_id, "download"))
    return True


def fail(ctx: Context, case: Case, task: pueue.TaskInfo, log_tail: str, now: float) -> bool:
    outcome = FAILED_OUTCOMES[task.state]
    reason = task.detail or (f"exit code {task.exit_code}" if task.exit_code is not None else task.state.value)
    moved = move_case(ctx.conn, ctx.spool, case, CaseStatus.FAILED, now=now, worker=ctx.name,
                      detail=f"pueue task {task.id}: {task.state.value} ({reason})",
                      slot_to=SlotStatus.ZOMBIE,
                      fields={"outcome": outcome.value, "exit_code": task.exit_code, "completed_at": now,
                              "error_type": f"Task{task.state.value.title().replace('_', '')}",
                              "error_message": reason[:2000], "log_tail": log_tail[-4000:],
                              "pueue_task_id": task.id})
    if moved:
        ring(ctx.spool.root, "reaper")
        ctx.log.error("case %d failed: %s (%s)", case.case_id, task.state.value, reason,
                      extra=for_case(case.case_id, "complete") | {"error_type": outcome.value})
    return moved


def vanished(ctx: Context, case: Case, now: float) -> bool:
    error = TaskVanished(f"task {case.pueue_task_id} ({case.label}) is no longer in pueue")
    status = retry_or_fail(ctx.conn, ctx.spool, case, ctx.config.main_loop, error, now=now,
                           worker=ctx.name, operation="poll", outcome=Outcome.VANISHED)
    ctx.log.warning("case %d: %s; case is now %s", case.case_id, error, status and status.value,
                    extra=for_case(case.case_id, "poll", error))
    ring(ctx.spool.root, "submitter")
    return status is not None


def update_progress(ctx: Context, case: Case, task: pueue.TaskInfo, output: str | None, now: float) -> bool:
    fields = {}
    progress = pueue.parse_progress(output or "", ctx.config.pueue.progress_pattern)
    if progress is not None and abs(progress - case.progress) >= 0.01:
        fields["progress"] = progress
    if task.start is not None and case.started_at != task.start.timestamp():
        fields["started_at"] = task.start.timestamp()
    if task.id != case.pueue_task_id:
        fields["pueue_task_id"] = task.id
    if not fields:
        return False
    fields["status_updated_at"] = now
    return update_case(ctx.conn, case.case_id, CaseStatus.RUNNING, fields)


def apply(ctx: Context, case: Case, task: pueue.TaskInfo | None, outputs: dict[int, str] | None,
          now: float) -> bool:
    """Decide one running case from the snapshot; True when its row changed."""
    if task is None:
        return vanished(ctx, case, now)
    if task.state is pueue.TaskState.SUCCESS:
        return complete(ctx, case, task, now)
    if task.state in FAILED_OUTCOMES:
        if outputs is None:
            return False  # the failure stays; fail it on a pass that can keep its log tail
        return fail(ctx, case, task, outputs.get(task.id, ""), now)
    if task.state is pueue.TaskState.UNKNOWN:
        ctx.log.warning("case %d: pueue reports an unknown state (%s); could not tell, no change",
                        case.case_id, task.detail[:200], extra=for_case(case.case_id, "poll") | {"error_type": "UnknownState"})
        return False
    return update_progress(ctx, case, task, (outputs or {}).get(task.id), now)


def tick(ctx: Context, now: float) -> int:
    """One pass over all running cases: one status call, one log call."""
    running = cases_with_status(ctx.conn, CaseStatus.RUNNING, limit=10_000)
    if not running:
        return 0
    snapshot = fetch_snapshot(ctx)
    if snapshot is None:
        return 0
    handle_paused_groups(ctx, snapshot)
    tasks = {case.case_id: task_of(case, snapshot) for case in running}
    succeeded = [c for c in running if tasks[c.case_id] and tasks[c.case_id].state is pueue.TaskState.SUCCESS]
    changed = 0
    for case in succeeded:  # first, so freed GPUs are handed on before the log call
        with per_item(ctx, case.case_id, "poll"):
            changed += complete(ctx, case, tasks[case.case_id], now)
    wanted = [t.id for t in tasks.values() if t is not None and
              (t.state is pueue.TaskState.RUNNING or t.state in FAILED_OUTCOMES)]
    outputs = fetch_logs(ctx, wanted) if wanted else {}
    for case in running:
        if case not in succeeded:
            with per_item(ctx, case.case_id, "poll"):
                changed += apply(ctx, case, tasks[case.case_id], outputs, now)
    return changed


def poll_interval(ctx: Context) -> float:
    return ctx.config.main_loop.poll_interval_seconds


def listen_for_work(ctx: Context) -> None:
    listen(ctx.spool.root, "poller", ctx.wake)


def main(argv=None) -> int:
    return worker_main("mqic-poller", "poller", tick, argv, prepare=listen_for_work, idle_wait=poll_interval)


if __name__ == "__main__":
    sys.exit(main())
