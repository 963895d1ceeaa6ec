"""Ways of running a case on an HPC: one module per scheduler (pueue, Slurm) behind one interface.

A worker sees only ``Backend``: it speaks our words (submit, snapshot, logs, stop,
remove, slots) and reports what the HPC said, or raises a ``RemoteFailure`` when it
could not tell. It never decides a case's fate: ``shared.tasks`` and the workers do.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from shared.backends.model import KillResult, Runner, Snapshot, TaskInfo, Words


class Backend(Protocol):
    """What a worker needs from one HPC host."""

    kind: str
    words: Words  # the scheduler's own words for every text written about this host
    # optional ``gpus_visible = True``: nvidia-smi in the login session sees the tasks' GPUs (shared.gpus)

    def snapshot(self) -> Snapshot:
        """Every task of this host and the HPC's clock, in ONE remote call."""

    def submit(self, *, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool = False) -> int:
        """Start ``command`` in ``workdir`` in ``slot``, at most one task per ``label``.

        Raises AlreadySubmitted (a task carries the label), WorkdirMissing,
        SubmitLockBusy, or a RemoteFailure; after Unreachable the add may still land
        until ``add_lands_within`` has passed. A failure's text is short: what failed, the
        exit code's meaning and the first line of stderr (never the submit script).
        """

    def add_lands_within(self) -> float:
        """Seconds after a submit was sent by which it has landed or never will."""

    def logs(self, tasks: Sequence[TaskInfo], lines: int) -> dict[int, str]:
        """The last ``lines`` lines of each task's output (by task id), in ONE remote call."""

    def stop(self, task_ids: Sequence[int], *, gently: bool) -> KillResult:
        """Signal running tasks: SIGTERM when ``gently``, else end them for sure (pueue: SIGKILL;
        Slurm: ``scancel``, TERM then KILL after KillWait). Ids the scheduler refused are ``failed``."""

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        """Take waiting or finished tasks out of the scheduler's list; a running one comes back in ``failed``."""

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        """Make every slot usable (pueue: create its group; Slurm: check its partition); return those created."""

    def resume_slot(self, slot: str) -> None:
        """Resume a slot the scheduler paused (pueue: a group after a daemon restart)."""

    def version(self) -> str:
        """The scheduler's version, for ``mqic doctor``."""


def backend_for(config, host, runner: Runner) -> Backend:
    """The backend that ``host`` (a ``HostConfig`` of ``config``) names, talking through ``runner``."""
    if host.backend == "slurm":
        from shared.backends.slurm import SlurmBackend
        return SlurmBackend.from_config(config, host, runner)
    if host.backend == "direct":
        from shared.backends.direct import DirectBackend
        return DirectBackend.from_config(config, host, runner)
    from shared.backends.pueue import PueueBackend
    return PueueBackend(runner, tuple(host.hpc.pueue_command), host.hpc.command_timeout_seconds)
