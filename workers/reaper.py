"""reaper: orphan tasks, zombie slots, stuck cases, dead claims, spool repairs, worker heartbeats.

Every task that carries one of our labels but that no case owns (the task of a
failed, timed-out or cancelled case, or a late ``pueue add`` of a case that moved
on) is stopped through ``shared.tasks.stop``: removed while it waits, SIGTERM while
it runs, SIGKILL after ``kill_grace_seconds``; each is logged. A zombie seat returns
to ``available`` only once its host shows no unfinished task carrying the label of the
case that left it (other cases may run or wait in the same group: depth). Each host is
looked at from its own snapshot; a host last seen unreachable is probed every
``PROBE_DOWN_SECONDS`` with one cheap command, and marked up again when it answers. A
case whose ``status_updated_at`` did not move for ``stuck_after_minutes`` is flagged
for an operator, never failed. Timeouts are the poller's: they need a fresh answer.
Expired claims are settled by ``shared.recovery`` from the verdict table
(``shared.verdicts``, phase ``claim``); the reaper itself decides no case's fate from its
task: it only stops tasks that no case owns and frees seats that no task holds.
The day-to-day steps, which never change a case's status, run in a loop of their own
(``upkeep_tick``, a helper thread ``<name>-upkeep`` with its own heartbeat), so none of them
can ever hold up the safety steps above: results delivery (``shared.delivery``, one case per
pass; the share is only touched from a child process with a time limit), clean-up
(``shared.retention``) and notices (``shared.notify``, which never waits for the notifier).
"""
from __future__ import annotations

import sys

from shared import tasks
from shared.backends import model
from shared.delivery import deliver_pending
from shared.doorbell import listen, ring
from shared.errors import RemoteFailure
from shared.liveness import down_hosts, host_key_refused
from shared.logs import for_case
from shared.notify import send_notifications
from shared.recovery import recover_expired_claims
from shared.retention import apply_retention
from shared.seats import all_slots, Slot, transition_slot
from shared.spool import reconcile, sweep_staging
from shared.states import CaseStatus, SlotStatus, sql_list
from shared.store import Case, case_from_row, flag_for_review
from shared.worker import Context, Host, note_reach, per_item, reachable_hosts, start_helper_loop, worker_main

ORPHAN_CHECK_SECONDS = 30
PROBE_DOWN_SECONDS = 5


def probe_down_hosts(ctx: Context, now: float) -> int:
    """Ask each host last seen unreachable (and not asked for PROBE_DOWN_SECONDS) whether it answers.

    A host whose key ssh refused gets a handshake only, no command, until its key is accepted.
    """
    answered = 0
    key_refused = host_key_refused(ctx.conn)
    for name, checked_at in down_hosts(ctx.conn).items():
        host = ctx.host(name)
        if host is None or now - checked_at < PROBE_DOWN_SECONDS:
            continue
        try:
            if name in key_refused:  # only a handshake until the key is accepted again
                host.remote.check_host_key()
            host.remote.run(["true"], timeout=host.config.hpc.connect_timeout_seconds + 10)
        except RemoteFailure as exc:
            note_reach(ctx, host, exc)
            continue
        note_reach(ctx, host, None)
        answered += 1
        ring(ctx.spool.root, "submitter")
        ring(ctx.spool.root, "poller")
        ctx.log.info("host %s answers again", name, extra={"operation": "probe"})
    return answered


def snapshot_if_needed(ctx: Context, host: Host, zombies: list[Slot], now: float) -> model.Snapshot | None:
    """One snapshot of ``host`` when a zombie seat waits there, or every ORPHAN_CHECK_SECONDS for orphans."""
    checked = ctx.memory.orphans_checked_at
    if not zombies and now - checked.get(host.name, 0.0) < ORPHAN_CHECK_SECONDS:
        return None
    try:
        snapshot = host.snapshot()
    except RemoteFailure as exc:
        note_reach(ctx, host, exc)
        ctx.log.warning("host %s: cannot check zombie slots and orphan tasks (%s); will retry", host.name, exc,
                        extra=for_case(None, "reclaim", exc))
        return None
    note_reach(ctx, host, None)
    checked[host.name] = now
    return snapshot


