"""pueue commands and parsing: argv builders, pure parsers, and a thin driver.

The parsers read what the real ``pueue`` client prints in v3 (3.4) and v4 (4.0)
(see ``PUEUE.md`` in the reference material). The driver functions each make ONE
runner call, parse its stdout and return a typed value: no retries, no sleeps, no
database. Failures are typed, never ``None``:

- ``Unreachable``: the host could not be reached (raised by the runner);
- ``RemoteError``: pueue ran and exited non-zero (raised by the runner);
- ``BadOutput``: pueue answered something we could not read (raised here).

"Could not tell" is never "failed": a pueue state we do not know maps to
``TaskState.UNKNOWN``, not to a failure.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any, Mapping, Protocol, Sequence

from shared.errors import BadOutput, RemoteError, RemoteFailure

DEFAULT_PROGRESS_PATTERN = r"Generating particles for \((?P<done>\d+) of (?P<total>\d+) batches\)"
FAILURE_MARKERS = ("FATAL ERROR", "ERROR:", "Segmentation fault")
SUCCESS_MARKER = "Total execution time:"
LOG_HANDLE_ERROR = "(Pueue error) Failed to get log file handle"

_EXCERPT_CHARS = 200
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TASK_ID_LINE = re.compile(r"\d+")
_VERSION = re.compile(r"\bpueue\s+v?(\d+\.\d+\.\d+\S*)")
_KILLED_LINE = re.compile(r"Tasks are being killed:([\d, ]*)")
_KILL_FAILED_LINE = re.compile(r"The command failed for tasks:([\d, ]*)")
_REMOVED_LINE = re.compile(r"Tasks removed from list:([\d, ]*)")
_ALREADY_EXISTS = "already exists"
_RFC3339 = re.compile(
    r"(?P<base>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<fraction>\d+))?(?P<offset>[Zz]|[+-]\d\d:\d\d)"
)


class Runner(Protocol):
    """Runs one argv on the HPC and returns its stdout (see ``shared.remote``)."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> str: ...


# ---------------------------------------------------------------------------
# Typed values
# ---------------------------------------------------------------------------

class TaskState(str, Enum):
    """Our name for a pueue task's status; Done results are flattened into it."""

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
    """One pueue task as read from ``status --json`` or ``log --json``.

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

    def by_label(self, label: str) -> list[TaskInfo]:
        """Tasks whose label equals ``label`` exactly, in id order."""
        return [task for _, task in sorted(self.tasks.items()) if task.label == label]

    def paused_groups(self) -> list[str]:
        """Names of the paused groups, sorted (after a daemon restart they need ``start -g``)."""
        return sorted(name for name, group in self.groups.items() if group.paused)


@dataclass(frozen=True)
class LogEntry:
    """One task of ``log --json``. ``log_missing``: pueue had no log file (output is "")."""

    task: TaskInfo
    output: str
    log_missing: bool = False


@dataclass(frozen=True)
class KillResult:
    """Ids pueue started killing, and ids it refused (not running/paused, or unknown)."""

    killed: tuple[int, ...]
    failed: tuple[int, ...]


# ---------------------------------------------------------------------------
# Status mapping (the one place pueue states become ours)
# ---------------------------------------------------------------------------

_LIFECYCLE = {
    "Queued": TaskState.QUEUED,
    "Running": TaskState.RUNNING,
    "Paused": TaskState.PAUSED,
    "Stashed": TaskState.STASHED,
    "Locked": TaskState.LOCKED,
}
_UNIT_RESULTS = {
    "Success": TaskState.SUCCESS,
    "Killed": TaskState.KILLED,
    "Errored": TaskState.ERRORED,
    "DependencyFailed": TaskState.DEPENDENCY_FAILED,
}


def map_task_status(raw_status: Any) -> tuple[TaskState, int | None, str]:
    """Map pueue's ``status`` JSON value (v3 or v4 shape) to ``(state, exit_code, detail)``.

    ``exit_code`` is N for ``{"Failed": N}`` and None otherwise; ``detail`` is the
    spawn error text for FailedToSpawn, the raw JSON for anything we do not know
    (state UNKNOWN), else "". Never raises.
    """
    try:
        mapped = _map_known_status(raw_status)
    except Exception:  # a shape we never imagined is still only "could not tell"
        mapped = None
    if mapped is None:
        return TaskState.UNKNOWN, None, _raw_json(raw_status)
    return mapped


def _map_known_status(raw_status: Any) -> tuple[TaskState, int | None, str] | None:
    name, payload = _variant(raw_status)
    if name in _LIFECYCLE and (payload is None or isinstance(payload, dict)):
        return _LIFECYCLE[name], None, ""
    if name == "Done":
        return _map_result(_done_result(payload))
    return None


def _done_result(payload: Any) -> Any:
    """v3 puts the result right under Done; v4 nests it with the times under "result"."""
    if isinstance(payload, dict) and "result" in payload:
        return payload["result"]
    return payload


def _map_result(result: Any) -> tuple[TaskState, int | None, str] | None:
    name, payload = _variant(result)
    if isinstance(result, str):
        state = _UNIT_RESULTS.get(name)
        return (state, None, "") if state else None
    if name == "Failed" and _is_int(payload):
        return TaskState.FAILED, payload, ""
    if name == "FailedToSpawn" and isinstance(payload, str):
        return TaskState.FAILED_TO_SPAWN, None, payload
    return None


def _variant(value: Any) -> tuple[str | None, Any]:
    """serde's externally tagged enum: "Name" or {"Name": payload}."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        ((name, payload),) = value.items()
        return name, payload
    return None, None


