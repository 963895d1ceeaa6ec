"""Typed failures shared by every module.

A remote call never returns ``None`` for "it went wrong": it raises one of the
``RemoteFailure`` subclasses below, and only the caller decides what the failure
means for a case. "Could not tell" (``Unreachable``, ``BadOutput``) is never
"failed".
"""
from __future__ import annotations


class MqicError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(MqicError):
    """The configuration file is missing, unreadable or invalid (exit code 2)."""


class ForbiddenTransition(MqicError):
    """A status change that the ALLOWED table does not permit."""


class UnknownStatus(MqicError):
    """A status value read from the database that no enum member names."""


class RemoteFailure(MqicError):
    """Base of the failures of a remote action (ssh, scp, the scheduler's commands)."""


class Unreachable(RemoteFailure):
    """The host could not be reached: ssh exit 255, a timeout, a refused connection."""


class RemoteError(RemoteFailure):
    """The remote command ran and failed."""

    def __init__(self, argv: list[str], exit_code: int, stderr: str, stdout: str = ""):
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        self.stdout = stdout
        detail = (stderr.strip() or stdout.strip())[-500:]
        super().__init__(f"remote command exited {exit_code}: {' '.join(self.argv)[:300]}: {detail}")


class BadOutput(RemoteFailure):
    """The remote answered, but its output could not be parsed."""


class ClaimExpired(MqicError):
    """The worker that claimed a case died mid-submission and no remote task exists."""


class HpcTrouble(RemoteFailure):
    """The HPC or its set-up failed, not the case (e.g. a transfer the HPC does not support)."""


class LocalFailure(RemoteFailure):
    """A remote action failed here, on this workstation, not at the host: our local tar could not
    read the case folder, the local disk filled while fetching, our own shutdown stopped the call.

    It says nothing about the host (it never marks it down) and nothing about the case (it never
    uses up an attempt).
    """


class HostKeyMismatch(RemoteFailure):
    """ssh refused the host key the HPC presented: changed (what an interception looks like) or
    none known for it. Not an outage: nothing is sent to that host until an operator has checked
    the key with the cluster's admins and fixed ``known_hosts``; never a reason to fail a case.
    """

    def __init__(self, host: str, detail: str, *, fingerprint: str | None = None, unknown: bool = False):
        self.host = host
        self.fingerprint = fingerprint
        self.unknown = unknown
        what = ("host key unknown: no key for it in known_hosts" if unknown
                else "host key changed: possible interception")
        seen = f"; it presented {fingerprint}" if fingerprint else ""
        super().__init__(f"{host}: {what}{seen}; nothing is sent there until the key is verified with the"
                         f" cluster's admins and known_hosts is fixed (see mqic doctor) [{detail}]")


# -- what a failed remote command means ---------------------------------------------------------
# Typed where the text is read (``shared.remote`` for the OS's words, each backend for its
# scheduler's); generic code decides from these types alone and never reads a command's text.

class TransientRemoteError(RemoteError):
    """The remote command failed for a reason that passes: another attempt may succeed.

    It still uses up an attempt (``shared.tasks.counts_as_attempt``), so a trouble that
    never passes ends once ``max_attempts`` are used.
    """


class ResourceShortage(TransientRemoteError):
    """The HPC's system ran short of something that comes back: disk space, quota, processes,
    open files ("No space left on device", "Disk quota exceeded", "Resource temporarily
    unavailable", "Too many open files"; read in ``shared.remote``)."""


class SlotLost(TransientRemoteError):
    """The scheduler no longer knows one of our slots (someone removed it): the submitter makes
    the host's slots sure again before it submits there."""


class SchedulerOutage(RemoteError, HpcTrouble):
    """The scheduler could not take the request at all (its daemon or controller down, no
    configuration, a submit limit): nothing was made, and no attempt is used up."""


# -- what a submit says besides "done" (``Backend.submit``) ---------------------------------------

class WorkdirMissing(RemoteFailure):
    """``submit(require_workdir=True)``: the working directory is gone; no task was added."""


class AlreadySubmitted(RemoteFailure):
    """``submit``: a task with this label already exists on the HPC; no second one was added."""


class SubmitLockBusy(RemoteFailure):
    """``submit``: another submission of this label still holds its lock on the HPC (outcome unknown)."""


class SubmitUncertain(RemoteFailure):
    """``submit``: the request may have reached the scheduler but its answer was lost (its
    client killed by a signal, the daemon gone after it read the request): look it up by label."""
