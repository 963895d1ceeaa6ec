"""pueue's outputs read into our model: pure parsers and argv builders, no I/O.

They read what the real ``pueue`` client prints in v3 (3.4) and v4 (4.0) (see
``PUEUE.md`` in the reference material). Failures are ``BadOutput``; a pueue
state we do not know maps to ``TaskState.UNKNOWN``, not to a failure.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Mapping, Sequence

from shared.backends.common import answer_lost, split_clock
from shared.backends.model import Snapshot, TaskInfo, TaskState
from shared.errors import BadOutput, RemoteError, SchedulerOutage, SlotLost, TransientRemoteError

LOG_HANDLE_ERROR = "(Pueue error) Failed to get log file handle"

_EXCERPT_CHARS = 200
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TASK_ID_LINE = re.compile(r"\d+")
_VERSION = re.compile(r"\bpueue\s+v?(\d+\.\d+\.\d+\S*)")
_KILLED_LINE = re.compile(r"Tasks are being killed:([\d, ]*)")
_KILL_FAILED_LINE = re.compile(r"The command failed for tasks:([\d, ]*)")
_REMOVED_LINE = re.compile(r"Tasks removed from list:([\d, ]*)")
_ALREADY_EXISTS = "already exists"
# The client's words when the daemon could not take a request at all: it is down (its socket
# missing or stale) or was never started (no configuration). Nothing was made.
OUTAGE_TEXTS = ("while connecting to daemon", "Connection refused (os error 111)",
                "Couldn't find a configuration file")
# A group of ours was removed: "Group gpu_c doesn't exists. Use one of these: [...]" (sic).
SLOT_LOST_TEXT = "doesn't exists. Use one of these"
# The client sent a request but the daemon's answer never came: it may have stored the task.
ANSWER_LOST_TEXTS = ("Failed to receive message from daemon",)
_RFC3339 = re.compile(
    r"(?P<base>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<fraction>\d+))?(?P<offset>[Zz]|[+-]\d\d:\d\d)"
)


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
class LogEntry:
    """One task of ``log --json``. ``log_missing``: pueue had no log file (output is "")."""

    task: TaskInfo
    output: str
    log_missing: bool = False



# ---------------------------------------------------------------------------
# Status mapping (the one place pueue states become ours)
# ---------------------------------------------------------------------------

_LIFECYCLE = {
    "Queued": TaskState.QUEUED,
    "Running": TaskState.RUNNING,
    "Paused": TaskState.PAUSED,
    "Stashed": TaskState.QUEUED,
    "Locked": TaskState.QUEUED,
}
_WAITING_WORDS = {"Stashed": "stashed", "Locked": "locked"}  # held back: not started yet, in ``detail``
_UNIT_RESULTS = {
    "Success": TaskState.SUCCESS,
    "Killed": TaskState.KILLED,
    "Errored": TaskState.ERRORED,
    "DependencyFailed": TaskState.DEPENDENCY_FAILED,
}


def map_task_status(raw_status: Any) -> tuple[TaskState, int | None, str]:
    """Map pueue's ``status`` JSON value (v3 or v4 shape) to ``(state, exit_code, detail)``.

    ``exit_code`` is N for ``{"Failed": N}`` and None otherwise; ``detail`` is the
    spawn error text for FailedToSpawn, pueue's word for a task it holds back (Stashed,
    Locked: both QUEUED for us), the raw JSON for anything we do not know (state
    UNKNOWN), else "". Never raises.
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
        return _LIFECYCLE[name], None, _WAITING_WORDS.get(name, "")
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
    id/group/status. Unknown statuses do not raise: they map to UNKNOWN. The paused
    groups are the snapshot's ``paused_slots``.
    """
    tasks, groups = _parse_status_document(text)
    return Snapshot(tasks={task.id: task for task in tasks},
                    paused_slots=tuple(sorted(name for name, group in groups.items() if group.paused)))


def parse_status_groups(text: str) -> dict[str, GroupInfo]:
    """The groups of ``pueue status --json`` (``mqic doctor`` and the chaos check read them all)."""
    return _parse_status_document(text)[1]


def _parse_status_document(text: str) -> tuple[list[TaskInfo], dict[str, GroupInfo]]:
    what = "pueue status --json"
    document = _load_json(text, what)
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), dict):
        raise BadOutput(f"{what}: expected {{'tasks': {{...}}, 'groups': {{...}}}}: {_excerpt(text)!r}")
    tasks = [_parse_task(raw, what) for raw in document["tasks"].values()]
    return tasks, _parse_group_map(document.get("groups"), what)


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


# ---------------------------------------------------------------------------
# Failures: the one place pueue's words become our types
# ---------------------------------------------------------------------------

def classify_error(error: RemoteError) -> RemoteError:
    """What a failed pueue command means, as a type: the daemon could not take it at all
    (``SchedulerOutage``: no attempt is used), a group of ours is gone (``SlotLost``), else
    ``error`` itself (a ``ResourceShortage`` from ``shared.remote`` stays one)."""
    said = f"{error.stdout or ''}\n{error.stderr or ''}"
    if any(text in said for text in OUTAGE_TEXTS):
        kind: type[RemoteError] = SchedulerOutage
    elif SLOT_LOST_TEXT in said and not isinstance(error, TransientRemoteError):
        kind = SlotLost
    else:
        return error
    typed = kind(error.argv, error.exit_code, error.stderr, error.stdout)
    typed.args = error.args
    return typed


def add_answer_lost(error: RemoteError) -> bool:
    """True when a failed ``pueue add`` cannot tell whether the task was stored: its client was
    killed by a signal (exit > 128, e.g. after our time limit) or lost the daemon after sending."""
    said = f"{error.stdout or ''}\n{error.stderr or ''}"
    return answer_lost(error) or any(text in said for text in ANSWER_LOST_TEXTS)


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


def parse_clocked_status(text: str) -> Snapshot:
    """``mqic-clock <epoch>`` on the first line, then ``status --json``; BadOutput otherwise."""
    hpc_time, rest = split_clock(text, "pueue status")
    return replace(parse_status(rest), hpc_time=hpc_time)
