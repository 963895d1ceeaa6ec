"""What an operator may do to cases: retry, cancel, acknowledge. The CLI only calls these.

Each action goes through the same guarded moves as the workers (``move_case``), so it
never races a worker into an inconsistent row, and each decision about a remote task
goes through ``shared.tasks`` on a fresh snapshot.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime
from dataclasses import dataclass, replace

from shared import retention, tasks
from shared.backends import Backend, backend_for, model
from shared.config import Config
from shared.errors import MqicError, RemoteFailure
from shared.lifecycle import move_case
from shared.remote import Remote
from shared.spool import Spool
from shared.states import FINAL, CaseStatus, Outcome, SlotStatus
from shared.store import Case, clear_review, get_case, RETRY_CLEARS

def local_time(config: Config, stamp: float) -> str:
    return datetime.fromtimestamp(stamp, config.tz).strftime("%Y-%m-%d %H:%M:%S %Z")


class Refused(MqicError):
    """The action is not possible for this case right now; the message says why."""


@dataclass(frozen=True)
class Operator:
    conn: sqlite3.Connection
    config: Config
    who: str

    @property
    def spool(self) -> Spool:
        return Spool(self.config.spool_path).ensure()

    def backend(self, host_name: str | None) -> Backend:
        """The scheduler of the case's host ``host_name``; Refused when it is not configured."""
        host = self.config.host(host_name)
        if host is None:
            raise Refused(f"host {host_name!r} is not configured; add it back to the config to act on its tasks")
        return backend_for(self.config, host, Remote(host.hpc))

    def snapshot(self, host_name: str | None) -> model.Snapshot:
        """A fresh look at host ``host_name`` (None: never placed, so no tasks); Refused when it cannot tell."""
        if host_name is None:
            return model.Snapshot(tasks={})
        try:
            return replace(self.backend(host_name).snapshot(), host=host_name)
        except (RemoteFailure, OSError) as exc:
            detail = " ".join(str(exc).split())
            raise Refused(f"host {host_name} could not tell what its tasks are ({type(exc).__name__}: {detail}); "
                          f"try again when it is reachable") from None

    def case(self, case_id: int) -> Case:
        case = get_case(self.conn, case_id)
        if case is None:
            raise Refused(f"case {case_id} not found")
        return case


def failed_case_ids(conn: sqlite3.Connection, outcome: str | None = None) -> list[int]:
    """Ids of the failed cases, optionally only those with ``outcome``."""
    query = f"SELECT case_id FROM cases WHERE status = {CaseStatus.FAILED.sql}" + (" AND outcome = ?" if outcome else "")
    return [row[0] for row in conn.execute(query + " ORDER BY case_id", (outcome,) if outcome else ())]


def retry(op: Operator, case_ids: list[int], *, now: float) -> list[tuple[int, str]]:
    """Send failed cases back to ``submitted``; returns (case id, what happened) for each.

    One snapshot per host serves all of them. A case is refused while a task of it has
    not finished or its slot is still zombie; its finished tasks are removed from the
    scheduler first, so the label ``mqic_case_<id>`` names only the retry's task.
    """
    results, ready = [], []
    for case_id in case_ids:
        try:
            ready.append(retryable(op, op.case(case_id)))
        except Refused as exc:
            results.append((case_id, f"refused: {exc}"))
    snapshots: dict[str | None, model.Snapshot] = {}
    for case in ready:
        try:
            if case.host not in snapshots:
                snapshots[case.host] = op.snapshot(case.host)
            results.append((case.case_id, retry_one(op, case, snapshots[case.host], now)))
        except (Refused, RemoteFailure, tasks.TaskStillActive) as exc:
            results.append((case.case_id, f"refused: {' '.join(str(exc).split())}"))
    return sorted(results)


def retryable(op: Operator, case: Case) -> Case:
    """``case`` if it may be retried as far as our own records tell; Refused otherwise."""
    if case.status is not CaseStatus.FAILED:
        raise Refused(f"case {case.case_id} is {case.status.value}: only failed cases can be retried")
    zombie = op.conn.execute(f"SELECT pueue_group FROM gpu_resources WHERE status = {SlotStatus.ZOMBIE.sql}"
                             " AND assigned_case_id = ?", (case.case_id,)).fetchone()
    if zombie is not None:
        raise Refused(f"case {case.case_id}: its previous task may still run (slot {zombie[0]} is zombie "
                      f"until the reaper sees it gone); retry once the slot is free")
    return case


