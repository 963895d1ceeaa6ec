"""reaper: timeouts, zombie slots, stuck cases, dead claims, spool repairs, worker heartbeats.

A case ``running`` past ``running_case_timeout_hours`` is failed (``timed_out``)
first, its slot marked zombie, and then killed; a zombie slot returns to
``available`` only once the HPC shows no unfinished task of ours in its group (a
failed case's task is killed again while it runs, or removed while it waits). A case whose ``status_updated_at`` did
not move for ``stuck_after_minutes`` is flagged for an operator, never failed.
It also runs the day-to-day steps, which never change a case's status: results delivery
(``shared.delivery``, one case per pass), clean-up (``shared.retention``) and notices
(``shared.notify``, which never waits for the notifier).
"""
from __future__ import annotations

import sys

from shared import pueue
from shared.delivery import deliver_pending
from shared.doorbell import listen, ring
from shared.errors import RemoteFailure
from shared.lifecycle import move_case
from shared.logs import for_case
from shared.notify import send_notifications
from shared.recovery import recover_expired_claims
from shared.retention import apply_retention
from shared.spool import reconcile, sweep_staging
from shared.states import CaseStatus, Outcome, SlotStatus
from shared.store import (Case, Slot, all_slots, case_from_row, case_label, flag_for_review,
                          get_case, transition_slot)
from shared.worker import Context, note_reach, per_item, worker_main

OUR_LABEL = "mqic_case_"


def timed_out_cases(ctx: Context, now: float) -> list[Case]:
    limit = now - ctx.config.main_loop.running_case_timeout_hours * 3600
    rows = ctx.conn.execute("SELECT * FROM cases WHERE status = 'running'"
                            " AND COALESCE(started_at, status_updated_at) < ? ORDER BY case_id", (limit,))
    return [case_from_row(r) for r in rows]


def kill_task(ctx: Context, case: Case) -> bool:
    """Ask pueue to kill the case's task; True when pueue accepted the kill."""
    if case.pueue_task_id is None:
        return False
    try:
        result = pueue.kill(ctx.remote, ctx.pueue_cmd, [case.pueue_task_id],
                            timeout=ctx.config.hpc.command_timeout_seconds)
    except RemoteFailure as exc:
        ctx.log.warning("case %d: kill of task %d failed (%s); will retry", case.case_id,
                        case.pueue_task_id, exc, extra=for_case(case.case_id, "kill", exc))
        return False
    return case.pueue_task_id in result.killed


def reap_timeout(ctx: Context, case: Case, now: float) -> bool:
    hours = ctx.config.main_loop.running_case_timeout_hours
    moved = move_case(ctx.conn, ctx.spool, case, CaseStatus.FAILED, now=now, worker=ctx.name,
                      detail=f"running longer than {hours:g} h: killing task {case.pueue_task_id}",
                      slot_to=SlotStatus.ZOMBIE,
                      fields={"outcome": Outcome.TIMED_OUT.value, "completed_at": now,
                              "error_type": "Timeout", "error_message": f"ran longer than {hours:g} h"})
    if moved:
        ctx.log.error("case %d timed out after %g h; killing pueue task %s", case.case_id, hours,
                      case.pueue_task_id, extra=for_case(case.case_id, "timeout") | {"error_type": "Timeout"})
        kill_task(ctx, case)
    return moved


def unfinished_tasks_by_group(snapshot: pueue.Snapshot) -> dict[str, list[pueue.TaskInfo]]:
    """Our tasks (label ``mqic_case_*``) that have not finished, by group."""
    groups: dict[str, list[pueue.TaskInfo]] = {}
    for task in snapshot.tasks.values():
        if task.label and task.label.startswith(OUR_LABEL) and not task.is_done:
            groups.setdefault(task.group, []).append(task)
    return groups


def stop_task(ctx: Context, case: Case, task: pueue.TaskInfo) -> None:
    """Kill a running task of a finished case, or remove it while it is still waiting."""
    try:
        if task.state.is_active:
            pueue.kill(ctx.remote, ctx.pueue_cmd, [task.id], timeout=ctx.config.hpc.command_timeout_seconds)
        else:
            pueue.remove(ctx.remote, ctx.pueue_cmd, [task.id], timeout=ctx.config.hpc.command_timeout_seconds)
    except RemoteFailure as exc:
        ctx.log.warning("case %d: cannot stop task %d (%s); will retry", case.case_id, task.id, exc,
                        extra=for_case(case.case_id, "stop_task", exc))


