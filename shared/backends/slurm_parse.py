"""Slurm commands and what they print: argv builders, the batch script, pure parsers, no I/O.

Written against Slurm 22.05 as captured in ``../shared/reference/slurm/`` (Debian 12). Every
builder returns an argv (a list of words; the runner quotes each one) and every parser takes
what a command printed and returns frozen dataclasses, or raises ``BadOutput``.

- ``sbatch_argv`` and ``batch_script``: one job per case, named ``mqic_case_<id>``, whose
  script runs the case's (wrapped) command in the case folder; the wrapper records the exit
  status in ``<case folder>/.mqic/exit_status`` (Slurm forgets finished jobs after
  ``MinJobAge``; without accounting that record is the only lasting outcome).
- ``squeue_argv``, ``MarkedFormat``/``parse_marked_squeue``: all our jobs in one call,
  finished ones included (``--states=all``: without it squeue hides jobs that have just
  finished), its fields set off by a marker drawn fresh for each call, so that no work dir
  (it holds the case's folder name) can shift a field.
- ``scancel_argv``: ``--signal=TERM --full`` (without ``--full`` the batch script, which has no
  ``srun`` steps, is not signalled at all) and plain ``scancel``.
- ``map_job_state``: the ONE place where a Slurm job state becomes ours.
- ``classify_error``/``SlurmError``: what a failed command's stderr and exit code mean
  (controller down, invalid partition, no accounting...). "Could not tell" is never "failed".
"""
from __future__ import annotations

import math
import re
import secrets
import shlex
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Mapping, Sequence

from shared.backends.common import failure_text
from shared.errors import BadOutput, RemoteError

JOB_NAME_PREFIX = "mqic_case_"
MQIC_DIR = ".mqic"
OUTPUT_FILE_PATTERN = f"{MQIC_DIR}/slurm-%j.out"
# Slurm expands '%' patterns in the whole output path and drops them all at a backslash, so a
# path that holds a case's folder name never goes there: the job's own shell opens its
# output file (``OUTPUT_FILE_PATTERN`` with the job id) once it is in the case folder.
SLURM_OUTPUT = "/dev/null"
_REDIRECT_OUTPUT = ('[ -z "${SLURM_JOB_ID:-}" ] || exec >>"' + OUTPUT_FILE_PATTERN.replace("%j", "$SLURM_JOB_ID")
                    + '" 2>&1')
SINFO_FORMAT = "%P|%a|%l|%D|%T|%N"

