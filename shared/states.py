"""Case and GPU-slot lifecycles: the enums and the one table of allowed moves each."""
from __future__ import annotations

from enum import Enum

from shared.errors import ForbiddenTransition, UnknownStatus


class _Parsed(str, Enum):
    @property
    def sql(self) -> str:
        """The value as an SQL string literal, for queries: ``'completed'`` (values are ours, never user data)."""
        return f"'{self.value}'"

    @classmethod
    def parse(cls, value: str):
        """The member named by a stored value; UnknownStatus for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise UnknownStatus(f"unknown {cls.__name__} {value!r}") from None


class CaseStatus(_Parsed):
    SUBMITTED = "submitted"
    SUBMITTING = "submitting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class SlotStatus(_Parsed):
    AVAILABLE = "available"
    ASSIGNED = "assigned"
    ZOMBIE = "zombie"


def sql_list(*members: _Parsed) -> str:
    """``'running', 'submitting'``: the values as SQL literals for an ``IN (...)`` list."""
    return ", ".join(member.sql for member in members)


class Outcome(str, Enum):
    """Why a case ended; kept apart from its lifecycle status."""
    SUCCESS = "success"
    FAILED = "failed"              # the simulation exited non-zero
    KILLED = "killed"              # killed by a signal we did not send
    TIMED_OUT = "timed_out"        # killed by the reaper after the timeout
    FAILED_TO_SPAWN = "failed_to_spawn"
    VANISHED = "vanished"          # the remote task disappeared without a result
    CANCELLED = "cancelled"        # an operator cancelled it
    SUBMIT_ERROR = "submit_error"  # upload or submission failed for good
    REJECTED = "rejected"


S = CaseStatus
ALLOWED: dict[CaseStatus, frozenset[CaseStatus]] = {
    S.SUBMITTED: frozenset({S.SUBMITTING, S.FAILED}),
    # submitting -> submitted: retry after a transient failure or an expired lease.
    S.SUBMITTING: frozenset({S.RUNNING, S.SUBMITTED, S.FAILED}),
    # running -> submitted: the task was proven absent before it ever started.
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.SUBMITTED}),
    S.COMPLETED: frozenset(),
    # failed -> submitted: an operator's `mqic retry`.
    S.FAILED: frozenset({S.SUBMITTED}),
}

SLOT_ALLOWED: dict[SlotStatus, frozenset[SlotStatus]] = {
    SlotStatus.AVAILABLE: frozenset({SlotStatus.ASSIGNED}),
    SlotStatus.ASSIGNED: frozenset({SlotStatus.AVAILABLE, SlotStatus.ZOMBIE}),
    SlotStatus.ZOMBIE: frozenset({SlotStatus.AVAILABLE}),
}

FINAL = frozenset({S.COMPLETED, S.FAILED})


def check_case_move(frm: CaseStatus, to: CaseStatus) -> None:
    """Raise ForbiddenTransition unless ``frm -> to`` is in ALLOWED."""
    if to not in ALLOWED[CaseStatus(frm)]:
        raise ForbiddenTransition(f"case status {frm.value} -> {to.value} is not allowed")


def check_slot_move(frm: SlotStatus, to: SlotStatus) -> None:
    """Raise ForbiddenTransition unless ``frm -> to`` is in SLOT_ALLOWED."""
    if to not in SLOT_ALLOWED[SlotStatus(frm)]:
        raise ForbiddenTransition(f"slot status {frm.value} -> {to.value} is not allowed")