def reclaim_zombie(ctx: Context, slot: Slot, unfinished: list[pueue.TaskInfo], now: float) -> bool:
    """Free a zombie slot once its group has no unfinished task of ours; stop a failed case's task."""
    if not unfinished:
        freed = transition_slot(ctx.conn, slot.pueue_group, SlotStatus.ZOMBIE, SlotStatus.AVAILABLE,
                                now=now, worker=ctx.name, case_id=slot.assigned_case_id,
                                detail="no unfinished task of ours in the group")
        if freed:
            ring(ctx.spool.root, "submitter")
            ctx.log.info("zombie slot %s reclaimed", slot.pueue_group,
                         extra=for_case(slot.assigned_case_id, "reclaim"))
        return freed
    case = get_case(ctx.conn, slot.assigned_case_id) if slot.assigned_case_id else None
    if case is not None and case.status is CaseStatus.FAILED:
        for task in unfinished:
            if task.label == case_label(case.case_id):
                stop_task(ctx, case, task)
    return False


def reclaim_zombies(ctx: Context, now: float) -> int:
    zombies = [s for s in all_slots(ctx.conn) if s.status is SlotStatus.ZOMBIE]
    if not zombies:
        return 0
    try:
        snapshot = pueue.statuses(ctx.remote, ctx.pueue_cmd, timeout=ctx.config.hpc.command_timeout_seconds)
    except RemoteFailure as exc:
        note_reach(ctx, exc)
        ctx.log.warning("cannot check zombie slots (%s); will retry", exc, extra=for_case(None, "reclaim", exc))
        return 0
    note_reach(ctx, None)
    unfinished = unfinished_tasks_by_group(snapshot)
    return sum(reclaim_zombie(ctx, slot, unfinished.get(slot.pueue_group, []), now) for slot in zombies)


def flag_stuck(ctx: Context, now: float) -> int:
    limit = now - ctx.config.main_loop.stuck_after_minutes * 60
    rows = ctx.conn.execute("SELECT * FROM cases WHERE status IN ('submitting', 'running')"
                            " AND needs_review = 0 AND status_updated_at < ?", (limit,)).fetchall()
    flagged = 0
    for case in map(case_from_row, rows):
        minutes = (now - case.status_updated_at) / 60
        if flag_for_review(ctx.conn, case, f"no progress for {minutes:.0f} min in {case.status.value}",
                                    now=now, worker=ctx.name):
            ctx.log.warning("case %d flagged for review: no change for %.0f min", case.case_id, minutes,
                            extra=for_case(case.case_id, "stuck") | {"error_type": "Stuck"})
            flagged += 1
    return flagged


def check_heartbeats(ctx: Context, now: float) -> list[str]:
    """Names of workers whose heartbeat is older than ``health.unhealthy_after_seconds``."""
    limit = now - ctx.config.unhealthy_after_seconds
    stale = [r[0] for r in ctx.conn.execute("SELECT name FROM workers WHERE heartbeat < ?", (limit,))]
    warned = ctx.state.setdefault("stale_workers", set())
    for name in set(stale) - warned:
        ctx.log.error("worker %s has not written a heartbeat for over %g s", name,
                      ctx.config.unhealthy_after_seconds, extra={"operation": "heartbeat", "error_type": "Stale"})
    ctx.state["stale_workers"] = set(stale)
    return stale


def tick(ctx: Context, now: float) -> int:
    """One pass of every housekeeping step."""
    done = reconcile(ctx.conn, ctx.spool, now=now, worker=ctx.name)
    sweep_staging(ctx.spool)
    done += recover_expired_claims(ctx, now)
    for case in timed_out_cases(ctx, now):
        with per_item(ctx, case.case_id, "timeout"):
            done += reap_timeout(ctx, case, now)
    done += reclaim_zombies(ctx, now)
    done += flag_stuck(ctx, now)
    done += deliver_pending(ctx, now)
    done += apply_retention(ctx, now)
    done += send_notifications(ctx, now)
    check_heartbeats(ctx, now)
    return done


def listen_for_work(ctx: Context) -> None:
    listen(ctx.spool.root, "reaper", ctx.wake)


def main(argv=None) -> int:
    return worker_main("mqic-reaper", "reaper", tick, argv, prepare=listen_for_work)


if __name__ == "__main__":
    sys.exit(main())
