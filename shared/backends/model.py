"""What a worker knows of an HPC's tasks, in our words, whatever backend runs them.

Every backend (``shared.backends.pueue``, ``shared.backends.slurm``) maps its own
states onto ``TaskState`` in one pure function and reports one ``Snapshot`` per
host per pass. "Could not tell" is ``TaskState.UNKNOWN``, never a failure.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Protocol, Sequence

from shared.errors import RemoteFailure


class Runner(Protocol):
    """Runs one argv on the HPC and returns its stdout (see ``shared.remote``)."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> str: ...


class TaskState(str, Enum):
    """Our name for a task's status (pueue's, or a Slurm job's); Done results are flattened into it."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    STASHED = "stashed"
    LOCKED = "locked"
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
        """True while the task has not started yet (queued, stashed, locked)."""
        return self in (TaskState.QUEUED, TaskState.STASHED, TaskState.LOCKED)


_DONE_STATES = frozenset({
    TaskState.SUCCESS, TaskState.FAILED, TaskState.KILLED, TaskState.FAILED_TO_SPAWN,
    TaskState.DEPENDENCY_FAILED, TaskState.ERRORED,
})


@dataclass(frozen=True)
class TaskInfo:
    """One task: a pueue task (``status --json``, ``log --json``) or a Slurm job (``squeue``).

    ``exit_code`` is set only for ``FAILED``. ``detail`` holds the spawn error of
    ``FAILED_TO_SPAWN`` or the raw JSON of a status we do not know. ``ended`` is
    True whenever pueue reports the task Done, including a Done result we do not
    know (state ``UNKNOWN``), so ``is_done`` can tell "finished, outcome unknown"
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
        """True when pueue has finished with the task, whatever the result."""
        return self.state.is_done or self.ended


@dataclass(frozen=True)
class GroupInfo:
    """A pueue group: ``status`` is "Running", "Paused", "Reset" or kept as sent."""

    name: str
    status: str
    parallel_tasks: int

    @property
    def paused(self) -> bool:
        return self.status == "Paused"


@dataclass(frozen=True)
class Snapshot:
    """Everything one ``status --json`` call reported.

    ``hpc_time`` is the HPC's own clock (epoch seconds) when the snapshot was taken,
    so task times (also the HPC's clock) are compared on one clock, never ours.
    """

    tasks: dict[int, TaskInfo]
    groups: dict[str, GroupInfo]
    hpc_time: float | None = None
    host: str = ""  # the configured host it came from (``shared.worker.Host.snapshot``)

    def by_label(self, label: str) -> list[TaskInfo]:
        """Tasks whose label equals ``label`` exactly, in id order."""
        return [task for _, task in sorted(self.tasks.items()) if task.label == label]

    def paused_groups(self) -> list[str]:
        """Names of the paused groups, sorted (after a daemon restart they need ``start -g``)."""
        return sorted(name for name, group in self.groups.items() if group.paused)


@dataclass(frozen=True)
class Words:
    """How a backend's scheduler names things, for every text a worker writes about it.

    Workers take their words from ``backend.words``, so an event, a log line or an
    ``error_message`` on a Slurm host never speaks of pueue, and no generic code branches
    on a scheduler's name.
    """

    scheduler: str         # "pueue", "Slurm"
    task: str              # what one run of a case is: "task", "job"
    submit: str            # the command that starts it: "pueue add", "sbatch"
    status: str            # the listing: "pueue status", "squeue"
    logs: str              # where its output is read: "pueue log", "job output file"
    stop: str              # the command that stops it: "pueue kill", "scancel"
    killed_by_others: str  # how a task ends by a hand not ours, after "<task> 12 was "


@dataclass(frozen=True)
class KillResult:
    """Ids the scheduler acted on, and ids it refused (pueue: not running/paused, or unknown)."""

    killed: tuple[int, ...]
    failed: tuple[int, ...]


class WorkdirMissing(RemoteFailure):
    """``submit(require_workdir=True)``: the working directory is gone; no task was added."""


class AlreadySubmitted(RemoteFailure):
    """``submit``: a task with this label already exists on the HPC; no second one was added."""


class SubmitLockBusy(RemoteFailure):
    """``submit``: another submission of this label still holds its lock on the HPC (outcome unknown)."""


class SubmitUncertain(RemoteFailure):
    """``submit``: the request may have reached the scheduler but its answer was lost (look it up by label)."""
