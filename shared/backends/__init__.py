"""Ways of running a case on an HPC: one module per scheduler behind one interface, found in one registry.

A worker sees only ``Backend``: it speaks our words (submit, snapshot, logs, stop,
remove, slots) and reports what the HPC said, or raises a ``RemoteFailure`` when it
could not tell. It never decides a case's fate: ``shared.tasks`` and the workers do.

Each scheduler's module defines ONE ``Scheduler`` entry, ``SCHEDULER``: its name as
``hpc.backend`` takes it, how to build its Backend, its doctor checks, what it can do and
its part of the config (where its slots are configured and how they are read, the sections
and host keys it declares, all with ``shared.config_keys``). ``MODULES`` names those
modules, one line each; adding a scheduler is one module and one line there, and no edit
of ``shared.config``. Nothing outside this folder branches on a scheduler's name or reads
its text: backends raise the typed errors of ``shared.errors``.

A backend module must not import ``shared.config`` (which reads every entry's config part
when it is imported): it declares its keys with ``shared.config_keys`` alone.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from shared.backends.model import KillResult, Runner, Snapshot, SubmitItem, SubmitOutcome, TaskInfo, Words
from shared.errors import ConfigError

__all__ = ["Backend", "MODULES", "NAMES", "Scheduler", "SubmitItem", "SubmitOutcome", "backend_for", "scheduler",
           "scheduler_of"]

# The registry: the name ``hpc.backend`` takes -> the module whose ``SCHEDULER`` it is.
MODULES: dict[str, str] = {
    "pueue": "shared.backends.pueue",
    "slurm": "shared.backends.slurm",
    "direct": "shared.backends.direct",
}
NAMES = tuple(MODULES)
DEFAULT = "pueue"  # ``hpc.backend`` when the config does not say


class Backend(Protocol):
    """What a worker needs from one HPC host."""

    kind: str    # the registry name of its scheduler (``hpc.backend``)
    words: Words  # the scheduler's own words for every text written about this host

    def snapshot(self) -> Snapshot:
        """Every task of this host, the slots it paused and the HPC's clock, in ONE remote call."""

    def submit(self, *, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool = False) -> int:
        """Start ``command`` in ``workdir`` in ``slot``, at most one task per ``label``.

        Raises AlreadySubmitted (a task carries the label), WorkdirMissing, SubmitLockBusy,
        SubmitUncertain (the request may have landed: look it up by label), or another
        RemoteFailure, which proves that no task was made (a ``SchedulerOutage`` uses no
        attempt); after Unreachable the add may still land until ``add_lands_within`` has
        passed. A failure's text is short: what failed, the exit code's meaning and the first
        line of stderr (never the submit script). The batch of one: ``submit_batch``.
        """

    def submit_batch(self, items: Sequence[SubmitItem]) -> list[SubmitOutcome]:
        """``submit`` for each item, in order, in ONE remote call; one outcome per item, in order.

        An outcome is the task id, or the failure that item's own ``submit`` would have
        raised (AlreadySubmitted, WorkdirMissing, SubmitLockBusy, SubmitUncertain, SlotLost,
        a SchedulerOutage...): one item's failure never touches another's. An item whose
        answer did not come back whole (the call failed, its answer was lost or cut) is
        SubmitUncertain: recovery finds it by its label. An item not started because the
        batch had used ``command_timeout_seconds`` to start its items is a SchedulerOutage
        (nothing was sent for it). Every add lands within ``add_lands_within`` of the call.
        ValueError, before anything is sent, for an item no submit could take (its slot,
        label or variables) or a batch too long for one command line (``common.MAX_BATCH_CHARS``).
        """

    def add_lands_within(self) -> float:
        """Seconds after a submit was sent by which it has landed or never will."""

    def logs(self, tasks: Sequence[TaskInfo], lines: int) -> dict[int, str]:
        """The last ``lines`` lines of each task's output (by task id), in ONE remote call."""

    def stop(self, task_ids: Sequence[int], *, gently: bool) -> KillResult:
        """Signal running tasks: SIGTERM when ``gently``, else end them for sure. Ids the scheduler
        refused are ``failed``."""

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        """Take waiting or finished tasks out of the scheduler's list; a running one comes back in ``failed``."""

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        """Make every slot usable (create it, or check that it exists); return those created."""

    def resume_slot(self, slot: str) -> None:
        """Resume a slot the scheduler paused (called only where its entry ``pauses_slots``)."""

    def version(self) -> str:
        """The scheduler's version, for ``mqic doctor``."""


