"""What a worker knows of an HPC's tasks, in our words, whatever backend runs them.

Every backend (one module per scheduler, see ``shared.backends``) maps its own
states onto ``TaskState`` in one pure function and reports one ``Snapshot`` per
host per pass. "Could not tell" is ``TaskState.UNKNOWN``, never a failure. The
scheduler's own word for a state we fold into ours (a held or stashed task is
``QUEUED``) stays in ``TaskInfo.detail``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Mapping, Protocol, Sequence

from shared.errors import RemoteFailure


class Runner(Protocol):
    """Runs one argv on the HPC and returns its stdout (see ``shared.remote``)."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> str: ...


class TaskState(str, Enum):
    """Our name for a task's status, whatever the scheduler; its finished results are flattened into it."""

    QUEUED = "queued"    # waiting: not started yet (held, stashed or locked too; the word is in ``detail``)
    RUNNING = "running"
    PAUSED = "paused"    # started, then stopped for a while: its process exists
    SUCCESS = "success"
    FAILED = "failed"
    KILLED = "killed"
    FAILED_TO_SPAWN = "failed_to_spawn"
    DEPENDENCY_FAILED = "dependency_failed"
    ERRORED = "errored"
    UNKNOWN = "unknown"

    @property
    def is_done(self) -> bool:
        """True for the Done variants whose result we know."""
        return self in _DONE_STATES

    @property
    def is_failure(self) -> bool:
        """True for every known Done result except Success."""
        return self.is_done and self is not TaskState.SUCCESS

    @property
    def is_active(self) -> bool:
        """True while the process exists (running or paused)."""
        return self in (TaskState.RUNNING, TaskState.PAUSED)

    @property
    def is_waiting(self) -> bool:
        """True while the task has not started yet."""
        return self is TaskState.QUEUED


_DONE_STATES = frozenset({
    TaskState.SUCCESS, TaskState.FAILED, TaskState.KILLED, TaskState.FAILED_TO_SPAWN,
    TaskState.DEPENDENCY_FAILED, TaskState.ERRORED,
})


@dataclass(frozen=True)
class TaskInfo:
    """One task of the scheduler, as its listing reports it.

    ``exit_code`` is set only for ``FAILED``. ``detail`` holds the scheduler's own word
    where ours is coarser (a waiting task it holds back, why a job ended), the spawn
    error of ``FAILED_TO_SPAWN`` or the raw text of a status we do not know. ``ended`` is
    True whenever the scheduler reports the task finished, including with a result we do
    not know (state ``UNKNOWN``), so ``is_done`` can tell "finished, outcome unknown"
    from "still going".
    """

    id: int
    label: str | None
    group: str
    state: TaskState
    exit_code: int | None = None
    detail: str = ""
    path: str = ""
    command: str = ""
    enqueued_at: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None
    ended: bool = False

    @property
    def is_done(self) -> bool:
        """True when the scheduler has finished with the task, whatever the result."""
        return self.state.is_done or self.ended


@dataclass(frozen=True)
class Snapshot:
    """Everything one listing of the scheduler reported.

    ``hpc_time`` is the HPC's own clock (epoch seconds) when the snapshot was taken,
    so task times (also the HPC's clock) are compared on one clock, never ours.
    ``paused_slots``: the slots the scheduler has paused, sorted; they start no waiting
    task until resumed (only a scheduler whose entry ``pauses_slots`` reports any).
    """

    tasks: dict[int, TaskInfo]
    paused_slots: tuple[str, ...] = ()
    hpc_time: float | None = None
    host: str = ""  # the configured host it came from (``shared.worker.Host.snapshot``)

    def by_label(self, label: str) -> list[TaskInfo]:
        """Tasks whose label equals ``label`` exactly, in id order."""
        return [task for _, task in sorted(self.tasks.items()) if task.label == label]


@dataclass(frozen=True)
class Words:
    """How a backend's scheduler names things, for every text a worker writes about it.

    Workers take their words from ``backend.words``, so an event, a log line or an
    ``error_message`` on a host speaks of that host's own scheduler, and no generic code
    branches on a scheduler's name.
    """

    scheduler: str         # "pueue", "Slurm"
    task: str              # what one run of a case is: "task", "job"
    submit: str            # the command that starts it: "pueue add", "sbatch"
    status: str            # the listing: "pueue status", "squeue"
    logs: str              # where its output is read: "pueue log", "job output file"
    stop: str              # the command that stops it: "pueue kill", "scancel"
    killed_by_others: str  # how a task ends by a hand not ours, after "<task> 12 was "
    slot: str = "slot"     # what one slot of ours is there: "pueue group", "partition"
    paused_why: str = ""   # the likely reason a slot is paused (schedulers that pause slots)
    resume: str = ""       # how an operator resumes a paused slot, with ``{slot}``


@dataclass(frozen=True)
class KillResult:
    """Ids the scheduler acted on, and ids it refused (not running or paused, or unknown to it)."""

    killed: tuple[int, ...]
    failed: tuple[int, ...]


@dataclass(frozen=True)
class SubmitItem:
    """One submit of a batch (``Backend.submit_batch``): what ``Backend.submit`` takes for one case."""

    slot: str
    label: str
    workdir: str
    command: str
    env: Mapping[str, str] = field(default_factory=dict)
    require_workdir: bool = False


# What became of one item: its task id, or the typed failure its own submit would have raised.
SubmitOutcome = int | RemoteFailure