def _is_done_status(raw_status: Any) -> bool:
    return _variant(raw_status)[0] == "Done"


def _raw_json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------

def parse_pueue_time(value: str) -> datetime:
    """Parse pueue's RFC 3339 time (0-9 fraction digits, ``Z`` or an offset) to an aware datetime.

    Nanoseconds are truncated to microseconds. Raises ValueError on anything else.
    """
    match = _RFC3339.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    fraction = match["fraction"]
    micros = "." + fraction[:6].ljust(6, "0") if fraction else ""
    offset = "+00:00" if match["offset"].upper() == "Z" else match["offset"]
    return datetime.fromisoformat(match["base"] + micros + offset)


def _optional_time(value: Any) -> datetime | None:
    """Times are informational: an unreadable one becomes None instead of failing the snapshot."""
    try:
        return parse_pueue_time(value) if value is not None else None
    except ValueError:
        return None


def _task_times(task: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """(enqueued_at, start, end) raw values: top-level in v3, inside the status variant in v4."""
    if "prev_status" in task or "start" in task:
        return task.get("enqueued_at"), task.get("start"), task.get("end")
    times = _nested_times(task.get("status"))
    return times.get("enqueued_at"), times.get("start"), times.get("end")


def _nested_times(status: Any) -> Mapping[str, Any]:
    name, payload = _variant(status)
    if not isinstance(payload, dict):
        return {}
    if name == "Locked":
        return _nested_times(payload.get("previous_status"))
    return payload


# ---------------------------------------------------------------------------
# JSON parsers
# ---------------------------------------------------------------------------

def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def _load_json(text: str, what: str) -> Any:
    """The whole text as JSON, else the last non-empty line that parses (a warning may come first)."""
    if not isinstance(text, str) or not text.strip():
        raise BadOutput(f"{what}: empty output")
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed([line for line in text.splitlines() if line.strip()]):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise BadOutput(f"{what}: not JSON: {_excerpt(text)!r}")


def _require(mapping: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadOutput(f"{what}: {key!r} missing or not {kind.__name__}: {_excerpt(_raw_json(mapping))!r}")
    return value


def _optional_str(mapping: Mapping[str, Any], key: str, what: str) -> str | None:
    value = mapping.get(key)
    if value is not None and not isinstance(value, str):
        raise BadOutput(f"{what}: {key!r} is not a string: {value!r}")
    return value


def _parse_task(raw: Any, what: str) -> TaskInfo:
    if not isinstance(raw, dict):
        raise BadOutput(f"{what}: task is not an object: {_excerpt(_raw_json(raw))!r}")
    if "status" not in raw:
        raise BadOutput(f"{what}: task without status: {_excerpt(_raw_json(raw))!r}")
    state, exit_code, detail = map_task_status(raw["status"])
    enqueued_at, start, end = _task_times(raw)
    return TaskInfo(
        id=_require(raw, "id", int, what),
        label=_optional_str(raw, "label", what),
        group=_require(raw, "group", str, what),
        state=state,
        exit_code=exit_code,
        detail=detail,
        path=_optional_str(raw, "path", what) or "",
        command=_optional_str(raw, "command", what) or "",
        enqueued_at=_optional_time(enqueued_at),
        start=_optional_time(start),
        end=_optional_time(end),
        ended=_is_done_status(raw["status"]),
    )


def _parse_group_map(raw: Any, what: str) -> dict[str, GroupInfo]:
    if not isinstance(raw, dict):
        raise BadOutput(f"{what}: groups is not an object: {_excerpt(_raw_json(raw))!r}")
    groups = {}
    for name, group in raw.items():
        if not isinstance(group, dict):
            raise BadOutput(f"{what}: group {name!r} is not an object")
        status = group.get("status")
        groups[name] = GroupInfo(
            name=name,
            status=status if isinstance(status, str) else _raw_json(status),
            parallel_tasks=_require(group, "parallel_tasks", int, what),
        )
    return groups


def parse_status(text: str) -> Snapshot:
    """Parse ``pueue status --json`` (v3 or v4, detected per task) into a Snapshot.

    Raises BadOutput for non-JSON, a wrong top-level shape, or a task missing
    id/group/status. Unknown statuses do not raise: they map to UNKNOWN.
    """
    what = "pueue status --json"
    document = _load_json(text, what)
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), dict):
        raise BadOutput(f"{what}: expected {{'tasks': {{...}}, 'groups': {{...}}}}: {_excerpt(text)!r}")
    tasks = [_parse_task(raw, what) for raw in document["tasks"].values()]
    return Snapshot(
        tasks={task.id: task for task in tasks},
        groups=_parse_group_map(document.get("groups"), what),
    )


