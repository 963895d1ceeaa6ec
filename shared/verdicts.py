"""The verdict table: what became of a case's task -> what happens to the case. One place.

Every decision about a case's fate from its remote task is a row of ``ROWS``: the facts
(who asks, what was found, the result, who sent the signal, whether only the exit record
could tell, overdue) map to the action, the outcome recorded, what becomes of the seat,
whether an attempt is used up, and the error type kept on the case. The poller, recovery
(run by the reaper) and ``mqic show`` read it; they carry a verdict out, they do not make
one. A combination that no row lists raises ``Unlisted``: there is no default, and the
tests walk every combination (``tests/test_verdicts.py``). "Could not tell" is WAIT, never
FAIL. ``docs/verdicts.md`` is this table printed (``python -m shared.verdicts``).

Failures that are not about a task (an upload error, an unreachable host) are counted by
their type in ``shared.tasks.counts_as_attempt``; they never come here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from shared.backends.model import TaskState
from shared.states import Outcome, SlotStatus
from shared.tasks import Found, Link


class Phase(str, Enum):
    """Who asks, i.e. what the case is doing while its task is looked at."""
    RUNNING = "running"  # the poller follows a running case
    CLAIM = "claim"      # recovery settles a submitting case whose claim expired (its add may have landed)


class Sender(str, Enum):
    """Who sent the signal that killed a task."""
    US = "us"          # a timeout or an operator's cancel: the case was failed BEFORE the signal went out
    OTHERS = "others"  # a pueued restart, a node reboot, another user, a Slurm preemption


class Action(str, Enum):
    COMPLETE = "complete"  # fetch the results; completed, seat available
    FAIL = "fail"          # failed with the task's result, exit code and log tail; seat zombie until the reaper sees it idle
    REQUEUE = "requeue"    # back to submitted with backoff; failed with the outcome once attempts run out
    WAIT = "wait"          # no status change (a live task only has its progress read)
    TIME_OUT = "time out"  # failed (timed_out), seat zombie, then SIGTERM to the task (the reaper sends SIGKILL)
    ADOPT = "adopt"        # the claimed case's task exists or ran: the case is running, the poller settles it


@dataclass(frozen=True)
class Facts:
    """The key of a row. A field that does not apply is None (see ``facts_of``), so each
    situation has exactly one key."""
    phase: Phase
    found: Found
    result: TaskState | None = None   # FINISHED while running: the task's result
    sender: Sender | None = None      # a KILLED result: who sent the signal
    from_record: bool | None = None   # FINISHED or UNKNOWN: the scheduler lists no task, only the exit record tells
    overdue: bool | None = None       # RUNNING while running: past running_case_timeout_hours on the HPC's clock


@dataclass(frozen=True)
class Verdict:
    action: Action
    outcome: Outcome | None  # recorded now (complete, fail, time out) or once attempts run out (requeue)
    slot: SlotStatus | None  # what the case's seat becomes (None: unchanged)
    uses_attempt: bool       # one more of the case's max_attempts used up
    error_type: str | None   # kept on the case (error_type) with the reason
    why: str


class Unlisted(LookupError):
    """A combination of facts that no row of the verdict table lists: a bug, never a default."""


P, F, R, S = Phase, Found, TaskState, Sender
A, O, Z, FREE = Action, Outcome, SlotStatus.ZOMBIE, SlotStatus.AVAILABLE
_ = None

ROWS: tuple[tuple[Facts, Verdict], ...] = tuple((Facts(*key), Verdict(*then)) for key, then in (
    # (phase, found, result, sender, from record, overdue) -> (action, outcome, seat, attempt used, error type, why)
    ((P.RUNNING, F.WAITING, _, _, _, _), (A.WAIT, _, _, False, _,
        "not started yet (queued behind another case): its clock has not started; kept from being flagged stuck")),
    ((P.RUNNING, F.RUNNING, _, _, _, False), (A.WAIT, _, _, False, _, "progress read from its log")),
    ((P.RUNNING, F.RUNNING, _, _, _, True), (A.TIME_OUT, O.TIMED_OUT, Z, False, "Timeout",
        "ran longer than running_case_timeout_hours on the HPC's clock")),
    ((P.RUNNING, F.FINISHED, R.SUCCESS, _, False, _), (A.COMPLETE, O.SUCCESS, FREE, False, _,
        "results fetched (the seat is handed on first)")),
    ((P.RUNNING, F.FINISHED, R.SUCCESS, _, True, _), (A.COMPLETE, O.SUCCESS, FREE, False, _,
        "the scheduler forgot the task; its exit record says 0")),
    ((P.RUNNING, F.FINISHED, R.FAILED, _, False, _), (A.FAIL, O.FAILED, Z, False, "TaskFailed",
        "exit code and log tail kept")),
    ((P.RUNNING, F.FINISHED, R.FAILED, _, True, _), (A.FAIL, O.FAILED, Z, False, "TaskFailed",
        "the scheduler forgot the task; exit code from its record, log tail from .mqic/output.log")),
    ((P.RUNNING, F.FINISHED, R.FAILED_TO_SPAWN, _, False, _), (A.FAIL, O.FAILED_TO_SPAWN, Z, False,
        "TaskFailedToSpawn", "the spawn error kept")),
    ((P.RUNNING, F.FINISHED, R.DEPENDENCY_FAILED, _, False, _), (A.FAIL, O.FAILED, Z, False,
        "TaskDependencyFailed", "a task it depended on failed")),
    ((P.RUNNING, F.FINISHED, R.ERRORED, _, False, _), (A.FAIL, O.FAILED, Z, False, "TaskErrored",
        "the scheduler reports an error of the task")),
    ((P.RUNNING, F.FINISHED, R.KILLED, S.OTHERS, False, _), (A.REQUEUE, O.KILLED, FREE, True, "TaskKilled",
        "killed by a signal we did not send: the task is removed from the scheduler's list, then the case runs again")),
    ((P.RUNNING, F.FINISHED, R.KILLED, S.US, False, _), (A.WAIT, _, _, False, _,
        "killed by our own signal: the case was failed (timed_out or cancelled) before it was sent")),
    ((P.RUNNING, F.ABSENT, _, _, _, _), (A.REQUEUE, O.VANISHED, FREE, True, "TaskVanished",
        "no task carries the label and no exit record exists: the case runs again")),
    ((P.RUNNING, F.UNKNOWN, _, _, False, _), (A.WAIT, _, _, False, _,
        "could not tell: the scheduler reports a state we do not know")),
    ((P.RUNNING, F.UNKNOWN, _, _, True, _), (A.WAIT, _, _, False, _,
        "could not tell: the scheduler forgot the task and its exit record could not be read")),
    ((P.CLAIM, F.WAITING, _, _, _, _), (A.ADOPT, _, _, False, _, "its task, found by label in the claimed group")),
    ((P.CLAIM, F.RUNNING, _, _, _, _), (A.ADOPT, _, _, False, _, "its task, found by label in the claimed group")),
    ((P.CLAIM, F.FINISHED, _, _, False, _), (A.ADOPT, _, _, False, _,
        "its task, found by label, has finished: the poller settles it")),
    ((P.CLAIM, F.FINISHED, _, _, True, _), (A.ADOPT, _, _, False, _,
        "no task, but an exit record: the task ran and the scheduler forgot it; the poller settles it")),
    ((P.CLAIM, F.UNKNOWN, _, _, False, _), (A.ADOPT, _, _, False, _,
        "a task carrying its label exists in a state we do not know: it is the case's; the poller watches it")),
    ((P.CLAIM, F.UNKNOWN, _, _, True, _), (A.WAIT, _, _, False, _,
        "could not tell: the add may still land, or the exit record could not be read")),
    ((P.CLAIM, F.ABSENT, _, _, _, _), (A.REQUEUE, O.SUBMIT_ERROR, FREE, True, "ClaimExpired",
        "its submitter died and no task or exit record exists once the add can no longer land")),
))

TABLE: dict[Facts, Verdict] = dict(ROWS)
assert len(TABLE) == len(ROWS), "a row of the verdict table is listed twice"


def facts_of(link: Link, phase: Phase, *, by_us: bool = False, overdue: bool = False) -> Facts:
    """The key for ``link``: the fields that do not apply to what was found are None.

    ``by_us``: the case says we sent the signal (it is failed with ``timed_out`` or
    ``cancelled``); ``overdue``: ``shared.tasks.overdue`` for a running task.
    """
    finished, running = link.found is Found.FINISHED, phase is Phase.RUNNING
    killed = running and finished and link.result is TaskState.KILLED
    return Facts(
        phase=phase, found=link.found,
        result=link.result if running and finished else None,
        sender=(Sender.US if by_us else Sender.OTHERS) if killed else None,
        from_record=link.task is None if link.found in (Found.FINISHED, Found.UNKNOWN) else None,
        overdue=overdue if running and link.found is Found.RUNNING else None)


def verdict(facts: Facts) -> Verdict:
    """The row for ``facts``; ``Unlisted`` when no row lists them."""
    try:
        return TABLE[facts]
    except KeyError:
        raise Unlisted(f"no verdict for {facts}") from None


def verdict_for(link: Link, phase: Phase, *, by_us: bool = False, overdue: bool = False) -> Verdict:
    """What happens to a case whose task became ``link`` (see ``facts_of``)."""
    return verdict(facts_of(link, phase, by_us=by_us, overdue=overdue))


def killed_by_us(outcome: str | None) -> bool:
    """True when a case's recorded outcome says that we stopped its task: a timeout or a cancel
    fail the case first and signal the task after, so a running case never has one."""
    return outcome in (Outcome.TIMED_OUT.value, Outcome.CANCELLED.value)


# -- printing -------------------------------------------------------------------------------------

HEADERS = ("who asks", "found", "result", "signal from", "from exit record", "overdue",
           "action", "outcome", "seat", "attempt used", "error type", "why")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value.value if isinstance(value, Enum) else value)


def markdown() -> str:
    """The table as Markdown, one line per row (``docs/verdicts.md``)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for facts, then in ROWS:
        cells = [getattr(facts, f.name) for f in fields(Facts)] + [getattr(then, f.name) for f in fields(Verdict)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


DOC_HEAD = """# Verdicts: what happens to a case when its task ...

Generated from `shared/verdicts.py` by `python -m shared.verdicts > docs/verdicts.md`
(a test fails when this file drifts from the table). "who asks": `running` is the poller
following a running case, `claim` is recovery settling a submitting case whose submitter
died. `-`: does not apply. A combination not listed here is a bug (`Unlisted`), never a
default; "could not tell" is always `wait`. A `requeue` records its outcome only once the
case's `max_attempts` are used up; until then the case goes back to `submitted` with backoff.

"""


if __name__ == "__main__":
    print(DOC_HEAD + markdown(), end="")
