"""Reconciling a ``submitting`` case whose owner died or whose ``pueue add`` answer was lost.

From one fresh snapshot, ``shared.tasks.resolve_claim`` finds what became of the task and
the verdict table (``shared.verdicts``, phase ``claim``) says what happens: a task
carrying the case's label in the group of the slot it claimed is adopted (the case is
``running``); one in another group is an orphan that the reaper stops. No such task
proves nothing while an add may still land (``add_uncertain_until``); after that, an
exit record in the case's remote folder means the task ran and pueue forgot it (adopted:
the poller settles it from the record); with neither, the case is requeued. Could not
tell: nothing changes and the next pass asks again. This is the only way an expired
claim goes back to ``submitted``, so no case ever gets a second remote task.
"""
from __future__ import annotations

import logging

from shared import tasks, verdicts
from shared.backends import model
from shared.claims import expired_leases
from shared.errors import RemoteFailure
from shared.lifecycle import move_case, requeue_or_fail
from shared.logs import for_case
from shared.states import CaseStatus
from shared.store import Case, CLAIM_CLEARS, flag_for_review
from shared.verdicts import Action, Phase, Verdict
from shared.worker import (
    REPEAT_LOG_SECONDS, Context, Host, note_reach, on_reachable_hosts, per_item, worth_logging)


log = logging.getLogger("mqic.recovery")


def recover_claim(ctx: Context, host: Host, case: Case, snapshot: model.Snapshot, now: float) -> str:
    """Resolve one expired ``submitting`` claim; return found / not_found / waiting / unreachable."""
    labelled = tasks.claimed_tasks(case, snapshot)
    may_land = case.add_uncertain_until is not None and now < case.add_uncertain_until
    record = exit_record(ctx, host, case) if not labelled and not may_land else None
    link = tasks.resolve_claim(case, snapshot, record, add_may_land=may_land)
    verdict = verdicts.verdict_for(link, Phase.CLAIM)
    if verdict.action is Action.ADOPT:
        adopt(ctx, case, link.task, now)
        if len(labelled) > 1:
            flag_for_review(ctx.conn, case, f"{len(labelled)} remote tasks carry label {case.label}",
                            now=now, worker=ctx.name)
        return "found"
    if verdict.action is Action.REQUEUE:
        requeue(ctx, case, verdict, now)
        return "not_found"
    if verdict.action is not Action.WAIT:
        raise verdicts.Unlisted(f"recovery cannot carry out {verdict.action}")
    if may_land:
        return "waiting"  # an add whose answer was lost may still land: no task proves nothing yet
    if worth_logging(ctx, f"recover:{case.case_id}", now, REPEAT_LOG_SECONDS):
        log.warning("case %d: claim expired, HPC could not tell; will ask again", case.case_id,
                    extra=for_case(case.case_id, "recover_claim"))
    return "unreachable"


def requeue(ctx: Context, case: Case, verdict: Verdict, now: float) -> None:
    """No task and no exit record: the case runs again as the verdict says."""
    reason = f"claim of {case.claimed_by} expired"
    if requeue_or_fail(ctx.conn, ctx.spool, case, ctx.config.main_loop, verdict.error_type,
                       f"recover_claim: {verdict.error_type}: {reason}", counted=verdict.uses_attempt, retry=True,
                       outcome=verdict.outcome, slot_to=verdict.slot, now=now, worker=ctx.name, guard=guard_of(case)):
        log.info("case %d: claim expired and no remote task exists; retrying", case.case_id,
                 extra=for_case(case.case_id, "recover_claim"))


def guard_of(case: Case) -> dict:
    return {"claimed_by": case.claimed_by, "lease_until": case.lease_until}


def exit_record(ctx: Context, host: Host, case: Case) -> tasks.ExitRecord | None:
    """The case's exit record (MISSING without a remote folder), or None when it could not be read."""
    if not case.remote_dir:
        return tasks.Record.MISSING
    try:
        return tasks.read_exit_records(host.remote, [case.remote_dir], timeout=host.timeout)[case.remote_dir]
    except RemoteFailure as exc:
        note_reach(ctx, host, exc)
        return None


def adopt(ctx: Context, case: Case, task: model.TaskInfo | None, now: float) -> None:
    """The case's task exists (or ran and left its exit record): the case is running."""
    # Only the claim: unlike record_running, staged_at and stop_requested_at stay as they are.
    fields = {**CLAIM_CLEARS, "task_id": None if task is None else task.id, "running_since": now}
    if task is not None and task.path:
        fields["remote_dir"] = task.path
    how = f"task {task.id} found by label {case.label}" if task else "its exit record found on the HPC"
    if move_case(ctx.conn, ctx.spool, case, CaseStatus.RUNNING, now=now, worker=ctx.name, fields=fields,
                 guard=guard_of(case), detail=f"recovered: {how}"):
        log.info("case %d: recovered, %s", case.case_id, how, extra=for_case(case.case_id, "recover_claim"))


def recover_expired_claims(ctx: Context, now: float, limit: int = 20) -> int:
    """Resolve every expired ``submitting`` claim from one snapshot of its host; return how many were settled.

    A host that cannot answer (or was last seen unreachable) leaves its claims as they are;
    the other hosts go on.
    """
    expired = expired_leases(ctx.conn, now, limit=limit)
    return sum(recover_on(ctx, host, cases, now)
               for host, cases in on_reachable_hosts(ctx, expired, now, "expired claim(s)"))


def recover_on(ctx: Context, host: Host, expired: list[Case], now: float) -> int:
    try:
        snapshot = host.snapshot()
    except RemoteFailure as exc:
        note_reach(ctx, host, exc)
        if worth_logging(ctx, f"recover:{host.name}", now, REPEAT_LOG_SECONDS):
            log.warning("%d expired claim(s): host %s could not tell (%s); will ask again", len(expired),
                        host.name, exc, extra=for_case(None, "recover_claim", exc))
        return 0
    note_reach(ctx, host, None)
    settled = 0
    for case in expired:
        with per_item(ctx, case.case_id, "recover_claim"):
            settled += recover_claim(ctx, host, case, snapshot, now) in ("found", "not_found")
    return settled