def retry_one(op: Operator, case: Case, snapshot: model.Snapshot, now: float) -> str:
    backend = op.backend(case.host) if case.host is not None else None
    removed = tasks.clear_finished(backend, case, snapshot) if backend is not None else []
    detail = (f"operator retry (was {case.outcome or 'failed'}, task {case.task_id}); back in the queue "
              f"behind the cases already waiting (queued before at {local_time(op.config, case.submitted_at)})")
    if removed:
        detail += f"; removed finished {backend.words.task}(s) {removed} from {backend.words.scheduler}"
    # A fresh queue time: the retried case waits its turn instead of counting as waiting since its
    # drop (which would let it pass urgent cases through scheduling.max_wait_minutes).
    if not move_case(op.conn, op.spool, case, CaseStatus.SUBMITTED, now=now, worker=op.who,
                     detail=detail, fields={**RETRY_CLEARS, "submitted_at": now}):
        raise Refused(f"case {case.case_id} changed meanwhile; look again with `mqic show {case.case_id}`")
    return f"failed ({case.outcome}) -> submitted (folder {get_case(op.conn, case.case_id).case_path})"


def cancel(op: Operator, case_id: int, *, now: float) -> tuple[Case, str]:
    """A running or submitted case becomes failed (``cancelled``); a running task gets SIGTERM.

    Returns the case as it was and what happened to its task. The slot of a running
    case becomes zombie; the reaper sends SIGKILL after the grace period and frees it.
    """
    case = op.case(case_id)
    if case.status is CaseStatus.SUBMITTING:
        raise Refused(f"case {case.case_id} is being submitted right now (in flight); retry the cancel in a moment")
    if case.status in FINAL:
        raise Refused(f"case {case.case_id} is already {case.status.value}; nothing to cancel")
    running = case.status is CaseStatus.RUNNING
    fields = {"outcome": Outcome.CANCELLED.value, "completed_at": now, "error_type": "Cancelled",
              "error_message": f"cancelled by {op.who}", "claimed_by": None, "lease_until": None}
    if not move_case(op.conn, op.spool, case, CaseStatus.FAILED, now=now, worker=op.who,
                     detail="cancelled by operator", fields=fields,
                     slot_to=SlotStatus.ZOMBIE if running else None):
        raise Refused(f"case {case.case_id} changed meanwhile; look again with `mqic show {case.case_id}`")
    return case, stop_cancelled(op, case, now) if running else "no remote task"


def stop_cancelled(op: Operator, case: Case, now: float) -> str:
    """SIGTERM to the cancelled case's task, found by label in a fresh snapshot."""
    failed = get_case(op.conn, case.case_id)
    try:
        done = tasks.stop(op.conn, op.backend(case.host), op.config.main_loop.kill_grace_seconds, failed,
                          tasks.unfinished(failed, op.snapshot(case.host)), now=now)
    except (Refused, RemoteFailure, OSError) as exc:
        return f"could not stop its task now ({exc}); the reaper stops it while slot {case.slot} is zombie"
    if not done:
        return f"no unfinished task labelled {case.label}; the reaper frees slot {case.slot}"
    return f"{', '.join(done)}; the reaper sends SIGKILL after the grace period and frees slot {case.slot}"


def acknowledge(op: Operator, case_id: int, *, now: float) -> tuple[Case, bool, bool]:
    """Clear a case's review flag (the reason stays in the event history) and, for a failed
    case, record that its failure was seen (retention may then remove its remote folder).

    Returns the case as it was, whether a flag was cleared and whether a failure was acknowledged.
    """
    case = op.case(case_id)
    cleared = clear_review(op.conn, case.case_id, now=now, worker=op.who)
    acknowledged = retention.acknowledge(op.conn, case, now=now, worker=op.who)
    if not (cleared or acknowledged):
        seen = " and its failure is already acknowledged" if case.status is CaseStatus.FAILED else ""
        raise Refused(f"case {case.case_id} has no review flag{seen}")
    return case, cleared, acknowledged