def cases_by_id(ctx: Context, case_ids: list[int]) -> dict[int, Case]:
    marks = ",".join("?" * len(case_ids))
    rows = ctx.conn.execute(f"SELECT * FROM cases WHERE case_id IN ({marks})", case_ids) if case_ids else []
    return {row["case_id"]: case_from_row(row) for row in rows}


def stop_orphans(ctx: Context, host: Host, snapshot: model.Snapshot, now: float) -> int:
    """Stop every unfinished task with our label that its case does not own; return how many acted on."""
    acted = 0
    for task, case in tasks.orphans(snapshot, cases_by_id(ctx, tasks.our_case_ids(snapshot))):
        with per_item(ctx, case.case_id, "stop_orphan"):
            try:
                done = tasks.stop(ctx.conn, host.backend, ctx.config.main_loop.kill_grace_seconds, case, [task],
                                  now=now)
            except RemoteFailure as exc:
                ctx.log.warning("case %d: cannot stop task %d (%s); will retry", case.case_id, task.id, exc,
                                extra=for_case(case.case_id, "stop_orphan", exc))
                continue
            if done:
                acted += 1
                ctx.log.warning("case %d (%s): task %d on %s carries its label but is not its task: %s",
                                case.case_id, case.status.value, task.id, host.name, ", ".join(done),
                                extra=for_case(case.case_id, "stop_orphan"))
    return acted


def reclaim_zombies(ctx: Context, zombies: list[Slot], snapshot: model.Snapshot, now: float) -> int:
    """Free each zombie seat whose case has no unfinished task left on the host."""
    busy = set(tasks.our_case_ids(snapshot))
    freed = 0
    for slot in zombies:
        if slot.assigned_case_id in busy:
            continue
        if transition_slot(ctx.conn, slot, SlotStatus.ZOMBIE, SlotStatus.AVAILABLE,
                           now=now, worker=ctx.name, case_id=slot.assigned_case_id,
                           detail=f"no unfinished task of case {slot.assigned_case_id} on {slot.host}"):
            freed += 1
            ring(ctx.spool.root, "submitter")
            ctx.log.info("zombie slot %s reclaimed", slot.name, extra=for_case(slot.assigned_case_id, "reclaim"))
    return freed


def flag_stuck(ctx: Context, now: float) -> int:
    limit = now - ctx.config.main_loop.stuck_after_minutes * 60
    rows = ctx.conn.execute(f"SELECT * FROM cases WHERE status IN ({sql_list(CaseStatus.SUBMITTING, CaseStatus.RUNNING)})"
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
    warned = ctx.memory.stale_workers
    for name in set(stale) - warned:
        ctx.log.error("worker %s has not written a heartbeat for over %g s", name,
                      ctx.config.unhealthy_after_seconds, extra={"operation": "heartbeat", "error_type": "Stale"})
    ctx.memory.stale_workers = set(stale)
    return stale


def tick(ctx: Context, now: float) -> int:
    """One pass of every housekeeping step."""
    done = reconcile(ctx.conn, ctx.spool, now=now, worker=ctx.name)
    sweep_staging(ctx.spool)
    done += probe_down_hosts(ctx, now)
    done += recover_expired_claims(ctx, now)
    zombies = [s for s in all_slots(ctx.conn) if s.status is SlotStatus.ZOMBIE]
    for host in reachable_hosts(ctx):
        here = [slot for slot in zombies if slot.host == host.name]
        snapshot = snapshot_if_needed(ctx, host, here, now)
        if snapshot is not None:
            done += stop_orphans(ctx, host, snapshot, now)
            done += reclaim_zombies(ctx, here, snapshot, now)
    done += flag_stuck(ctx, now)
    check_heartbeats(ctx, now)
    return done


def upkeep_tick(ctx: Context, now: float) -> int:
    """One pass of the day-to-day steps (the upkeep loop's tick): delivery, clean-up, notices."""
    done = deliver_pending(ctx, now)
    done += apply_retention(ctx, now)
    return done + send_notifications(ctx, now)


def listen_for_work(ctx: Context) -> None:
    listen(ctx.spool.root, "reaper", ctx.wake)
    start_helper_loop(ctx, f"{ctx.name}-upkeep", upkeep_tick)


def main(argv=None) -> int:
    return worker_main("mqic-reaper", "reaper", tick, argv, prepare=listen_for_work)


if __name__ == "__main__":
    sys.exit(main())
