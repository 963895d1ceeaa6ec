"""The link between a case and its remote task: every rule about it lives here.

- ``resolve``: what became of a case's task, from ONE fresh snapshot and, when pueue
  no longer lists the task, from the exit-status record that the task's wrapper
  leaves in the case's remote folder (``.mqic/exit_status``): waiting, running,
  finished with a result, proven absent, or could not tell. ``resolve_claim`` does the
  same for a case whose submitter died mid-submission. What then happens to the case
  is one row of the verdict table, ``shared.verdicts``.
- ``wrap_command``: the wrapper that writes that record atomically.
- ``stop``: stop a case's task, found by its label in a fresh snapshot (ids are
  reused, labels are ours): a waiting task is removed, a running one gets SIGTERM,
  then SIGKILL once ``kill_grace_seconds`` have passed.
- ``orphans``: tasks carrying our label that no running case owns.
- ``counts_as_attempt``: whether a failure uses up one of the case's attempts.

A task whose state is in doubt is never "failed": UNKNOWN changes nothing.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Mapping, Sequence

from shared.backends import Backend, model
from shared.errors import BadOutput, ClaimExpired, HostKeyMismatch, HpcTrouble, LocalFailure, Unreachable
from shared.states import CaseStatus
from shared.store import Case, update_case

OUR_LABEL = re.compile(r"mqic_case_(\d+)")
RECORD_DIR = ".mqic"
EXIT_RECORD = f"{RECORD_DIR}/exit_status"
OUTPUT_RECORD = f"{RECORD_DIR}/output.log"


class Found(str, Enum):
    WAITING = "waiting"      # queued, stashed or locked: not started yet
    RUNNING = "running"      # running or paused
    FINISHED = "finished"    # ended with a known result (from pueue or from the exit record)
    ABSENT = "absent"        # proven: no task carries the label and no exit record exists
    UNKNOWN = "unknown"      # could not tell: change nothing


class Record(str, Enum):
    """An exit record that is not an exit code."""
    MISSING = "missing"        # the folder has no record (or no longer exists)
    UNREADABLE = "unreadable"  # the record exists but holds no exit code


ExitRecord = int | Record


@dataclass(frozen=True)
class Link:
    """What a fresh look at the HPC says of a case's task."""

    found: Found
    task: model.TaskInfo | None = None
    result: model.TaskState | None = None   # FINISHED only
    exit_code: int | None = None
    from_record: bool = False
    detail: str = ""


def task_of(case: Case, snapshot: model.Snapshot) -> model.TaskInfo | None:
    """The case's recorded task, only while it still carries the case's label (ids are reused).

    A case without a recorded id (recovered from its exit record) has none.
    """
    task = snapshot.tasks.get(case.task_id) if case.task_id is not None else None
    return task if task is not None and task.label == case.label else None


def needs_record(case: Case, snapshot: model.Snapshot) -> bool:
    """True when pueue no longer lists the case's task, so only its exit record can tell."""
    return task_of(case, snapshot) is None and bool(case.remote_dir)


def resolve(case: Case, snapshot: model.Snapshot, records: Mapping[str, ExitRecord] | None = None) -> Link:
    """The state of ``case``'s task in ``snapshot``, or from its exit record when pueue forgot it.

    ``records`` maps remote folders to what ``read_exit_records`` found; a folder missing
    from it means the record was not read, which is "could not tell".
    """
    task = task_of(case, snapshot)
    if task is not None:
        return _from_task(task)
    return _from_record(case, (records or {}).get(case.remote_dir) if case.remote_dir else None)


def claimed_tasks(case: Case, snapshot: model.Snapshot) -> list[model.TaskInfo]:
    """The tasks carrying ``case``'s label in the group of the slot it claimed."""
    return [t for t in snapshot.by_label(case.label) if t.group == case.slot]


def resolve_claim(case: Case, snapshot: model.Snapshot, record: ExitRecord | None, *, add_may_land: bool) -> Link:
    """What became of the task of a ``submitting`` case whose claim expired.

    A task carrying the label in the group of the claimed slot is the case's (the newest
    when several do). With none, nothing is proven while an add whose answer was lost may
    still land (``add_may_land``); after that the exit record tells (``record`` None: it
    was not read, which is "could not tell").
    """
    labelled = claimed_tasks(case, snapshot)
    if labelled:
        return _from_task(max(labelled, key=lambda t: t.id))
    if add_may_land:
        return Link(Found.UNKNOWN, detail="no task yet, but an add whose answer was lost may still land")
    return _from_record(case, record)