def parse_groups(text: str) -> dict[str, GroupInfo]:
    """Parse ``pueue group --json``; BadOutput on anything else."""
    return _parse_group_map(_load_json(text, "pueue group --json"), "pueue group --json")


def parse_log(text: str) -> dict[int, LogEntry]:
    """Parse ``pueue log --json`` into {task id: LogEntry}; BadOutput on garbage.

    pueue's "(Pueue error) Failed to get log file handle" (no log file yet, e.g. a
    queued task) becomes an empty output with ``log_missing`` set.
    """
    what = "pueue log --json"
    document = _load_json(text, what)
    if not isinstance(document, dict):
        raise BadOutput(f"{what}: expected an object keyed by task id: {_excerpt(text)!r}")
    return {_log_key(key, what): _parse_log_entry(entry, what) for key, entry in document.items()}


def _log_key(key: str, what: str) -> int:
    if not _TASK_ID_LINE.fullmatch(key):
        raise BadOutput(f"{what}: key is not a task id: {key!r}")
    return int(key)


def _parse_log_entry(raw: Any, what: str) -> LogEntry:
    if not isinstance(raw, dict):
        raise BadOutput(f"{what}: entry is not an object: {_excerpt(_raw_json(raw))!r}")
    task = _parse_task(raw.get("task"), what)
    output = _optional_str(raw, "output", what) or ""
    if output.startswith(LOG_HANDLE_ERROR):
        return LogEntry(task=task, output="", log_missing=True)
    return LogEntry(task=task, output=output)