@dataclass(frozen=True)
class SlotConfig:
    """A slot of ours on one host, whatever the backend: a pueue group or a Slurm partition entry.

    ``depth`` is how many of our cases it holds at once, running or queued behind each
    other on the HPC (each is one seat row in the database). ``gpu`` pins a device
    (pueue: ``CUDA_VISIBLE_DEVICES``); ``gres`` asks Slurm for one.
    """
    name: str
    gpu: str | None = None
    gres: str | None = None
    parallel: int = 1
    depth: int = 1


@dataclass(frozen=True)
class SlotKeys:
    """Where a scheduler's slots are configured, and how they are read.

    ``keys`` is a frozen, keyword-only dataclass whose fields (made with
    ``shared.config_keys.setting``) are the keys that hold a host's slots: in the top-level
    ``section`` of a config without ``hosts:``, or in each ``hosts`` entry. Its method
    ``slots()`` gives our ``SlotConfig`` for each. ``noun`` names the hosts in messages
    ("give each Slurm host its partitions and bin_dir"). A section no entry declares with
    ``sections`` holds these keys alone: given for another backend, it is refused whole.
    Several schedulers may share one ``SlotKeys`` (direct's slots are pueue's groups).
    """
    section: str
    keys: type
    noun: str


@dataclass(frozen=True)
class Scheduler:
    """One registry entry: everything generic code may know of a scheduler.

    ``build(config, host, runner)`` makes the host's Backend; ``doctor_checks(config, host,
    runner)`` checks the scheduler and our slots on a host ssh reaches (``shared.checks.Check``
    lines), and ``check_names`` names those lines, for when ssh does not answer.
    ``pauses_slots``: the scheduler may pause a slot by itself and ``resume_slot`` resumes it.
    ``gpus_visible``: nvidia-smi in the host's login session sees its tasks' GPUs (``shared.gpus``).

    Its part of the config (``shared.config`` reads it; none names a scheduler there):
    ``slot_keys`` says where a host's slots are configured and how they are read;
    ``sections`` are top-level sections it declares (name -> dataclass of settings), read
    whatever the backend and found as ``config.<name>``; ``host_keys`` is a dataclass of
    settings added to ``hpc`` and to every ``hosts`` entry, found as ``host.hpc.<key>``.
    """

    name: str
    words: Words
    build: Callable[..., Backend]
    doctor_checks: Callable[..., list]
    check_names: tuple[str, ...]
    slot_keys: SlotKeys
    sections: Mapping[str, type] = field(default_factory=dict)
    host_keys: type | None = None
    pauses_slots: bool = False
    gpus_visible: bool = False


def scheduler(name: str) -> Scheduler:
    """The registry entry named ``name``; ConfigError naming ``hpc.backend`` and every known name."""
    module = MODULES.get(name) if isinstance(name, str) else None
    if module is None:
        raise ConfigError(f"hpc.backend: got {name!r}, expected one of: {', '.join(NAMES)}")
    return importlib.import_module(module).SCHEDULER


def schedulers() -> tuple[Scheduler, ...]:
    """Every registry entry, in ``MODULES`` order (each scheduler's module is imported)."""
    return tuple(scheduler(name) for name in NAMES)


def scheduler_of(host) -> Scheduler:
    """The registry entry of a configured host (a ``HostConfig``)."""
    return scheduler(host.backend)


def backend_for(config, host, runner: Runner) -> Backend:
    """The backend that ``host`` (a ``HostConfig`` of ``config``) names, talking through ``runner``."""
    return scheduler_of(host).build(config, host, runner)


# -- settings every scheduler's tasks share --------------------------------------------------------
# They are read from the config's ``pueue`` section, where they were first written; generic code
# reads them here, under neutral names.

def output_lines(config) -> int:
    """How many lines of a task's output the poller keeps as its log tail."""
    return config.pueue.log_lines


def progress_pattern(config) -> str:
    """The regular expression (groups ``done``, ``total``) that reads a case's progress from its output."""
    return config.pueue.progress_pattern


def resumes_paused_slots(config, host) -> bool:
    """Whether the poller resumes a slot the scheduler paused: it can, and the config asks for it."""
    return scheduler_of(host).pauses_slots and config.pueue.resume_paused_groups