def _from_record(case: Case, record: ExitRecord | None) -> Link:
    if not case.remote_dir:
        return Link(Found.ABSENT, detail="no remote folder was ever recorded")
    if record is None or record is Record.UNREADABLE:
        return Link(Found.UNKNOWN, detail=f"task gone from the scheduler; exit record {record or 'not read'}")
    if record is Record.MISSING:
        return Link(Found.ABSENT, detail=f"no task labelled {case.label} and no exit record")
    result = model.TaskState.SUCCESS if record == 0 else model.TaskState.FAILED
    return Link(Found.FINISHED, result=result, exit_code=record, from_record=True,
                detail=f"task gone from the scheduler; its exit record says {record}")


def _from_task(task: model.TaskInfo) -> Link:
    if task.state.is_waiting:
        return Link(Found.WAITING, task=task)
    if task.state.is_active:
        return Link(Found.RUNNING, task=task)
    if task.state.is_done:
        return Link(Found.FINISHED, task=task, result=task.state, exit_code=task.exit_code)
    return Link(Found.UNKNOWN, task=task, detail=f"the scheduler reports an unknown state {task.detail[:200]}")


def overdue(link: Link, snapshot: model.Snapshot, limit_seconds: float) -> bool:
    """True when the task has run longer than ``limit_seconds``, on the HPC's own clock.

    Only a running task with a known start in a snapshot that carries the HPC's time
    can be overdue; anything else is not (yet) a reason to time out.
    """
    if link.found is not Found.RUNNING or link.task is None or link.task.start is None:
        return False
    if snapshot.hpc_time is None:
        return False
    return snapshot.hpc_time - link.task.start.timestamp() > limit_seconds


# -- the exit-status record --------------------------------------------------------------------

# Runs in the case folder (pueue's working directory). The command runs in a subshell, so
# its own `exit` or `cd` cannot skip the record; output also goes to .mqic/output.log for
# the log tail of a task that pueue has forgotten. The record is renamed into place.
_WRAPPER = """mkdir -p {dir} && rm -f {record} && {{ (
{command}
) 2>&1; echo $? > {record}.part; }} | tee {output}; s=$(cat {record}.part) && mv -f {record}.part {record} && exit "$s"
"""


def wrap_command(command: str) -> str:
    """``command`` wrapped so that its exit status lands atomically in ``.mqic/exit_status``."""
    return _WRAPPER.format(dir=RECORD_DIR, record=EXIT_RECORD, output=OUTPUT_RECORD, command=command).strip()


_READ_RECORDS = f"""
i=0
for d in "$@"; do
  i=$((i + 1))
  if [ -f "$d/{EXIT_RECORD}" ]; then printf '%s %s\\n' "$i" "$(head -c 32 "$d/{EXIT_RECORD}")"
  else printf '%s -\\n' "$i"; fi
done
"""


def read_exit_records(runner: model.Runner, folders: Sequence[str], timeout: float | None = None) -> dict[str, ExitRecord]:
    """The exit records of ``folders`` in ONE remote call; RemoteFailure when it could not be read."""
    if not folders:
        return {}
    out = runner.run(["sh", "-c", _READ_RECORDS, "sh", *folders], timeout=timeout)
    answers = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return {folder: _record_value(answers.get(str(i + 1))) for i, folder in enumerate(folders)}


def _record_value(text: str | None) -> ExitRecord:
    if text is None:
        return Record.UNREADABLE
    text = text.strip()
    if text == "-":
        return Record.MISSING
    return int(text) if text.isdigit() else Record.UNREADABLE


def read_output_tail(runner: model.Runner, folder: str, lines: int, timeout: float | None = None) -> str:
    """The last ``lines`` lines the wrapper kept in ``.mqic/output.log`` ("" when there is none)."""
    script = f'tail -n "$2" -- "$1/{OUTPUT_RECORD}" 2>/dev/null || true'
    return runner.run(["sh", "-c", script, "sh", folder, str(lines)], timeout=timeout)


# -- stopping a task -----------------------------------------------------------------------------