_EXCERPT_CHARS = 200
_PLAIN_JOB_ID = re.compile(r"\d+")
_STATE_WORD = re.compile(r"[A-Z][A-Z_]*")
_DURATION = re.compile(r"(?:(?P<days>\d+)-)?(?:(?P<hours>\d+):)?(?P<minutes>\d+):(?P<seconds>\d+)")
_NO_DURATION = frozenset({"INVALID", "UNLIMITED", "infinite", "NONE", "N/A", "Partition_Limit", ""})
_NO_TIME = frozenset({"N/A", "Unknown", "None", "NONE", ""})
_SBATCH_PARSABLE = re.compile(r"(?P<id>\d+)(?:;\S+)?")
_SBATCH_VERBOSE = re.compile(r"Submitted batch job (?P<id>\d+)")
_VERSION = re.compile(r"\bslurm(?:-wlm)?\s+(?P<version>\d+\.\d+\.\d+\S*)")
_CANCELLED_BY = re.compile(r"CANCELLED by (?P<uid>\d+)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------
# Our words for a job
# ---------------------------------------------------------------------------

class TaskState(str, Enum):
    """What a Slurm job means for a case (the backend-neutral task states)."""

    WAITING = "waiting"        # queued on the cluster, not started
    RUNNING = "running"        # started and not finished (includes COMPLETING, SUSPENDED)
    SUCCESS = "success"        # exited 0
    FAILED = "failed"          # exited non-zero (``exit_code``), or a failure of the case itself
    KILLED = "killed"          # ended by a signal or by the cluster (cancel, preemption, boot failure)
    TIMED_OUT = "timed_out"    # ended by a time limit (Slurm's TIMEOUT, DEADLINE)
    UNKNOWN = "unknown"        # could not tell; never read as "failed"


@dataclass(frozen=True)
class JobVerdict:
    """A Slurm job state mapped onto ours by ``map_job_state``.

    ``ended``: Slurm is done with the job (also for UNKNOWN after a node failure, where
    the exit-status record has to tell). ``detail`` says why in words.
    """

    state: TaskState
    ended: bool = False
    detail: str = ""


_WAITING_STATES = frozenset({
    "PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
_RUNNING_STATES = frozenset({
    # COMPLETING hides the real end (a job ignoring SIGTERM stays in it for KillWait): poll again.
    "RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING",
    "SUSPENDED", "STOPPED",
})
# Ended by the cluster, not by the case: another attempt is fair.
_KILLED_BY_CLUSTER = {"PREEMPTED": "preempted", "BOOT_FAIL": "node boot failure"}
_TIME_LIMITS = {"TIMEOUT": "time limit reached", "DEADLINE": "deadline reached"}
# The job may have run to its end on the node regardless: only the exit-status record can tell.
_ENDED_UNKNOWN = {
    "NODE_FAIL": "node failed; the job's processes may have run on: read the exit-status record",
    "REVOKED": "revoked by a federation sibling",
}


def map_job_state(state: str, reason: str = "") -> JobVerdict:
    """Map a Slurm job state (squeue ``%T``) and its reason onto ours.

    squeue prints no exit code: how a job that ended by itself went is for the exit-status
    record to tell. CANCELLED is KILLED; the caller knows whether it asked for it. A state
    we do not know is UNKNOWN, never a failure. Never raises.
    """
    base = _base_state(state)
    if base in _WAITING_STATES:
        return JobVerdict(TaskState.WAITING, detail="" if reason == "None" else reason)
    if base in _RUNNING_STATES:
        return JobVerdict(TaskState.RUNNING, detail=base.lower() if base != "RUNNING" else "")
    if base == "COMPLETED":
        return JobVerdict(TaskState.SUCCESS, ended=True)
    if base == "FAILED":
        return JobVerdict(TaskState.FAILED, ended=True, detail=reason)
    if base == "OUT_OF_MEMORY":  # the case asked for too little memory: its own failure
        return JobVerdict(TaskState.FAILED, ended=True, detail="out of memory")
    if base == "CANCELLED":
        return JobVerdict(TaskState.KILLED, ended=True, detail=_cancelled_detail(state))
    if base in _KILLED_BY_CLUSTER:
        return JobVerdict(TaskState.KILLED, ended=True, detail=_KILLED_BY_CLUSTER[base])
    if base in _TIME_LIMITS:
        return JobVerdict(TaskState.TIMED_OUT, ended=True, detail=_TIME_LIMITS[base])
    if base in _ENDED_UNKNOWN:
        return JobVerdict(TaskState.UNKNOWN, ended=True, detail=_ENDED_UNKNOWN[base])
    return JobVerdict(TaskState.UNKNOWN, detail=f"unknown Slurm state {state!r}")


def _base_state(state: str) -> str:
    """The state word alone: sacct writes "CANCELLED by 0" (and a '+' when it cuts a column)."""
    words = (state or "").strip().split()
    return words[0].rstrip("+") if words else ""


def _cancelled_detail(state: str) -> str:
    match = _CANCELLED_BY.search(state or "")
    return f"cancelled by uid {match['uid']}" if match else "cancelled"


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

def job_name(case_id: int) -> str:
    """The Slurm job name of a case: ``mqic_case_<id>`` (the pueue label, same words)."""
    return f"{JOB_NAME_PREFIX}{case_id}"


def case_id_from_job_name(name: str) -> int | None:
    """The case id in ``mqic_case_<id>``, or None for a job that is not one of ours."""
    suffix = name[len(JOB_NAME_PREFIX):] if name.startswith(JOB_NAME_PREFIX) else ""
    return int(suffix) if suffix.isdigit() and suffix.isascii() else None


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue``; times are the cluster's local time (no zone), None if unset."""

    job_id: int
    name: str
    state: str
    reason: str = ""
    partition: str = ""
    submitted: datetime | None = None
    started: datetime | None = None
    elapsed_seconds: int | None = None
    work_dir: str = ""
    comment: str = ""

    @property
    def case_id(self) -> int | None:
        return case_id_from_job_name(self.name)

    @property
    def verdict(self) -> JobVerdict:
        """Mapped state (squeue prints no exit code)."""
        return map_job_state(self.state, self.reason)


@dataclass(frozen=True)
class PartitionInfo:
    """A partition as ``sinfo`` shows it, its lines merged (one per node state)."""

    name: str
    default: bool
    available: bool
    time_limit_seconds: int | None
    nodes: int
    node_states: tuple[str, ...]


# ---------------------------------------------------------------------------
# Building the job
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SubmitSettings:
    """How our jobs go into one partition (from the host's config).

    ``gres`` e.g. ``gpu:1``; ``time_limit_seconds`` from ``running_case_timeout_hours``;
    ``extra_sbatch_lines`` are options such as ``--mem=16G`` (a leading ``#SBATCH`` is
    accepted), written into the script. Options on the sbatch command line win over the
    script's, so an extra line cannot change the partition, name, folder or output.
    ``requeue`` is off: Slurm's requeue after a node failure runs the job a second time
    while the first run may still be going on the node.
    """

    partition: str
    account: str | None = None
    qos: str | None = None
    gres: str | None = None
    time_limit_seconds: int | None = None
    extra_sbatch_lines: tuple[str, ...] = ()
    requeue: bool = False


def command_path(bin_dir: str, name: str) -> str:
    """``name`` itself, or ``bin_dir/name`` (e.g. the sandbox's wrappers that set SLURM_CONF)."""
    return f"{bin_dir.rstrip('/')}/{name}" if bin_dir else name


def output_path(remote_dir: str, job_id: int) -> str:
    """The output file of job ``job_id`` (stdout and stderr) of the case in ``remote_dir``.

    The batch script opens it itself (``--output`` is /dev/null: see ``SLURM_OUTPUT``), so
    Slurm's own notes (``*** JOB 5 CANCELLED ...``) are not in it; the job's state says as much.
    """
    return f"{_checked_dir(remote_dir)}/{OUTPUT_FILE_PATTERN.replace('%j', str(int(job_id)))}"


def sbatch_argv(case_id: int, remote_dir: str, settings: SubmitSettings, *,
                script_path: str | None = None, bin_dir: str = "", comment: str | None = None) -> list[str]:
    """``sbatch --parsable --job-name=mqic_case_<id> --chdir=DIR --output=/dev/null
    --partition=P [--account=A] [--qos=Q] [--gres=G] [--time=T] --no-requeue [--comment=C] [SCRIPT]``.

    Without ``script_path`` sbatch reads the script from its standard input. ``--chdir`` is
    taken as it is, whatever the folder name holds; ``--output`` would not be (Slurm expands
    ``%`` patterns in it and drops them all at a ``\\``), so the script writes
    ``DIR/.mqic/slurm-<id>.out`` itself (``batch_script``). ``remote_dir`` must be absolute
    (``~`` is not expanded here). ValueError on bad input.
    """
    directory = _checked_dir(remote_dir)
    argv = [
        command_path(bin_dir, "sbatch"), "--parsable", f"--job-name={job_name(case_id)}",
        f"--chdir={directory}", f"--output={SLURM_OUTPUT}",
        f"--partition={checked_word('partition', settings.partition)}",
    ]
    for option, value in (("account", settings.account), ("qos", settings.qos),
                          ("gres", settings.gres)):
        if value:
            argv.append(f"--{option}={checked_word(option, value)}")
    if settings.time_limit_seconds is not None:
        argv.append(f"--time={format_time_limit(settings.time_limit_seconds)}")
    argv.append("--requeue" if settings.requeue else "--no-requeue")
    if comment is not None:
        argv.append(f"--comment={checked_word('comment', comment)}")
    if script_path is not None:
        argv.append(_checked_dir(script_path))
    return argv


def batch_script(case_id: int, remote_dir: str, command: str, settings: SubmitSettings,
                 env: Mapping[str, str] | None = None) -> str:
    """The bash script of one case's job.

    It enters ``remote_dir`` (a missing folder ends the job with exit 1 instead of running
    in /tmp, which is what ``--chdir`` alone would do), sends its output (under Slurm) to
    ``.mqic/slurm-<job id>.out``, exports ``env`` (quoted) and ``exec``s ``command`` with
    ``bash -c``. The command writes the exit-status record itself: the Slurm backend runs
    the command that ``shared.tasks.wrap_command`` wrapped, as pueue does.
    """
    directory = _checked_dir(remote_dir)
    if not command.strip():
        raise ValueError("the remote command is empty")
    lines = ["#!/bin/bash", *(sbatch_line(line) for line in settings.extra_sbatch_lines),
             f"# Written by MQI Communicator for case {int(case_id)}: runs its command in its folder.",
             _enter(directory), f"mkdir -p {MQIC_DIR}", _REDIRECT_OUTPUT, *_exports(env or {}),
             f"exec /bin/bash -c {_quote(command)}"]
    return "\n".join(lines) + "\n"


def _enter(directory: str) -> str:
    return f"cd -- {_quote(directory)} || {{ echo {_quote(f'mqic: cannot enter {directory}')} >&2; exit 1; }}"


def sbatch_line(line: str) -> str:
    """``#SBATCH OPTION`` for one option such as ``--mem=16G`` (a leading ``#SBATCH`` is accepted).

    ValueError for anything else (no leading '-', a control character such as a newline).
    """
    option = line.strip()
    if option.startswith("#SBATCH"):
        option = option[len("#SBATCH"):].strip()
    if _CONTROL_CHARS.search(option) or not option.startswith("-"):
        raise ValueError(f"an extra #SBATCH line must be one option such as --mem=16G: {line!r}")
    return f"#SBATCH {option}"


def _exports(env: Mapping[str, str]) -> list[str]:
    bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"invalid environment variable names: {bad}")
    return [f"export {name}={_quote(value)}" for name, value in env.items()]


def _quote(text: str) -> str:
    return shlex.quote(text)


def _checked_dir(path: str) -> str:
    # Any other character may stand in a folder name: the path only ever reaches Slurm as
    # --chdir (taken as it is) and the shell quoted, never inside a Slurm filename pattern.
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"expected an absolute path without NUL: {path!r}")
    return path.rstrip("/") or "/"


def checked_word(what: str, value: str) -> str:
    """``value`` if it is one command-line word for Slurm (no space, no leading '-', no control character)."""
    if not value or value.startswith("-") or _CONTROL_CHARS.search(value) or " " in value:
        raise ValueError(f"invalid Slurm {what}: {value!r}")
    return value


def format_time_limit(seconds: float) -> str:
    """``--time`` as ``D-HH:MM:SS``, rounded up to whole minutes as Slurm does itself."""
    if seconds <= 0:
        raise ValueError(f"a time limit must be positive, got {seconds!r}")
    days, rest = divmod(math.ceil(seconds / 60), 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:00"


# ---------------------------------------------------------------------------
# Other commands
# ---------------------------------------------------------------------------

def squeue_argv(*, fmt: str, bin_dir: str = "") -> list[str]:
    """``squeue --me --noheader --states=all --format=FMT``: every job of our user in one call.

    ``case_id`` tells ours. ``--states=all`` keeps jobs that have just finished (until
    ``MinJobAge``); without it they would look absent.
    """
    return [command_path(bin_dir, "squeue"), "--me", "--noheader", "--states=all", f"--format={fmt}"]


def _id_list(job_ids: Sequence[int]) -> str:
    ids = [int(job_id) for job_id in job_ids]
    if any(job_id <= 0 for job_id in ids):
        raise ValueError(f"job ids must be positive: {ids}")
    return ",".join(map(str, ids))


def scancel_argv(job_ids: Sequence[int], *, signal: str | None = None, bin_dir: str = "") -> list[str]:
    """``scancel [--signal=SIG --full] IDS``.

    Plain scancel ends the jobs (TERM, then KILL after KillWait). With ``signal`` only the
    signal is sent, and ``--full`` makes it reach the batch script and its command.
    scancel exits 0 for ids that are unknown or finished: its success proves nothing.
    """
    if not job_ids:
        raise ValueError("scancel needs at least one job id")
    return [*_scancel_head(signal, bin_dir), *_id_list(job_ids).split(",")]


def _scancel_head(signal: str | None, bin_dir: str) -> list[str]:
    head = [command_path(bin_dir, "scancel")]
    if signal is not None:
        if not re.fullmatch(r"(SIG)?[A-Z0-9]+", signal):
            raise ValueError(f"invalid signal name: {signal!r}")
        head += [f"--signal={signal}", "--full"]
    return head


def sinfo_argv(*, bin_dir: str = "") -> list[str]:
    """``sinfo --noheader --format=%P|%a|%l|%D|%T|%N``: partitions and their node states."""
    return [command_path(bin_dir, "sinfo"), "--noheader", f"--format={SINFO_FORMAT}"]


def version_argv(*, bin_dir: str = "") -> list[str]:
    return [command_path(bin_dir, "sbatch"), "--version"]



# ---------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------

def _excerpt(text: str) -> str:
    text = (text or "").strip()
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in (text or "").splitlines() if line.strip()]


def parse_sbatch(stdout: str) -> int:
    """The job id from ``sbatch --parsable`` (``12`` or ``12;cluster``) or ``Submitted batch job 12``."""
    lines = _lines(stdout)
    last = lines[-1].strip() if lines else ""
    match = _SBATCH_PARSABLE.fullmatch(last) or _SBATCH_VERBOSE.fullmatch(last)
    if match is None:
        raise BadOutput(f"sbatch: expected a job id, got {_excerpt(stdout)!r}")
    return int(match["id"])


@dataclass(frozen=True)
class MarkedFormat:
    """An squeue ``--format`` whose every field is set off by ``mark``, drawn fresh for each call.

    squeue prints a field as it is, unquoted: a work dir holds the case's folder name, which
    may hold '|', a tab, a newline, '%' or any other character but '/' and NUL. No value can
    hold a random marker it could not know, so no value can shift a field or a line.
    """

    codes: tuple[str, ...]
    mark: str

    @classmethod
    def fresh(cls, codes: Sequence[str]) -> MarkedFormat:
        return cls(tuple(codes), f"~mqic-{secrets.token_hex(8)}~")

    @property
    def text(self) -> str:
        """The ``--format`` value: ``MARK%iMARK%j...MARK`` (each job then ends with a newline)."""
        return self.mark + self.mark.join(self.codes) + self.mark


def parse_marked_squeue(stdout: str, fmt: MarkedFormat) -> tuple[QueuedJob, ...]:
    """The jobs of ``squeue --noheader --format=<fmt.text>``, every value exactly as printed.

    ``codes`` must contain ``%i``, ``%j`` and ``%T``; ``%r %P %V %S %M %Z %k`` (reason,
    partition, submit and start time, elapsed, work dir, comment) are read too, any other
    field is skipped. An unset work dir or comment (``(null)``) is "". Lines of array or
    heterogeneous jobs (``12_3``, ``12+0``) are left out: ours are plain jobs. BadOutput
    when the output does not have the shape of the format (text outside the markers, a
    job with a field missing).
    """
    _check_squeue_codes(fmt.codes)
    if not (stdout or "").strip():
        return ()
    head, *tokens = stdout.split(fmt.mark)
    width = len(fmt.codes) + 1  # the fields, then what follows the last marker: the newline
    if head.strip() or not tokens or len(tokens) % width:
        raise BadOutput(f"squeue: output does not fit its format: {_excerpt(stdout)!r}")
    jobs = []
    for start in range(0, len(tokens), width):
        *values, after = tokens[start:start + width]
        if after.strip():
            raise BadOutput(f"squeue: text between two jobs: {_excerpt(after)!r}")
        fields = dict(zip(fmt.codes, values))
        if _PLAIN_JOB_ID.fullmatch(fields["%i"]):
            jobs.append(_queued_job(fields, "".join(values)))
    return tuple(jobs)


def _check_squeue_codes(codes: Sequence[str]) -> None:
    if not {"%i", "%j", "%T"} <= set(codes):
        raise ValueError(f"squeue format needs %i, %j and %T: {codes!r}")


def _split_fields(line: str, names: Sequence[str], what: str) -> dict[str, str]:
    parts = line.split("|", len(names) - 1)
    if len(parts) != len(names):
        raise BadOutput(f"{what}: expected {len(names)} fields in {_excerpt(line)!r}")
    return dict(zip(names, (part.strip() for part in parts)))


def _queued_job(values: Mapping[str, str], line: str) -> QueuedJob:
    return QueuedJob(
        job_id=int(values["%i"]),
        name=values["%j"],
        state=_checked_state(values["%T"], line),
        reason=values.get("%r", ""),
        partition=values.get("%P", ""),
        submitted=parse_slurm_time(values.get("%V", "")),
        started=parse_slurm_time(values.get("%S", "")),
        elapsed_seconds=parse_duration(values.get("%M", "")),
        work_dir=_unless_null(values.get("%Z", "")),
        comment=_unless_null(values.get("%k", "")),
    )


def _unless_null(value: str) -> str:
    return "" if value == "(null)" else value


def _checked_state(state: str, line: str) -> str:
    if not _STATE_WORD.fullmatch(_base_state(state)):
        raise BadOutput(f"not a Slurm job state: {state!r} in {_excerpt(line)!r}")
    return state


def parse_partitions(stdout: str) -> dict[str, PartitionInfo]:
    """``sinfo --noheader --format=%P|%a|%l|%D|%T|%N`` by partition name (``*`` marks the default)."""
    partitions: dict[str, PartitionInfo] = {}
    for line in _lines(stdout):
        values = _split_fields(line, SINFO_FORMAT.split("|"), "sinfo")
        name = values["%P"].rstrip("*")
        if not name or not values["%D"].isdigit():
            raise BadOutput(f"sinfo: unreadable line {_excerpt(line)!r}")
        seen = partitions.get(name)
        partitions[name] = PartitionInfo(
            name=name,
            default=values["%P"].endswith("*") or (seen is not None and seen.default),
            available=values["%a"] == "up",
            time_limit_seconds=parse_duration(values["%l"]),
            nodes=int(values["%D"]) + (seen.nodes if seen else 0),
            node_states=(*(seen.node_states if seen else ()), values["%T"]),
        )
    return partitions


def parse_version(stdout: str) -> str:
    """``slurm-wlm 22.05.8`` (or ``slurm 23.02.1``) -> ``22.05.8``."""
    match = _VERSION.search(stdout or "")
    if match is None:
        raise BadOutput(f"Slurm --version: no version in {_excerpt(stdout)!r}")
    return match["version"]


def parse_duration(text: str) -> int | None:
    """``[D-][H:]MM:SS`` in seconds; None for ``UNLIMITED``, ``infinite`` (sinfo), ``INVALID``, ``N/A`` and empty."""
    value = (text or "").strip()
    if value in _NO_DURATION:
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        raise BadOutput(f"not a Slurm duration: {text!r}")
    days, hours = int(match["days"] or 0), int(match["hours"] or 0)
    return ((days * 24 + hours) * 60 + int(match["minutes"])) * 60 + int(match["seconds"])


def parse_slurm_time(text: str) -> datetime | None:
    """``2026-12-01T04:54:47`` (the cluster's local time, no zone) as a naive datetime.

    None for ``N/A``, ``Unknown``, ``None`` and empty (not started, not ended).
    """
    value = (text or "").strip()
    if value in _NO_TIME:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise BadOutput(f"not a Slurm time: {text!r}") from None


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------

class SlurmErrorKind(str, Enum):
    """What a failed Slurm command means, read from its stderr and exit code."""

    CONTROLLER_DOWN = "controller_down"          # connect failure: the request never arrived
    CONTROLLER_TIMEOUT = "controller_timeout"    # the request may have arrived (a submit may have landed)
    ACCOUNTING_DISABLED = "accounting_disabled"  # no slurmdbd: sacct will never answer
    ACCOUNTING_DOWN = "accounting_down"          # slurmdbd configured but not answering
    NOT_CONFIGURED = "not_configured"            # the client finds no slurm.conf (SLURM_CONF?)
    NOT_INSTALLED = "not_installed"              # the command is not on the HPC's PATH
    INVALID_JOB_ID = "invalid_job_id"            # unknown to slurmctld: purged, never existed
    INVALID_PARTITION = "invalid_partition"
    INVALID_ACCOUNT = "invalid_account"
    INVALID_QOS = "invalid_qos"
    UNSATISFIABLE = "unsatisfiable"              # the request can never run here (gres, memory, time)
    LIMIT_REACHED = "limit_reached"              # a submit limit: try again later
    BAD_REQUEST = "bad_request"                  # our command line or script is wrong
    OTHER = "other"

    @property
    def transient(self) -> bool:
        """True when asking again later may succeed: "could not tell", never "failed"."""
        return self in _TRANSIENT

    @property
    def meaning(self) -> str:
        """A few words for a message ("" for OTHER: the first line of stderr says it)."""
        return _MEANINGS.get(self, "")

    @property
    def submit_may_have_landed(self) -> bool:
        """True when a failed sbatch may still have created the job: look it up by name."""
        return self in (SlurmErrorKind.CONTROLLER_TIMEOUT, SlurmErrorKind.OTHER)


_TRANSIENT = frozenset({
    SlurmErrorKind.CONTROLLER_DOWN, SlurmErrorKind.CONTROLLER_TIMEOUT,
    SlurmErrorKind.ACCOUNTING_DOWN, SlurmErrorKind.LIMIT_REACHED, SlurmErrorKind.OTHER,
})
_MEANINGS = {
    SlurmErrorKind.CONTROLLER_DOWN: "Slurm controller unreachable",
    SlurmErrorKind.CONTROLLER_TIMEOUT: "Slurm controller did not answer in time",
    SlurmErrorKind.ACCOUNTING_DISABLED: "no Slurm accounting on this cluster",
    SlurmErrorKind.ACCOUNTING_DOWN: "Slurm accounting unreachable",
    SlurmErrorKind.NOT_CONFIGURED: "the Slurm client finds no configuration (SLURM_CONF?)",
    SlurmErrorKind.NOT_INSTALLED: "command not found on the HPC",
    SlurmErrorKind.INVALID_JOB_ID: "job unknown to Slurm",
    SlurmErrorKind.INVALID_PARTITION: "invalid partition",
    SlurmErrorKind.INVALID_ACCOUNT: "invalid account",
    SlurmErrorKind.INVALID_QOS: "invalid QOS",
    SlurmErrorKind.UNSATISFIABLE: "the request can never run on this cluster",
    SlurmErrorKind.LIMIT_REACHED: "a submit limit was reached",
    SlurmErrorKind.BAD_REQUEST: "Slurm refused the request",
}
_SLURM_COMMANDS = frozenset({"sbatch", "squeue", "scancel", "sinfo", "sacct", "sacctmgr", "scontrol", "srun"})
_SHELL_COMMAND_NOT_FOUND = 127
# Checked in order; the first match wins.
_ERROR_PATTERNS: tuple[tuple[SlurmErrorKind, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in (
        (SlurmErrorKind.NOT_CONFIGURED,
         r"Could not establish a configuration source|Unable to process configuration file"),
        (SlurmErrorKind.CONTROLLER_DOWN,
         r"Unable to contact slurm controller|Slurmctld\(\w+\) at \S+ is DOWN"),
        (SlurmErrorKind.CONTROLLER_TIMEOUT,
         r"Socket timed out on send/recv|Zero Bytes were transmitted or received"),
        (SlurmErrorKind.ACCOUNTING_DISABLED,
         r"accounting storage is disabled|not running a supported accounting_storage plugin"),
        (SlurmErrorKind.ACCOUNTING_DOWN,
         r"Problem talking to the database|persistent connection|Connection refused"),
        (SlurmErrorKind.INVALID_JOB_ID, r"Invalid job id specified"),
        (SlurmErrorKind.INVALID_PARTITION, r"Invalid partition (name )?specified"),
        (SlurmErrorKind.INVALID_ACCOUNT, r"Invalid account"),
        (SlurmErrorKind.INVALID_QOS, r"Invalid qos specification"),
        (SlurmErrorKind.LIMIT_REACHED,
         r"violates accounting/QOS policy|MaxSubmitJob|temporarily unable to accept job"),
        (SlurmErrorKind.UNSATISFIABLE,
         r"Requested node configuration is not available|can not be satisfied|"
         r"Requested time limit is invalid|More processors requested than permitted|"
         r"Invalid generic resource|Invalid node name specified|Invalid --time specification|"
         r"Invalid feature specification|Node count specification invalid"),
        (SlurmErrorKind.BAD_REQUEST,
         r"unrecognized option|invalid option|Batch script is empty|Unable to open file|"
         r"does not look like a batch script|Invalid job id \S|Invalid job format specification"),
    )
)


def command_name(argv: Sequence[str]) -> str:
    """The first Slurm command in ``argv`` (``squeue`` of ``sh -c ... /opt/slurm/bin/squeue``)."""
    names = (word.rsplit("/", 1)[-1] for word in argv)
    return next((name for name in names if name in _SLURM_COMMANDS), "remote command")


def classify_error(stderr: str, exit_code: int) -> SlurmErrorKind:
    """The kind of failure of a Slurm command from its stderr (and stdout) and exit code.

    Checked on the captured outputs: ``Unable to contact slurm controller`` (exit 1, or 8
    for scancel), ``Invalid job id specified`` (squeue/scontrol of a purged job; scancel
    --signal of an unknown one), ``Slurm accounting storage is disabled`` (sacct without
    slurmdbd), ``invalid partition``... Exit 127 is the shell's "command not found".
    Anything else is OTHER, which is transient: never a verdict on the case.
    """
    if exit_code == _SHELL_COMMAND_NOT_FOUND:
        return SlurmErrorKind.NOT_INSTALLED
    for kind, pattern in _ERROR_PATTERNS:
        if pattern.search(stderr or ""):
            return kind
    return SlurmErrorKind.OTHER


class SlurmError(RemoteError):
    """A Slurm command ran on the HPC and failed; ``kind`` says what that means.

    Its message is short: ``squeue failed (exit 1: Slurm controller unreachable): <first
    line of stderr>``; the argv (which may hold a whole script) stays in ``argv``.
    """

    def __init__(self, argv: Sequence[str], exit_code: int, stderr: str, stdout: str = ""):
        super().__init__(list(argv), exit_code, stderr, stdout)
        self.kind = classify_error(f"{stderr or ''}\n{stdout or ''}", exit_code)
        self.args = (failure_text(command_name(self.argv), self, self.kind.meaning),)

    @classmethod
    def from_remote_error(cls, error: RemoteError) -> SlurmError:
        """The same failure, classified."""
        return cls(error.argv, error.exit_code, error.stderr, error.stdout)
