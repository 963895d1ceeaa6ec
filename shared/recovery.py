"""Reconciling a ``submitting`` case whose owner died, by its pueue label.

Found on the HPC: the case is ``running`` with that task id. Proven absent: it is
retried. Could not tell: nothing changes and the next pass asks again. This is the
only way an expired claim goes back to ``submitted``, so no case ever gets a
second remote task.
"""
from __future__ import annotations

import logging
import sqlite3

from shared import pueue
from shared.config import Config
from shared.errors import Unreachable
from shared.lifecycle import move_case, retry_or_fail
from shared.logs import for_case
from shared.spool import Spool
from shared.states import CaseStatus
from shared.store import Case, expired_leases, flag_for_review
from shared.worker import Context, per_item

log = logging.getLogger("mqic.recovery")


class ClaimExpired(Unreachable):
    """Stands for "the owner died mid-submission" when a claim is retried."""


def recover_claim(conn: sqlite3.Connection, spool: Spool, runner: pueue.Runner, config: Config,
                  case: Case, *, now: float, worker: str) -> str:
    """Resolve one expired ``submitting`` claim; return found / not_found / unreachable."""
    lookup = pueue.find_task_by_label(runner, list(config.hpc.pueue_command), case.label,
                                      timeout=config.hpc.command_timeout_seconds)
    guard = {"claimed_by": case.claimed_by, "lease_until": case.lease_until}
    if lookup.outcome is pueue.LookupOutcome.UNREACHABLE:
        log.warning("case %d: claim expired, HPC could not tell (%s); will ask again", case.case_id,
                    lookup.error, extra=for_case(case.case_id, "recover_claim"))
        return "unreachable"
    if lookup.outcome is pueue.LookupOutcome.FOUND:
        task = max(lookup.tasks, key=lambda t: t.id)
        fields = {"pueue_task_id": task.id, "claimed_by": None, "lease_until": None,
                  "pueue_group": task.group, "remote_dir": task.path or case.remote_dir}
        if move_case(conn, spool, case, CaseStatus.RUNNING, now=now, worker=worker, fields=fields,
                     guard=guard, detail=f"recovered: task {task.id} found by label {case.label}"):
            log.info("case %d: recovered task %d by label", case.case_id, task.id,
                     extra=for_case(case.case_id, "recover_claim"))
        if len(lookup.tasks) > 1:
            flag_for_review(conn, case, f"{len(lookup.tasks)} remote tasks carry label {case.label}",
                            now=now, worker=worker)
        return "found"
    retry_or_fail(conn, spool, case, config.main_loop, ClaimExpired(f"claim of {case.claimed_by} expired"),
                  now=now, worker=worker, operation="recover_claim", guard=guard)
    log.info("case %d: claim expired and no remote task exists; retrying", case.case_id,
             extra=for_case(case.case_id, "recover_claim"))
    return "not_found"


def recover_expired_claims(ctx: Context, now: float, limit: int = 20) -> int:
    """Resolve every expired ``submitting`` claim; return how many were settled (found or retried)."""
    settled = 0
    for case in expired_leases(ctx.conn, now, limit=limit):
        with per_item(ctx, case.case_id, "recover_claim"):
            settled += recover_claim(ctx.conn, ctx.spool, ctx.remote, ctx.config, case, now=now,
                                     worker=ctx.name) != "unreachable"
    return settled


class TaskStillActive(Exception):
    """A task carrying the case's label has not finished: the case cannot be retried yet."""


def clear_label(runner: pueue.Runner, config: Config, case: Case) -> list[int]:
    """Before a retry: remove the finished tasks labelled with ``case``, so the label is free.

    The label then names at most one task, and recovery can never mistake an old
    finished task for the retry's. Raises TaskStillActive when a labelled task has
    not finished, and Unreachable when pueue could not tell.
    """
    lookup = pueue.find_task_by_label(runner, list(config.hpc.pueue_command), case.label,
                                      timeout=config.hpc.command_timeout_seconds)
    if lookup.outcome is pueue.LookupOutcome.UNREACHABLE:
        raise Unreachable(f"cannot check the old tasks of {case.label}: {lookup.error}")
    unfinished = [t.id for t in lookup.tasks if not t.is_done]
    if unfinished:
        raise TaskStillActive(f"task(s) {unfinished} labelled {case.label} have not finished")
    finished = [t.id for t in lookup.tasks]
    if finished:
        pueue.remove(runner, list(config.hpc.pueue_command), finished,
                     timeout=config.hpc.command_timeout_seconds)
    return finished