# ---------------------------------------------------------------------------
# Text parsers
# ---------------------------------------------------------------------------

def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_task_id(stdout: str) -> int:
    """The id printed by ``add --print-task-id``: the LAST non-empty line (v3 may warn first)."""
    line = _last_line(stdout)
    if not _TASK_ID_LINE.fullmatch(line):
        raise BadOutput(f"pueue add: expected a task id, got {_excerpt(stdout or '')!r}")
    return int(line)


def parse_version(stdout: str) -> str:
    """"pueue 4.0.4" -> "4.0.4"; BadOutput otherwise."""
    match = _VERSION.search(stdout or "")
    if match is None:
        raise BadOutput(f"pueue --version: no version in {_excerpt(stdout or '')!r}")
    return match[1]


def parse_kill(stdout: str, stderr: str, exit_code: int, requested_ids: Sequence[int]) -> KillResult:
    """Read ``pueue kill IDS`` output (either stream) into a KillResult.

    Raises BadOutput when the exit code is neither 0 nor 1, or when some
    requested id is in neither the "being killed" nor the "failed" line.
    """
    killed, failed = _parse_id_reply("kill", _KILLED_LINE, stdout, stderr, exit_code, requested_ids)
    return KillResult(killed=killed, failed=failed)


def _parse_id_reply(verb: str, done_line: re.Pattern[str], stdout: str, stderr: str, exit_code: int,
                    requested_ids: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    text = f"{stdout or ''}\n{stderr or ''}"
    done = _ids_in_lines(done_line, text)
    failed = _ids_in_lines(_KILL_FAILED_LINE, text)
    unaccounted = set(requested_ids) - set(done) - set(failed)
    if exit_code not in (0, 1) or unaccounted:
        raise BadOutput(f"pueue {verb}: exit {exit_code}, cannot tell ids {sorted(unaccounted)}: {_excerpt(text)!r}")
    return done, failed


def _ids_in_lines(pattern: re.Pattern[str], text: str) -> tuple[int, ...]:
    ids: list[int] = []
    for match in pattern.finditer(text):
        ids.extend(int(number) for number in re.findall(r"\d+", match[1]))
    return tuple(dict.fromkeys(ids))


def parse_progress(output: str, pattern: str | re.Pattern[str] = DEFAULT_PROGRESS_PATTERN) -> float | None:
    """Percent done (100*done/total) from the newest match of ``pattern`` in the log.

    ``pattern`` needs the named groups ``done`` and ``total``. None when no line
    matches or the total is 0; the result is clamped to 0..100.
    """
    matches = list(re.finditer(pattern, output or ""))
    if not matches:
        return None
    done, total = int(matches[-1]["done"]), int(matches[-1]["total"])
    if total <= 0:
        return None
    return max(0.0, min(100.0, 100.0 * done / total))


def find_failure_marker(output: str, markers: Sequence[str] = FAILURE_MARKERS) -> str | None:
    """The first log line containing a failure marker (stripped), or None."""
    for line in (output or "").splitlines():
        if any(marker in line for marker in markers):
            return line.strip()
    return None


def has_success_marker(output: str, marker: str = SUCCESS_MARKER) -> bool:
    """True when some log line starts with the success marker ("Total execution time:")."""
    return any(line.lstrip().startswith(marker) for line in (output or "").splitlines())


# ---------------------------------------------------------------------------
# Argv builders and driver
# ---------------------------------------------------------------------------

def add_argv(
    pueue_cmd: Sequence[str], *, group: str, label: str, workdir: str, command: str,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """``[env K=V ...] pueue add --print-task-id --group G --label L --working-directory W -- COMMAND``.

    ``command`` stays ONE word (the runner quotes it; pueue runs it with ``sh -c``).
    The ``env`` prefix works because pueue captures the client's environment at
    add time, e.g. ``CUDA_VISIBLE_DEVICES`` to pin a GPU. ValueError for an empty
    command or label, a relative workdir (pueue < 4.0.3 stores it verbatim and the
    task later fails to spawn) or an invalid variable name.
    """
    if not command.strip() or not label:
        raise ValueError("pueue add needs a non-empty command and label")
    if not workdir.startswith("/"):
        raise ValueError(f"working directory must be absolute: {workdir!r}")
    return [
        *_env_prefix(env or {}), *pueue_cmd, "add", "--print-task-id",
        "--group", group, "--label", label, "--working-directory", workdir, "--", command,
    ]


def _env_prefix(env: Mapping[str, str]) -> list[str]:
    if not env:
        return []
    return ["env", *(f"{name}={value}" for name, value in _checked_env(env).items())]


def _checked_env(env: Mapping[str, str]) -> Mapping[str, str]:
    bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"invalid environment variable names: {bad}")
    return env


class WorkdirMissing(RemoteFailure):
    """``submit(require_workdir=True)``: the working directory is gone; no task was added."""


class AlreadySubmitted(RemoteFailure):
    """``submit``: a task with this label already exists on the HPC; no second one was added."""


class SubmitLockBusy(RemoteFailure):
    """``submit``: another submission of this label still holds its lock on the HPC (outcome unknown)."""


WORKDIR_MISSING_EXIT = 86
LABEL_EXISTS_EXIT = 87
LOCK_BUSY_EXIT = 85
_SAFE_LABEL = re.compile(r"[A-Za-z0-9_.-]+")
LOCK_FOLDER = ".mqic-locks"

# Idempotent add: under a per-label lock on the HPC, add only when no task carries the
# label; the client is killed after ``limit`` seconds, so an add can never land later
# than ``limit`` after the script started.
ADD_SCRIPT = r"""
pueue=$1 label=$2 limit=$3 workdir=$4 need_dir=$5; shift 5
lockdir=${workdir%/*}/LOCKS
mkdir -p -- "$lockdir" && exec 9>>"$lockdir/$label.lock" || exit 89
flock -w "$limit" 9 || { echo "another submission of $label holds its lock" >&2; exit 85; }
[ "$need_dir" = 0 ] || [ -d "$workdir" ] || exit 86
while [ "$1" != --mqic-add-- ]; do export "$1" || exit 89; shift; done; shift
tasks=$(eval "$pueue status --json") || exit 88
case $tasks in *"\"label\":\"$label\""*) echo "$label already has a task" >&2; exit 87;; esac
eval "exec timeout -s KILL $limit $pueue \"\$@\""
""".replace("LOCKS", LOCK_FOLDER)


def add_lands_within(timeout: float) -> float:
    """Seconds after sending ``submit`` by which its add has landed or never will.

    The remote login may start the script up to ``timeout`` late, the lock wait and the
    killed client each last at most ``timeout``; 10 s cover the daemon's own handling.
    """
    return 3 * timeout + 10


def submit(
    runner: Runner, pueue_cmd: Sequence[str], *, group: str, label: str, workdir: str,
    command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
    require_workdir: bool = False,
) -> int:
    """Add one task, at most one per label, and return its pueue id.

    One remote call: under a lock per label (``<parent of workdir>/.mqic-locks``) it
    adds the task only if no task carries ``label`` (AlreadySubmitted otherwise) and
    kills its own pueue client after ``timeout`` seconds, so an add whose answer was
    lost can no longer land once that time has passed. ``require_workdir`` checks that
    ``workdir`` exists first (WorkdirMissing). Runner errors propagate; BadOutput if no id.
    """
    if not _SAFE_LABEL.fullmatch(label or ""):
        raise ValueError(f"label must be letters, digits, '_', '.', '-': {label!r}")
    add = add_argv(["pueue"], group=group, label=label, workdir=workdir, command=command)
    limit = str(max(1, int(timeout or 60)))
    env_words = [f"{name}={value}" for name, value in _checked_env(env or {}).items()]
    pueue_words = " ".join(shlex.quote(word) for word in pueue_cmd)
    argv = ["sh", "-c", ADD_SCRIPT, "sh", pueue_words, label, limit, workdir, str(int(require_workdir)),
            *env_words, "--mqic-add--", *add[1:]]
    try:
        return parse_task_id(runner.run(argv, timeout=timeout))
    except RemoteError as error:
        raise _add_refusal(error, label, workdir) from None


def _add_refusal(error: RemoteError, label: str, workdir: str) -> RemoteFailure:
    if error.exit_code == WORKDIR_MISSING_EXIT:
        return WorkdirMissing(f"working directory {workdir} does not exist on the HPC")
    if error.exit_code == LABEL_EXISTS_EXIT:
        return AlreadySubmitted(f"a task labelled {label} already exists on the HPC")
    if error.exit_code == LOCK_BUSY_EXIT:
        return SubmitLockBusy(f"another submission of {label} is still in flight on the HPC")
    return error


CLOCK_PREFIX = "mqic-clock "
_CLOCKED = 'printf \'%s%s\\n\' "$1" "$(date +%s)"; shift; exec "$@"'


def statuses(runner: Runner, pueue_cmd: Sequence[str], timeout: float | None = None) -> Snapshot:
    """All tasks and groups of the host in ONE remote call, with the HPC's clock."""
    argv = ["sh", "-c", _CLOCKED, "sh", CLOCK_PREFIX, *pueue_cmd, "status", "--json"]
    return parse_clocked_status(runner.run(argv, timeout=timeout))


def parse_clocked_status(text: str) -> Snapshot:
    """``mqic-clock <epoch>`` on the first line, then ``status --json``; BadOutput otherwise."""
    first, _, rest = (text or "").partition("\n")
    if not first.startswith(CLOCK_PREFIX) or not first[len(CLOCK_PREFIX):].strip().isdigit():
        raise BadOutput(f"pueue status: expected the HPC clock first, got {_excerpt(text or '')!r}")
    return replace(parse_status(rest), hpc_time=float(first[len(CLOCK_PREFIX):]))


def logs(
    runner: Runner, pueue_cmd: Sequence[str], task_ids: Sequence[int], lines: int = 15,
    timeout: float | None = None,
) -> dict[int, str]:
    """The last ``lines`` lines of each task's log in ONE call; unknown ids are absent.

    A task without a log file yet maps to "". No call for an empty id list.
    """
    if not task_ids:
        return {}
    if lines < 1:
        raise ValueError(f"lines must be at least 1, got {lines}")
    argv = [*pueue_cmd, "log", "--json", "--lines", str(lines), *map(str, _checked_ids(task_ids))]
    entries = parse_log(runner.run(argv, timeout=timeout))
    return {task_id: entry.output for task_id, entry in entries.items()}


def kill(
    runner: Runner, pueue_cmd: Sequence[str], task_ids: Sequence[int], timeout: float | None = None,
    *, gently: bool = False,
) -> KillResult:
    """Kill the given tasks: SIGKILL to each task's process group, or SIGTERM when ``gently``.

    ValueError for an empty id list: a bare ``pueue kill`` kills the whole
    default group. pueue's exit 1 "The command failed for tasks: ..." comes back
    as ``KillResult.failed``; any other RemoteError propagates. pueue answers
    before the process dies: the Done/Killed status shows a moment later.
    """
    if not task_ids:
        raise ValueError("refusing 'pueue kill' without task ids: it would kill the whole default group")
    verb = ["kill", "-s", "sigterm"] if gently else ["kill"]
    killed, failed = _act_on_ids(runner, pueue_cmd, verb, _KILLED_LINE, task_ids, timeout)
    return KillResult(killed=killed, failed=failed)


def remove(
    runner: Runner, pueue_cmd: Sequence[str], task_ids: Sequence[int], timeout: float | None = None,
) -> KillResult:
    """Remove queued, stashed or finished tasks from pueue's list (``killed`` = removed ids).

    Running tasks cannot be removed: they come back in ``failed``.
    """
    if not task_ids:
        raise ValueError("refusing 'pueue remove' without task ids")
    removed, failed = _act_on_ids(runner, pueue_cmd, ["remove"], _REMOVED_LINE, task_ids, timeout)
    return KillResult(killed=removed, failed=failed)


def _act_on_ids(runner: Runner, pueue_cmd: Sequence[str], verb: list[str], done_line: re.Pattern[str],
                task_ids: Sequence[int], timeout: float | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ids = _checked_ids(task_ids)
    argv = [*pueue_cmd, *verb, *map(str, ids)]
    try:
        stdout = runner.run(argv, timeout=timeout)
    except RemoteError as error:
        if not _KILL_FAILED_LINE.search(f"{error.stdout}\n{error.stderr}"):
            raise
        return _parse_id_reply(verb[0], done_line, error.stdout, error.stderr, error.exit_code, ids)
    return _parse_id_reply(verb[0], done_line, stdout, "", 0, ids)


def _checked_ids(task_ids: Sequence[int]) -> list[int]:
    """Distinct ids in order; ValueError for anything that is not a non-negative int."""
    bad = [task_id for task_id in task_ids if not _is_int(task_id) or task_id < 0]
    if bad:
        raise ValueError(f"not pueue task ids: {bad!r}")
    return list(dict.fromkeys(task_ids))


def ensure_groups(
    runner: Runner, pueue_cmd: Sequence[str], wanted: Mapping[str, int], timeout: float | None = None,
) -> list[str]:
    """Make every group in ``wanted`` exist with its parallel limit; return the names created.

    Reads ``group --json`` once, runs ``group add NAME -p N`` for missing groups
    and ``parallel N -g NAME`` where the limit differs. A concurrent creation
    ("already exists") is not an error; the limit is then set explicitly.
    Note: v3 creates groups asynchronously, so a task added right after may race.
    """
    existing = parse_groups(runner.run([*pueue_cmd, "group", "--json"], timeout=timeout))
    created = []
    for name, parallel in wanted.items():
        if name in existing:
            if existing[name].parallel_tasks != parallel:
                set_parallel(runner, pueue_cmd, name, parallel, timeout=timeout)
        elif _add_group(runner, pueue_cmd, name, parallel, timeout):
            created.append(name)
        else:
            set_parallel(runner, pueue_cmd, name, parallel, timeout=timeout)
    return created


def _add_group(runner: Runner, pueue_cmd: Sequence[str], name: str, parallel: int, timeout: float | None) -> bool:
    """True if we created the group, False if someone else already had."""
    try:
        runner.run([*pueue_cmd, "group", "add", name, "-p", str(parallel)], timeout=timeout)
    except RemoteError as error:
        if _ALREADY_EXISTS not in f"{error.stdout}\n{error.stderr}":
            raise
        return False
    return True


def set_parallel(
    runner: Runner, pueue_cmd: Sequence[str], group: str, parallel: int, timeout: float | None = None,
) -> None:
    """``parallel N -g GROUP``: set a group's limit (running tasks are never stopped)."""
    runner.run([*pueue_cmd, "parallel", str(parallel), "-g", group], timeout=timeout)


def resume_group(runner: Runner, pueue_cmd: Sequence[str], group: str, timeout: float | None = None) -> None:
    """``start -g GROUP``: resume a paused group (a daemon restart pauses groups with queued tasks)."""
    runner.run([*pueue_cmd, "start", "-g", group], timeout=timeout)


def version(runner: Runner, pueue_cmd: Sequence[str], timeout: float | None = None) -> str:
    """The client's version, e.g. "4.0.4"."""
    return parse_version(runner.run([*pueue_cmd, "--version"], timeout=timeout))