def stop(conn: sqlite3.Connection, backend: Backend, grace_seconds: float, case: Case,
         tasks: Iterable[model.TaskInfo], *, now: float) -> list[str]:
    """Stop ``tasks`` of ``case``, each taken from a fresh snapshot with the case's label.

    Waiting tasks are removed; running ones get SIGTERM first (recorded as
    ``stop_requested_at``), then SIGKILL once ``grace_seconds`` have passed. Returns
    what was done, e.g. ``["sigterm 7"]``. RemoteFailure propagates (try again later).
    """
    done = []
    for task in tasks:
        if task.label != case.label:
            raise ValueError(f"task {task.id} does not carry {case.label}; refusing to stop it")
        action = _stop_one(backend, grace_seconds, case, task, now)
        if action == "sigterm":
            update_case(conn, case.case_id, case.status, {"stop_requested_at": now})
        if action:
            done.append(f"{action} {task.id}")
    return done


def _stop_one(backend: Backend, grace_seconds: float, case: Case, task: model.TaskInfo, now: float) -> str:
    if task.state.is_waiting:
        backend.remove([task.id])
        return "removed"
    if not task.state.is_active:
        return ""  # finished, or a state we cannot read: nothing to stop
    if case.stop_requested_at is None:
        backend.stop([task.id], gently=True)
        return "sigterm"
    if now - case.stop_requested_at >= grace_seconds:
        backend.stop([task.id], gently=False)
        return "sigkill"
    return ""


def clear_finished(backend: Backend, case: Case, snapshot: model.Snapshot) -> list[int]:
    """Before a retry: remove the case's finished tasks so its label names only the retry's task.

    Raises TaskStillActive when a labelled task has not finished; RemoteFailure propagates.
    """
    tasks = snapshot.by_label(case.label)
    unfinished = [t.id for t in tasks if not t.is_done]
    if unfinished:
        raise TaskStillActive(f"task(s) {unfinished} labelled {case.label} have not finished")
    finished = [t.id for t in tasks]
    if finished:
        backend.remove(finished)
    return finished


class TaskStillActive(Exception):
    """A task carrying the case's label has not finished: the case cannot be retried yet."""


# -- orphans -----------------------------------------------------------------------------------

def case_id_of(task: model.TaskInfo) -> int | None:
    """The case id in a task's label ``mqic_case_<id>``, else None (not ours)."""
    match = OUR_LABEL.fullmatch(task.label or "")
    return int(match[1]) if match else None


def orphans(snapshot: model.Snapshot, cases: Mapping[int, Case]) -> list[tuple[model.TaskInfo, Case]]:
    """Unfinished tasks carrying the label of a case of ours that does not own them.

    A task is owned by its case while the case is ``submitting`` and the task is in the
    group of the slot the case claimed (the add may be its own, recovery decides) or ``running`` with that
    task recorded, both on the case's own host; a submitted, completed or failed case owns none. Tasks of case ids we do not know are left
    alone: they are not provably ours.
    """
    found = []
    for task in snapshot.tasks.values():
        case = cases.get(case_id_of(task)) if not task.is_done else None
        if case is not None and not _owns(case, task, snapshot.host):
            found.append((task, case))
    return found


def _owns(case: Case, task: model.TaskInfo, host: str) -> bool:
    if case.host != host:
        return False  # the case lives on another host (it moved there before it ever started here)
    if case.status is CaseStatus.SUBMITTING:
        return task.group == case.slot  # recovery adopts it; elsewhere it holds no slot of ours
    if case.status is CaseStatus.RUNNING:
        return case.task_id in (None, task.id)
    return False


def unfinished(case: Case, snapshot: model.Snapshot) -> list[model.TaskInfo]:
    """The tasks carrying ``case``'s label that have not finished."""
    return [t for t in snapshot.by_label(case.label) if not t.is_done]


def our_case_ids(snapshot: model.Snapshot) -> list[int]:
    """Case ids named by the unfinished labelled tasks in ``snapshot``."""
    return sorted({cid for t in snapshot.tasks.values() if not t.is_done and (cid := case_id_of(t)) is not None})


# -- attempts ------------------------------------------------------------------------------------

def counts_as_attempt(error: BaseException) -> bool:
    """Only a failure of the case itself uses up an attempt.

    An HPC that could not be reached, a scheduler that could not take the request
    (``SchedulerOutage``, an ``HpcTrouble``), output we could not read, a set-up problem of
    the HPC, a refused host key or trouble on our side never does; a claim whose owner died
    does (a case that keeps killing its submitter must end). Types only, never a text.
    """
    if isinstance(error, ClaimExpired):
        return True
    return not isinstance(error, (Unreachable, BadOutput, HpcTrouble, LocalFailure, HostKeyMismatch))
