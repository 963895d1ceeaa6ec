#!/usr/bin/env python3
"""A faithful stand-in of the pueue client and daemon (pueue 3.4.1 and 4.0.4 shapes).

Real ``pueue`` cannot be installed in the sandbox, so this one file plays both
programs, stdlib only. It copies what ``PUEUE.md`` and ``cli_responses.json`` in
the reference material describe: the JSON shapes of v3 and v4, the exact texts
and exit codes, where the texts go (daemon failures on stdout in v3, on stderr
in v4), task ids, groups, parallel slots, priorities, dependencies, kill
semantics, ``restore_state`` after a crash, and the client errors when the
daemon is down or was never started.

Invocation (``PUEUE_STANDIN_DIR`` must name the data directory)::

    python pueue_standin.py status --json           # the client, like `pueue ...`
    python pueue_standin.py --daemon                # the daemon in the foreground
    python pueue_standin.py --daemon -d             # like `pueued -d`
    python pueue_standin.py --ctl restart           # stand-in controls (see below)

``write_wrappers(bin_dir, data_dir)`` writes ``pueue``, ``pueued`` and
``pueue-standin-ctl`` shell wrappers so that a remote shell calls
``/path/bin/pueue status --json`` exactly like the real thing.

Controls (``--ctl``, for tests and chaos):

- ``format v3|v4``: which shapes and texts to emit (default v4);
- ``restart``: a daemon crash and restart exactly like real pueue's
  ``restore_state`` (SIGKILL of the daemon and of every task's process group,
  Running/Paused -> Done/Killed, Locked -> Stashed, every group with Queued
  tasks -> Paused);
- ``stop [--stale]``: the daemon (and its tasks) die; clients then fail with the
  "while connecting to daemon" error (``--stale`` leaves the socket file, which
  gives "Connection refused" like a real crash);
- ``start``: start the daemon (it restores the state like a real start);
- ``garbage N``: the next N successful ``status --json`` calls print non-JSON
  garbage and exit 0;
- ``lose-add N [--late S] [--hang H] [--label PREFIX]``: the answers of the next
  N ``pueue add`` calls (only those whose label starts with PREFIX, if given)
  are lost *after the daemon acted*. The client sends the request and prints
  nothing; it waits until whoever reads its stdout goes away (our ssh gave up:
  the pipe's reader closed) and then exits 1 silently, or, if the reader is
  still there after H seconds (default 60), prints the daemon's normal answer,
  late. Without ``--late`` the daemon stores the task at once (it runs
  normally); with ``--late S`` the daemon stores it S seconds after it received
  the request, even if the client has long given up by then (real pueued acts
  within milliseconds: this models a stalled daemon, and other requests are
  answered meanwhile, so ``status`` does not show the task until it lands).
  Each lost answer is noted in ``daemon.log`` (``lose-add: ...``);
- ``foreign-add [--label L | --no-label] [-g GROUP] [SECONDS]``: another user
  adds ``sleep SECONDS; exit 0`` (default 10 s, label ``other_user_job``, group
  ``default``) and the control prints its id like ``add -p``. Ids are
  ``max(existing)+1``, so after ``clean`` or ``remove`` it may take a freed id;
- ``version-string X``: ``pueue --version`` prints ``pueue X``;
- ``pid``: print the daemon's pid (exit 1 when it is not running);
- ``task-loop MS``: run tasks like real pueue's task handler, a pass every MS
  milliseconds (v4: 300, v3: 200; 0, the default, turns it off). A finished
  process is noticed, and stamped ``end``, only at the next pass, which also
  starts the queued tasks that fit (``start`` stamped then); ``pueue add`` and
  every other request only change the state, never start a task. So, as with
  real pueue, a queued task's ``start`` in ``status`` equals the previous task's
  ``end``, while its process really started up to one pass after the previous
  process exited (and up to one pass after its ``add``).

Deliberate differences from real pueue, all in the caller's favour or harmless:

- ``bin/pueue`` starts the quick client (``pueue_client.py``), which sends its words to the
  daemon to be read there exactly as this file reads them (this file answers when the daemon is
  down or a ``lose-add`` needs the client's stdout): a Python start of ~30 ms instead of ~75 ms
  (real pueue's client: a few ms);

- ``pueued -d`` returns once the daemon accepts connections (up to 5 s), and the
  child is detached from stdio (real pueued inherits stdout/stderr);
- the socket and the config file (``pueue.yml``, written on the first start and
  never read) live in the data directory;
- tasks start and finish promptly: no 200/300 ms task-handler loop, unless
  ``task-loop MS`` asks for it (benchmarks of the time between tasks do);
- v3 ``group add``/``group remove`` take effect 0.2 s after the answer, like the
  real asynchronous v3 handler (an immediate ``add -g`` can fail);
- ``add --follow`` is accepted (v4) but does not follow; the subcommands
  ``edit``, ``env``, ``wait``, ``stash``, ``enqueue``, ``restart``, ``switch``,
  ``send``, ``reset`` and ``follow`` are not implemented (clap-style error, exit 2);
- the plain-text ``status`` and ``log`` outputs are simple tables, not pueue's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    from sandbox.pueue_client import socket_path, unix_address
except ImportError:  # run as a script from its own folder, outside the installed sandbox
    from pueue_client import socket_path, unix_address

VERSIONS = {"v3": "3.4.1", "v4": "4.0.4"}
FORMATS = tuple(VERSIONS)
DEFAULT_FORMAT = "v4"
DEFAULT_GROUP = "default"
LOG_DEFAULT_LINES = 15
TICK_SECONDS = 1.0
V3_GROUP_DELAY_S = 0.2
READY_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 60.0
LOST_ADD_HANG_S = 60.0
FOREIGN_LABEL = "other_user_job"
FOREIGN_SECONDS = 10.0
ACTIVE = ("Running", "Paused")
ENQUEUE_OFFSET_NS = 21_337  # real pueue takes two clock readings when a task is added
STANDIN_ENV = "PUEUE_STANDIN_DIR"
BACKTRACE_NOTE = (
    "Backtrace omitted. Run with RUST_BACKTRACE=1 environment variable to display it.\n"
    "Run with RUST_BACKTRACE=full to include source snippets.\n"
)
SIGNALS = {
    "sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT,
    "sigcont": signal.SIGCONT, "sigstop": signal.SIGSTOP,
}
_SIGNAL_ALIASES = {
    **{name: name for name in SIGNALS},
    **{name[3:]: name for name in SIGNALS},
    **{str(int(number)): name for name, number in SIGNALS.items()},
}
_RUST_ERROR_KINDS = {
    1: "PermissionDenied", 2: "NotFound", 7: "ArgumentListTooLong", 13: "PermissionDenied",
    20: "NotADirectory", 21: "IsADirectory", 26: "ExecutableFileBusy", 36: "InvalidFilename",
    40: "FilesystemLoop",
}


class StandinError(Exception):
    """The stand-in itself is misused (missing data dir, bad control command)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------
# Paths, settings and locking
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Paths:
    """Every file of one stand-in installation, all under its data directory."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def state_partial(self) -> Path:
        return self.root / "state.json.partial"

    @property
    def lock(self) -> Path:
        return self.root / "standin.lock"

    @property
    def settings(self) -> Path:
        return self.root / "standin.json"

    @property
    def config(self) -> Path:
        return self.root / "pueue.yml"

    @property
    def pid(self) -> Path:
        return self.root / "pueue.pid"

    @property
    def socket(self) -> Path:
        return Path(socket_path(str(self.root)))

    @property
    def task_logs(self) -> Path:
        return self.root / "task_logs"

    @property
    def daemon_log(self) -> Path:
        return self.root / "daemon.log"

    def task_log(self, task_id: int) -> Path:
        return self.task_logs / f"{task_id}.log"


def paths_from_env(environ: dict[str, str] | None = None) -> Paths:
    """Return the Paths named by ``PUEUE_STANDIN_DIR``; raise StandinError if it is unset."""
    value = (environ if environ is not None else os.environ).get(STANDIN_ENV, "")
    if not value:
        raise StandinError(f"{STANDIN_ENV} is not set: it must name the pueue stand-in's data directory")
    return Paths(Path(value).absolute())


@dataclasses.dataclass(frozen=True)
class Settings:
    """Stand-in controls, kept in ``standin.json`` (never part of real pueue)."""

    format: str = DEFAULT_FORMAT
    garbage: int = 0
    version_string: str | None = None
    lose_add: int = 0
    lose_add_late: float = 0.0
    lose_add_hang: float = LOST_ADD_HANG_S
    lose_add_label: str = ""
    task_loop_ms: int = 0


def load_settings(paths: Paths) -> Settings:
    """Read the controls; a missing or broken file means the defaults."""
    try:
        data = json.loads(paths.settings.read_text())
        return Settings(**{key: data[key] for key in data if key in Settings.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return Settings()


def _write_atomically(target: Path, text: str) -> None:
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text)
    os.rename(partial, target)


@contextlib.contextmanager
def file_lock(paths: Paths) -> Iterator[None]:
    """Hold the installation-wide flock (state and settings writers take it)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_settings(paths: Paths, **changes: Any) -> Settings:
    """Change some controls under the lock and return the new settings."""
    with file_lock(paths):
        settings = dataclasses.replace(load_settings(paths), **changes)
        _write_atomically(paths.settings, json.dumps(dataclasses.asdict(settings)))
    return settings


def take_garbage(paths: Paths) -> int:
    """Consume one pending garbage answer; return how many were pending (0: none)."""
    with file_lock(paths):
        settings = load_settings(paths)
        if settings.garbage <= 0:
            return 0
        remaining = dataclasses.replace(settings, garbage=settings.garbage - 1)
        _write_atomically(paths.settings, json.dumps(dataclasses.asdict(remaining)))
    return settings.garbage


@dataclasses.dataclass(frozen=True)
class LostAdd:
    """How one ``pueue add`` loses its answer (``lose-add``): stored ``late`` s after receipt."""

    late: float
    hang: float


def _lost_add_applies(settings: Settings, label: str | None) -> bool:
    return settings.lose_add > 0 and (label or "").startswith(settings.lose_add_label)


def lost_add_pending(paths: Paths, label: str | None) -> bool:
    """True when a ``lose-add`` waits for an add labelled ``label`` (nothing is consumed)."""
    return _lost_add_applies(load_settings(paths), label)


def take_lost_add(paths: Paths, label: str | None) -> LostAdd | None:
    """Consume one pending ``lose-add`` for an add labelled ``label``; None when none applies."""
    with file_lock(paths):
        settings = load_settings(paths)
        if not _lost_add_applies(settings, label):
            return None
        remaining = dataclasses.replace(settings, lose_add=settings.lose_add - 1)
        _write_atomically(paths.settings, json.dumps(dataclasses.asdict(remaining)))
    return LostAdd(late=settings.lose_add_late, hang=settings.lose_add_hang)


# ---------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------

def rfc3339(ns: int | None) -> str | None:
    """chrono's RFC 3339 form of a local time: 9 fraction digits, ``Z`` at zero offset."""
    if ns is None:
        return None
    seconds, fraction = divmod(ns, 1_000_000_000)
    local = datetime.fromtimestamp(seconds).astimezone()
    return f"{local:%Y-%m-%dT%H:%M:%S}.{fraction:09d}{_offset_text(local.utcoffset())}"


def _offset_text(offset: timedelta | None) -> str:
    if not offset:
        return "Z"
    total = int(offset.total_seconds())
    sign = "+" if total >= 0 else "-"
    total = abs(total)
    return f"{sign}{total // 3600:02d}:{total % 3600 // 60:02d}"


# ---------------------------------------------------------------------------
# Tasks and their JSON shapes
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """One task as the daemon keeps it; rendered into the v3 or v4 shape on demand.

    ``status`` is one of Queued, Running, Paused, Stashed, Locked, Done; ``result``
    (Done only) is already in serde's shape: "Success", {"Failed": 1}, ...
    """

    id: int
    created_ns: int
    enqueued_ns: int | None
    original_command: str
    command: str
    path: str
    envs: dict[str, str]
    group: str
    dependencies: list[int]
    priority: int
    label: str | None
    status: str
    enqueue_at_ns: int | None = None
    result: Any = None
    start_ns: int | None = None
    end_ns: int | None = None
    prev_status: str = "Locked"
    pid: int | None = None
    worker_id: int | None = None
    v3_end_null: bool = False

    def finish(self, result: Any, now: int) -> None:
        """Turn the task Done with ``result``."""
        self.status, self.result, self.end_ns = "Done", result, now
        self.pid = self.worker_id = None

    @property
    def succeeded(self) -> bool:
        return self.status == "Done" and self.result == "Success"


def render_task(task: Task, fmt: str, *, with_envs: bool = True) -> dict[str, Any]:
    """The task as ``status --json`` (``with_envs``) or ``log --json`` prints it."""
    envs = dict(task.envs) if with_envs else {}
    return _render_v3(task, envs) if fmt == "v3" else _render_v4(task, envs)


def _render_v3(task: Task, envs: dict[str, str]) -> dict[str, Any]:
    return {
        "id": task.id,
        "created_at": rfc3339(task.created_ns),
        "enqueued_at": rfc3339(task.enqueued_ns),
        **_common_fields(task, envs),
        "status": _status_v3(task),
        "prev_status": task.prev_status,
        "start": rfc3339(task.start_ns),
        "end": None if task.v3_end_null else rfc3339(task.end_ns),
    }


def _common_fields(task: Task, envs: dict[str, str]) -> dict[str, Any]:
    return {
        "original_command": task.original_command,
        "command": task.command,
        "path": task.path,
        "envs": envs,
        "group": task.group,
        "dependencies": list(task.dependencies),
        "priority": task.priority,
        "label": task.label,
    }


def _status_v3(task: Task) -> Any:
    if task.status == "Stashed":
        return {"Stashed": {"enqueue_at": rfc3339(task.enqueue_at_ns)}}
    if task.status == "Done":
        return {"Done": task.result}
    return task.status


def _render_v4(task: Task, envs: dict[str, str]) -> dict[str, Any]:
    created, enqueued = _v4_times(task)
    return {"id": task.id, "created_at": created, **_common_fields(task, envs),
            "status": _status_v4(task, enqueued)}


def _v4_times(task: Task) -> tuple[str | None, str | None]:
    """v4 reads the clock for ``enqueued_at`` just before ``created_at`` (the reverse of v3)."""
    enqueued = task.enqueued_ns
    if enqueued is not None and 0 <= enqueued - task.created_ns < 1_000_000:
        return rfc3339(enqueued), rfc3339(task.created_ns)
    return rfc3339(task.created_ns), rfc3339(enqueued if enqueued is not None else task.created_ns)


def _status_v4(task: Task, enqueued: str | None) -> Any:
    start = rfc3339(task.start_ns if task.start_ns is not None else task.created_ns)
    if task.status == "Queued":
        return {"Queued": {"enqueued_at": enqueued}}
    if task.status in ACTIVE:
        return {task.status: {"enqueued_at": enqueued, "start": start}}
    if task.status == "Done":
        end = rfc3339(task.end_ns if task.end_ns is not None else task.start_ns)
        return {"Done": {"enqueued_at": enqueued, "start": start, "end": end, "result": task.result}}
    if task.status == "Stashed":
        return {"Stashed": {"enqueue_at": rfc3339(task.enqueue_at_ns)}}
    return {"Locked": {"previous_status": {"Queued": {"enqueued_at": enqueued}}}}


def json_line(value: Any) -> str:
    """serde_json's compact form plus the newline ``println!`` adds."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"


def result_from_returncode(returncode: int) -> Any:
    """Exit 0 is Success, N is Failed(N), death by a signal (no exit code) is Killed."""
    if returncode == 0:
        return "Success"
    if returncode > 0:
        return {"Failed": returncode}
    return "Killed"


def spawn_error_message(task_id: int, error: BaseException) -> str:
    """Rust's Debug form of the io::Error that ``Command::spawn`` returned."""
    code = getattr(error, "errno", None) or 0
    kind = _RUST_ERROR_KINDS.get(code, "Uncategorized")
    text = os.strerror(code) if code else str(error)
    return f'Failed to spawn child {task_id} with err: Os {{ code: {code}, kind: {kind}, message: "{text}" }}'


def result_word(task: Task) -> str:
    """Short status text for the plain (non-JSON) outputs."""
    if task.status != "Done":
        return task.status
    result = task.result
    if isinstance(result, dict):
        name, value = next(iter(result.items()))
        return f"Failed ({value})" if name == "Failed" else "Failed to spawn"
    return {"DependencyFailed": "Dependency failed"}.get(result, result)


def last_lines(text: str, count: int) -> str:
    """The last ``count`` lines joined by ``\\n``, without a trailing newline (rev_lines)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines[-count:]) if count > 0 else ""


# ---------------------------------------------------------------------------
# State persistence and restore_state
# ---------------------------------------------------------------------------

def fresh_groups() -> dict[str, dict[str, Any]]:
    return {DEFAULT_GROUP: {"status": "Running", "parallel_tasks": 1}}


def read_state(paths: Paths) -> tuple[dict[int, Task], dict[str, dict[str, Any]]]:
    """Load tasks and groups; a missing file means an empty state with the default group."""
    try:
        data = json.loads(paths.state.read_text())
    except FileNotFoundError:
        return {}, fresh_groups()
    tasks = {int(key): Task(**value) for key, value in data["tasks"].items()}
    return tasks, data["groups"]


def write_state(paths: Paths, tasks: dict[int, Task], groups: dict[str, dict[str, Any]]) -> None:
    """Write ``state.json.partial`` then rename it, under the installation lock."""
    data = {"tasks": {str(key): dataclasses.asdict(tasks[key]) for key in sorted(tasks)},
            "groups": {name: groups[name] for name in sorted(groups)}}
    text = json.dumps(data)
    with file_lock(paths):
        paths.state_partial.write_text(text)
        os.rename(paths.state_partial, paths.state)


def restore_state(tasks: dict[int, Task], groups: dict[str, dict[str, Any]], now: int) -> None:
    """What real pueued does on start: the previous daemon's tasks are gone."""
    for task in tasks.values():
        if task.status in ACTIVE:
            task.finish("Killed", now)
            task.v3_end_null = True  # v3 leaves `end` null here; v4 sets it to now
        if task.status == "Locked":
            task.status, task.enqueue_at_ns = "Stashed", None
        if task.status == "Queued":
            groups.setdefault(task.group, {"status": "Running", "parallel_tasks": 1})["status"] = "Paused"


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reply:
    """What the client prints: stdout, stderr and its exit code."""

    stdout: str = ""
    stderr: str = ""
    exit: int = 0


def success(text: str) -> Reply:
    return Reply(stdout=text + "\n")


def failure(text: str, fmt: str) -> Reply:
    """A daemon Failure message: stdout in v3, stderr in v4, exit 1."""
    if fmt == "v3":
        return Reply(stdout=text + "\n", exit=1)
    return Reply(stderr=text + "\n", exit=1)


def task_response(message: str, matching: list[int], mismatching: list[int], fmt: str) -> Reply:
    """pueue's ``compile_task_response``: partial success is success."""
    ok_part = f"{message}: {', '.join(map(str, matching))}"
    bad_part = f"The command failed for tasks: {', '.join(map(str, mismatching))}"
    if not mismatching:
        return success(ok_part)
    if not matching:
        return failure(bad_part, fmt)
    return success(f"{ok_part}\n{bad_part}")


def client_error_text(fmt: str, chain: list[str], location: str) -> str:
    """A client-side error: v3 prints an anyhow chain, v4 a color-eyre report."""
    if fmt == "v3":
        text = f"Error: {chain[0]}\n"
        if len(chain) > 1:
            text += "\nCaused by:\n" + "".join(_numbered(i, cause, "    ") for i, cause in enumerate(chain[1:]))
        return text
    body = "".join(_numbered(i, cause, "   ") for i, cause in enumerate(chain))
    return f"Error: \n{body}\nLocation:\n   {location}\n\n{BACKTRACE_NOTE}"


def _numbered(index: int, text: str, indent: str) -> str:
    prefix = f"{indent}{index}: "
    first, *rest = text.split("\n")
    return prefix + first + "\n" + "".join(" " * len(prefix) + line + "\n" for line in rest)


def os_error_text(error: OSError) -> str:
    """Rust's Display of an io::Error: ``No such file or directory (os error 2)``."""
    code = error.errno or 0
    return f"{os.strerror(code)} (os error {code})" if code else str(error)


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------

class Daemon:
    """Owns the state, answers client requests over a unix socket, runs the tasks.

    One RLock guards the state; request threads and child-waiter threads take it.
    The main thread only accepts connections, waking once a second at most when
    idle (for delayed tasks), so an idle daemon burns no CPU.
    """

    def __init__(self, paths: Paths):
        self.paths = paths
        self.lock = threading.RLock()
        self.tasks: dict[int, Task] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.procs: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.listener: socket.socket | None = None
        self._wake_read, self._wake_write = os.pipe()
        self.loop_seconds = 0.0  # task-loop: 0 starts and finishes tasks at once
        self._next_pass = 0.0    # monotonic time of the next task-handler pass (task-loop only)
        self._exited: dict[int, tuple[int, int]] = {}  # task-loop: {task id: (pid, returncode)} not yet noticed

    # -- lifecycle --------------------------------------------------------

    def load_and_restore(self) -> None:
        """Read the state file and apply ``restore_state``; save the result."""
        tasks, groups = read_state(self.paths)
        restore_state(tasks, groups, time.time_ns())
        with self.lock:
            self.tasks, self.groups = tasks, groups
            self._persist()

    def bind(self) -> None:
        """Listen on the socket (the cwd is the data dir: short relative address)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.socket.name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.paths.socket.name)
        listener.listen(128)
        self.listener = listener

    def serve(self) -> None:
        """Accept clients until asked to stop; run the safety tick when idle."""
        assert self.listener is not None
        self.listener.setblocking(False)
        while not self.stopping:
            self.loop_seconds = load_settings(self.paths).task_loop_ms / 1000
            readable, _, _ = select.select([self.listener, self._wake_read], [], [], self._seconds_to_next_tick())
            if self._pass_due():
                self.handler_pass()
            elif not readable:
                self.tick()
            if self._wake_read in readable:
                os.read(self._wake_read, 512)
            if self.listener in readable and not self.stopping:
                self._accept_one()

    def _accept_one(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def request_stop(self) -> None:
        """Make ``serve`` return (safe from a signal handler or another thread)."""
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    def shutdown(self) -> None:
        """Graceful exit: kill every task's process group, save, remove the socket."""
        with self.lock:
            self.stopping = True
            for task in self.tasks.values():
                if task.status in ACTIVE and task.pid:
                    _signal_group(task.pid, signal.SIGKILL)
            self._persist()
        if self.listener is not None:
            self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.socket)

    def tick(self) -> None:
        with self.lock:
            # Exits left from a task-loop that was turned off are noticed here.
            if not self.stopping and (self._notice_exits(time.time_ns()) | self._schedule()):
                self._persist()

    def _pass_due(self) -> bool:
        return self.loop_seconds > 0 and time.monotonic() >= self._next_pass

    def handler_pass(self) -> None:
        """One pass of real pueue's task handler (task-loop): notice exits, then start what fits."""
        self._next_pass = time.monotonic() + self.loop_seconds
        with self.lock:
            if self.stopping:
                return
            noticed = self._notice_exits(time.time_ns())
            if self._schedule() or noticed:
                self._persist()

    def _notice_exits(self, now: int) -> bool:
        exited, self._exited = self._exited, {}
        for task_id, (pid, returncode) in exited.items():
            task = self.tasks.get(task_id)
            if task is not None and task.status in ACTIVE and task.pid == pid:
                task.finish(result_from_returncode(returncode), now)
        return bool(exited)

    def _seconds_to_next_tick(self) -> float:
        if self.loop_seconds > 0:
            return max(0.0, self._next_pass - time.monotonic())
        with self.lock:
            due = [t.enqueue_at_ns for t in self.tasks.values() if t.status == "Stashed" and t.enqueue_at_ns]
        if not due:
            return TICK_SECONDS
        return min(TICK_SECONDS, max(0.01, (min(due) - time.time_ns()) / 1e9))

    def _persist(self) -> None:
        write_state(self.paths, self.tasks, self.groups)

    # -- requests ---------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                data = _receive_all(conn)
                if not data:  # a readiness probe, or a client that failed before asking
                    return
                request = json.loads(data)
                time.sleep(request.get("late_seconds") or 0)  # lose-add --late: the store comes late
                if request.get("cmd") == "client":  # a quick client's words: read them as its request
                    request, answer = self._answer_client(request)
                else:
                    answer = self.handle(request)
                conn.sendall(json.dumps(answer if isinstance(answer, dict) else dataclasses.asdict(answer)).encode())
            except (OSError, ValueError) as err:
                _log(self.paths, f"request failed: {err!r}")
                return
        if request.get("cmd") == "shutdown":
            self.request_stop()

    def _answer_client(self, words: dict[str, Any]) -> tuple[dict[str, Any], Reply | dict[str, bool]]:
        """A quick client's words (``pueue_client``): (the request they made, the Reply it prints
        or ``{"delegate": True}``)."""
        request = client_request(self.paths, words["argv"], words.get("cwd"), words.get("env") or {})
        if request is None:
            return words, {"delegate": True}
        if isinstance(request, Reply):
            return words, request
        return request, with_garbage(self.paths, request, self.handle(request))

    def handle(self, request: dict[str, Any]) -> Reply:
        """Run one client request under the state lock and return what to print."""
        fmt = load_settings(self.paths).format
        handler = getattr(self, f"_cmd_{request['cmd']}")
        with self.lock:
            reply = handler(request, fmt)
            # With task-loop, only the handler's pass starts tasks (real pueue's message handlers never do).
            changed = self._schedule() if not self.stopping and not self.loop_seconds else False
            if (changed or _mutates(request)) and not self.stopping:
                self._persist()
        return reply

    def _unknown_group(self, name: str, fmt: str) -> Reply:
        names = ", ".join(json.dumps(group, ensure_ascii=False) for group in sorted(self.groups))
        return failure(f"Group {name} doesn't exists. Use one of these: [{names}]", fmt)

    def _cmd_add(self, req: dict[str, Any], fmt: str) -> Reply:
        group = req["group"] or DEFAULT_GROUP
        if group not in self.groups:
            return self._unknown_group(group, fmt)
        missing = [dep for dep in req["after"] if dep not in self.tasks]
        if missing:
            return failure(f"Unable to setup dependencies : task(s) [{', '.join(map(str, missing))}] not found", fmt)
        task = self._new_task(req, group)
        self.tasks[task.id] = task
        if req["immediate"]:
            self._spawn(task)
        return self._added_reply(task, req, fmt)

    def _new_task(self, req: dict[str, Any], group: str) -> Task:
        now = time.time_ns()
        delayed = req["delay"] is not None
        stashed = req["stashed"] or delayed
        return Task(
            id=max(self.tasks, default=-1) + 1, created_ns=now,
            enqueued_ns=None if stashed else now + ENQUEUE_OFFSET_NS,
            original_command=req["command"], command=req["command"], path=req["path"],
            envs=req["envs"], group=group, dependencies=list(req["after"]),
            priority=req["priority"] or 0, label=req["label"],
            status="Stashed" if stashed else "Queued",
            enqueue_at_ns=now + int(req["delay"] * 1e9) if delayed else None,
        )

    def _added_reply(self, task: Task, req: dict[str, Any], fmt: str) -> Reply:
        if req["print_task_id"]:
            return success(str(task.id))
        text = f"New task added (id {task.id})."
        if task.enqueue_at_ns is not None:
            text += f" It will be enqueued at {_enqueue_at_text(task.enqueue_at_ns, fmt)}"
        if self.groups[task.group]["status"] == "Paused":
            text += "\nThe group of this task is currently paused!"
        return success(text)

    def _cmd_status(self, req: dict[str, Any], fmt: str) -> Reply:
        group = req["group"]
        tasks = [self.tasks[key] for key in sorted(self.tasks)]
        if group is not None:
            tasks = [task for task in tasks if task.group == group]
        tasks = apply_query(tasks, req["query"])
        if req["json"]:
            rendered = {str(task.id): render_task(task, fmt) for task in tasks}
            return Reply(stdout=json_line({"tasks": rendered, "groups": self._groups_json()}))
        if group is not None and group not in self.groups:
            return Reply(stdout="\n", stderr=f'There exists no group "{group}"\n')
        return Reply(stdout=status_table(tasks, self.groups))

    def _groups_json(self) -> dict[str, Any]:
        return {name: {"status": self.groups[name]["status"], "parallel_tasks": self.groups[name]["parallel_tasks"]}
                for name in sorted(self.groups)}

    def _cmd_log(self, req: dict[str, Any], fmt: str) -> Reply:
        if fmt == "v4" and req["group"] is not None and req["group"] not in self.groups:
            return self._unknown_group(req["group"], fmt)
        tasks = self._log_selection(req, fmt)
        if not req["json"]:
            return Reply(stdout="".join(self._log_text(task, req) for task in tasks))
        entries = {str(task.id): {"task": render_task(task, fmt, with_envs=False),
                                  "output": self._log_output(task.id, req)} for task in tasks}
        return Reply(stdout=json_line(entries))

    def _log_selection(self, req: dict[str, Any], fmt: str) -> list[Task]:
        if req["ids"]:
            return [self.tasks[key] for key in sorted(set(req["ids"])) if key in self.tasks]
        tasks = [self.tasks[key] for key in sorted(self.tasks)]
        if fmt == "v3" or req["all"]:
            return tasks
        group = req["group"] or DEFAULT_GROUP
        return [task for task in tasks if task.group == group]

    def _log_output(self, task_id: int, req: dict[str, Any]) -> str:
        path = self.paths.task_log(task_id)
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError as err:
            return (f'(Pueue error) Failed to get log file handle: I/O error at path "{path}" '
                    f"while getting log file handle:\n{os_error_text(err)}")
        if req["full"]:
            return text
        return last_lines(text, req["lines"] if req["lines"] is not None else LOG_DEFAULT_LINES)

    def _log_text(self, task: Task, req: dict[str, Any]) -> str:
        moments = (("Start", task.start_ns), ("End", task.end_ns))
        times = "".join(f"{name}: {rfc3339(ns)}\n" for name, ns in moments if ns)
        output = self._log_output(task.id, req)
        if output and not output.endswith("\n"):
            output += "\n"
        return (f"--- Task {task.id}: {result_word(task)} ---\n\nCommand: {task.command}\nPath: {task.path}\n"
                f"{times}\noutput:\n{output}\n")

    def _cmd_kill(self, req: dict[str, Any], fmt: str) -> Reply:
        signal_name = req["signal"]
        signum = SIGNALS[signal_name] if signal_name else signal.SIGKILL
        if req["ids"]:
            matching, mismatching = self._split_ids(req["ids"], ACTIVE)
            for task_id in matching:
                _signal_group(self.tasks[task_id].pid, signum)
            return task_response("Tasks are being killed", matching, mismatching, fmt)
        if req["all"]:
            self._kill_groups(list(self.groups), signum, pause=signal_name is None)
            if signal_name:
                return success(f"Sending signal {signal_name} to all running tasks.")
            return success("All tasks are being killed. All groups will be paused!!!")
        group = req["group"] or DEFAULT_GROUP
        if group not in self.groups:
            return self._unknown_group(group, fmt)
        self._kill_groups([group], signum, pause=signal_name is None)
        if signal_name:
            return success(f"Sending signal {signal_name} to all running tasks of group {group}.")
        return success(f'All tasks of group "{group}" are being killed. The group will also be paused!!!')

    def _kill_groups(self, groups: list[str], signum: int, *, pause: bool) -> None:
        for task in list(self.tasks.values()):
            if task.group in groups and task.status in ACTIVE:
                _signal_group(task.pid, signum)
        if pause:
            for group in groups:
                if any(t.group == group and _waits_to_run(t) for t in self.tasks.values()):
                    self.groups[group]["status"] = "Paused"

    def _split_ids(self, ids: list[int], statuses: tuple[str, ...]) -> tuple[list[int], list[int]]:
        matching, mismatching = [], []
        for task_id in ids:
            task = self.tasks.get(task_id)
            (matching if task is not None and task.status in statuses else mismatching).append(task_id)
        return matching, mismatching

    def _cmd_pause(self, req: dict[str, Any], fmt: str) -> Reply:
        if req["ids"]:
            matching, mismatching = self._split_ids(req["ids"], ("Running",))
            for task_id in matching:
                self._pause_task(self.tasks[task_id])
            return task_response("Tasks are being paused", matching, mismatching, fmt)
        groups = list(self.groups) if req["all"] else [req["group"] or DEFAULT_GROUP]
        if not req["all"] and groups[0] not in self.groups:
            return self._unknown_group(groups[0], fmt)
        for group in groups:
            self.groups[group]["status"] = "Paused"
        if not req["wait"]:
            for task in list(self.tasks.values()):
                if task.group in groups and task.status == "Running":
                    self._pause_task(task)
        return success("All queues are being paused." if req["all"] else f'Group "{groups[0]}" is being paused.')

    def _pause_task(self, task: Task) -> None:
        _signal_group(task.pid, signal.SIGSTOP)
        task.status = "Paused"

    def _resume_task(self, task: Task) -> None:
        _signal_group(task.pid, signal.SIGCONT)
        task.status = "Running"

    def _cmd_start(self, req: dict[str, Any], fmt: str) -> Reply:
        if req["ids"]:
            return self._start_ids(req["ids"], fmt)
        groups = list(self.groups) if req["all"] else [req["group"] or DEFAULT_GROUP]
        if not req["all"] and groups[0] not in self.groups:
            return self._unknown_group(groups[0], fmt)
        for group in groups:
            self.groups[group]["status"] = "Running"
        for task in list(self.tasks.values()):
            if task.group in groups and task.status == "Paused":
                self._resume_task(task)
        return success("All queues are being resumed." if req["all"] else f'Group "{groups[0]}" is being resumed.')

    def _start_ids(self, ids: list[int], fmt: str) -> Reply:
        matching, mismatching = self._split_ids(ids, ("Paused", "Queued", "Stashed"))
        for task_id in matching:
            task = self.tasks[task_id]
            if task.status == "Paused":
                self._resume_task(task)
            else:
                self._spawn(task)
        message = "Tasks are being started" if fmt == "v3" else "Tasks have been started/resumed"
        return task_response(message, matching, mismatching, fmt)

    def _cmd_group(self, req: dict[str, Any], fmt: str) -> Reply:
        action, name = req["action"], req["name"]
        if action == "add":
            return self._group_add(name, req["parallel"], fmt)
        if action == "remove":
            return self._group_remove(name, fmt)
        if req["json"]:
            return Reply(stdout=json_line(self._groups_json()))
        return success("\n".join(
            f'Group "{n}" ({g["parallel_tasks"]} parallel): {g["status"].lower()}'
            for n, g in sorted(self.groups.items())))

    def _group_add(self, name: str, parallel: int | None, fmt: str) -> Reply:
        if name in self.groups:
            return failure(f'Group "{name}" already exists', fmt)
        group = {"status": "Running", "parallel_tasks": 1 if parallel is None else parallel}
        if fmt == "v3":
            self._later(lambda: self.groups.setdefault(name, group))
            return success(f'Group "{name}" is being created')
        self.groups[name] = group
        return success(f'New group "{name}" has been created')

    def _group_remove(self, name: str, fmt: str) -> Reply:
        if name not in self.groups:
            return self._unknown_group(name, fmt)
        if name == DEFAULT_GROUP:
            return failure("You cannot delete the default group", fmt)
        if any(task.group == name for task in self.tasks.values()):
            return failure("You cannot remove a group, if there're still tasks in it.", fmt)
        if fmt == "v3":
            self._later(lambda: self.groups.pop(name, None))
            return success(f'Group "{name}" is being removed')
        del self.groups[name]
        return success(f'Group "{name}" has been removed')

    def _later(self, change: Callable[[], Any]) -> None:
        """Apply ``change`` to the state after V3_GROUP_DELAY_S, like v3's async group handler."""
        def apply() -> None:
            with self.lock:
                if not self.stopping:
                    change()
                    self._persist()
        timer = threading.Timer(V3_GROUP_DELAY_S, apply)
        timer.daemon = True
        timer.start()

    def _cmd_parallel(self, req: dict[str, Any], fmt: str) -> Reply:
        group = req["group"] or DEFAULT_GROUP
        if group not in self.groups:
            return self._unknown_group(group, fmt)
        self.groups[group]["parallel_tasks"] = req["parallel"]
        return success(f'Parallel tasks setting for group "{group}" adjusted')

    def _cmd_clean(self, req: dict[str, Any], fmt: str) -> Reply:
        group, successful_only = req["group"], req["successful_only"]
        needed = {dep for t in self.tasks.values() if t.status != "Done" for dep in t.dependencies}
        for task in list(self.tasks.values()):
            if task.status != "Done" or task.id in needed:
                continue
            if (group is not None and task.group != group) or (successful_only and not task.succeeded):
                continue
            self._forget(task.id)
        what = "successfully finished" if successful_only else "finished"
        suffix = f" from group '{group}'" if group is not None else ""
        return success(f"All {what} tasks have been removed{suffix}")

    def _cmd_remove(self, req: dict[str, Any], fmt: str) -> Reply:
        matching, mismatching = self._split_ids(req["ids"], ("Queued", "Stashed", "Done", "Locked"))
        for task_id in list(matching):
            if any(task_id in t.dependencies and t.id not in matching for t in self.tasks.values()):
                matching.remove(task_id)
                mismatching.append(task_id)
        for task_id in matching:
            self._forget(task_id)
        return task_response("Tasks removed from list", matching, mismatching, fmt)

    def _forget(self, task_id: int) -> None:
        del self.tasks[task_id]
        with contextlib.suppress(FileNotFoundError):
            self.paths.task_log(task_id).unlink()

    def _cmd_shutdown(self, req: dict[str, Any], fmt: str) -> Reply:
        return success("Daemon is shutting down")

    # -- scheduling and processes ----------------------------------------

    def _schedule(self) -> bool:
        """Enqueue due delayed tasks, fail broken dependencies, start what fits."""
        now = time.time_ns()
        changed = self._enqueue_due(now) | self._fail_broken_dependencies(now)
        for task in self._startable_tasks():
            if self._has_free_slot(task.group):
                self._spawn(task)
                changed = True
        return changed

    def _enqueue_due(self, now: int) -> bool:
        due = [t for t in self.tasks.values() if t.status == "Stashed" and t.enqueue_at_ns and t.enqueue_at_ns <= now]
        for task in due:
            task.status, task.enqueue_at_ns, task.enqueued_ns = "Queued", None, now
        return bool(due)

    def _fail_broken_dependencies(self, now: int) -> bool:
        broken = [t for t in self.tasks.values() if t.status == "Queued" and any(
            dep in self.tasks and self.tasks[dep].status == "Done" and not self.tasks[dep].succeeded
            for dep in t.dependencies)]
        for task in broken:
            task.start_ns = now
            task.finish("DependencyFailed", now + 444)
        return bool(broken)

    def _startable_tasks(self) -> list[Task]:
        ready = [t for t in self.tasks.values() if t.status == "Queued"
                 and self.groups.get(t.group, {}).get("status") == "Running"
                 and all(dep not in self.tasks or self.tasks[dep].succeeded for dep in t.dependencies)]
        return sorted(ready, key=lambda t: (-t.priority, t.id))

    def _has_free_slot(self, group: str) -> bool:
        limit = self.groups[group]["parallel_tasks"]
        active = sum(1 for t in self.tasks.values() if t.group == group and t.status in ACTIVE)
        return limit == 0 or active < limit

    def _next_worker_id(self, group: str) -> int:
        used = {t.worker_id for t in self.tasks.values() if t.group == group and t.status in ACTIVE}
        return next(slot for slot in range(len(used) + 1) if slot not in used)

    def _spawn(self, task: Task) -> None:
        """Start ``sh -c <command>`` in its own process group, output to its log file."""
        worker = self._next_worker_id(task.group)
        env = {**task.envs, "PUEUE_GROUP": task.group, "PUEUE_WORKER_ID": str(worker)}
        self.paths.task_logs.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.paths.task_log(task.id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        now = time.time_ns()
        if task.enqueued_ns is None:
            task.enqueued_ns = now
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", task.command], cwd=task.path, env=env, stdin=subprocess.PIPE,
                                    stdout=log_fd, stderr=log_fd, start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            self._record_spawn_failure(task, err, log_fd, now)
            return
        finally:
            os.close(log_fd)
        task.status, task.start_ns, task.envs = "Running", now, env
        task.pid, task.worker_id = proc.pid, worker
        self.procs[task.id] = proc
        threading.Thread(target=self._await_exit, args=(task.id, proc), daemon=True).start()

    def _record_spawn_failure(self, task: Task, error: BaseException, log_fd: int, now: int) -> None:
        message = spawn_error_message(task.id, error)
        with contextlib.suppress(OSError):
            os.write(log_fd, f"Pueue error, failed to spawn task. Check your command.\n{message}".encode())
        task.start_ns = now
        task.finish({"FailedToSpawn": message}, now + 5_466)

    def _await_exit(self, task_id: int, proc: subprocess.Popen) -> None:
        returncode = proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        with self.lock:
            if self.stopping:
                return
            self.procs.pop(task_id, None)
            if self.loop_seconds:
                self._exited[task_id] = (proc.pid, returncode)  # the next handler pass notices it
                return
            task = self.tasks.get(task_id)
            if task is not None and task.status in ACTIVE and task.pid == proc.pid:
                task.finish(result_from_returncode(returncode), time.time_ns())
            self._schedule()
            self._persist()


def _mutates(request: dict[str, Any]) -> bool:
    """False for the read-only requests (their answer needs no state write)."""
    if request["cmd"] in ("status", "log"):
        return False
    return not (request["cmd"] == "group" and request["action"] is None)


def _waits_to_run(task: Task) -> bool:
    return task.status == "Queued" or (task.status == "Stashed" and task.enqueue_at_ns is not None)


def _signal_group(pid: int | None, signum: int) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _enqueue_at_text(ns: int, fmt: str) -> str:
    moment = datetime.fromtimestamp(ns / 1e9)
    if fmt == "v3":
        return f"{moment:%Y-%m-%d %H:%M:%S}"
    if moment.date() == datetime.now().date():
        return f"{moment:%H:%M:%S}"
    return f"{moment:%Y-%m-%d}\n{moment:%H:%M:%S}"


def _receive_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _log(paths: Paths, message: str) -> None:
    with contextlib.suppress(OSError), open(paths.daemon_log, "a") as handle:
        handle.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}\n")


# ---------------------------------------------------------------------------
# Status table and query filters
# ---------------------------------------------------------------------------

def status_table(tasks: list[Task], groups: dict[str, dict[str, Any]]) -> str:
    """A plain table per group (the real one is prettier; drivers use --json)."""
    if not tasks:
        return "Task list is empty. Add tasks with `pueue add -- [cmd]`\n"
    blocks = []
    for name in sorted({task.group for task in tasks}):
        group = groups.get(name, {"status": "Running", "parallel_tasks": 1})
        rows = [f"{t.id:<4} {result_word(t):<18} {t.label or '':<16} {t.command}  ({t.path})"
                for t in tasks if t.group == name]
        head = f'Group "{name}" ({group["parallel_tasks"]} parallel): {group["status"].lower()}'
        blocks.append("\n".join([head, f"{'Id':<4} {'Status':<18} {'Label':<16} Command", *rows]))
    return "\n\n".join(blocks) + "\n"


_STATUS_FILTERS: dict[str, Callable[[Task], bool]] = {
    "queued": lambda t: t.status == "Queued",
    "stashed": lambda t: t.status == "Stashed",
    "running": lambda t: t.status == "Running",
    "paused": lambda t: t.status == "Paused",
    "success": lambda t: t.succeeded,
    "failed": lambda t: t.status == "Done" and not t.succeeded,
}


class QueryError(ValueError):
    """The status query does not follow pueue's query syntax (as far as we support it)."""


def parse_query(words: list[str]) -> dict[str, Any]:
    """Parse ``status`` query words: status/label filters, first/last N; columns/order_by ignored."""
    query: dict[str, Any] = {"status": [], "label": None, "first": None, "last": None}
    rest = " ".join(words).strip()
    while rest:
        rest = _parse_query_part(rest, query)
    return query


def _parse_query_part(rest: str, query: dict[str, Any]) -> str:
    if match := re.match(r"label\s*(!=|%=|=)\s*(.*)$", rest, re.I | re.S):
        query["label"] = [match.group(1), match.group(2).strip()]
        return ""
    if match := re.match(r"status\s*(!=|=)\s*(\w+)\s*", rest, re.I):
        value = match.group(2).lower()
        if value not in _STATUS_FILTERS:
            raise QueryError(f"unknown status '{match.group(2)}'")
        query["status"].append([match.group(1), value])
    elif match := re.match(r"(first|last)\s+(\d+)\s*", rest, re.I):
        query[match.group(1).lower()] = int(match.group(2))
    elif not (match := re.match(r"(columns=\S*|order_by\s+\w+(\s+(asc|desc))?)\s*", rest, re.I)):
        raise QueryError(f"unexpected input at '{rest}'")
    return rest[match.end():]


def apply_query(tasks: list[Task], query: dict[str, Any]) -> list[Task]:
    """Apply parsed query filters and limits to tasks in id order."""
    for operator, value in query["status"]:
        keep = _STATUS_FILTERS[value]
        tasks = [t for t in tasks if keep(t) == (operator == "=")]
    if query["label"] is not None:
        tasks = [t for t in tasks if _label_matches(t.label, *query["label"])]
    if query["first"] is not None:
        tasks = tasks[:query["first"]]
    if query["last"] is not None:
        tasks = tasks[-query["last"]:] if query["last"] else []
    return tasks


def _label_matches(label: str | None, operator: str, value: str) -> bool:
    if operator == "%=":
        return label is not None and value in label
    return (label == value) == (operator == "=")


# ---------------------------------------------------------------------------
# Command-line parsing (a small clap look-alike)
# ---------------------------------------------------------------------------

class UsageError(Exception):
    """A clap usage error: ``error: ...`` on stderr, exit 2."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.text = f"error: {message}\n\nUsage: {usage}\n\nFor more information, try '--help'.\n"


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option: ``kind`` is flag, value (one) or values (one or more, greedy)."""

    dest: str
    short: str | None
    long: str
    kind: str = "flag"
    value_name: str = ""
    convert: Callable[[str], Any] = str

    @property
    def display(self) -> str:
        return f"--{self.long}" if self.kind == "flag" else f"--{self.long} <{self.value_name}>"


def _usize(text: str) -> int:
    if not text.isdigit():
        raise ValueError("invalid digit found in string")
    return int(text)


def _isize(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError("invalid digit found in string")
    return int(text)


def _signal_name(text: str) -> str:
    name = _SIGNAL_ALIASES.get(text.lower())
    if name is None:
        raise ValueError("Matching variant not found")
    return name


def _delay_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hour|hours)?", text.strip())
    if not match:
        raise ValueError("could not parse the delay (the stand-in takes seconds, or Ns/Nm/Nh)")
    factor = {"m": 60, "min": 60, "mins": 60, "h": 3600, "hour": 3600, "hours": 3600}.get(match.group(2) or "", 1)
    return float(match.group(1)) * factor


HELP = Opt("help", "h", "help")


@dataclasses.dataclass
class Parsed:
    values: dict[str, Any]
    positionals: list[str]
    order: list[str]


def parse_args(argv: list[str], opts: list[Opt], usage: str, *, trailing: bool = False) -> Parsed:
    """Parse options anywhere (or, with ``trailing``, only before the first positional)."""
    opts = [*opts, HELP]
    parsed = Parsed({o.dest: [] if o.kind == "values" else None for o in opts}, [], [])
    by_long = {o.long: o for o in opts}
    by_short = {o.short: o for o in opts if o.short}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if (trailing and parsed.positionals) or token == "-" or not token.startswith("-"):
            parsed.positionals.append(token)
        elif token == "--":
            parsed.positionals.extend(argv[index:])
            break
        elif token.startswith("--"):
            name, has_value, inline = token[2:].partition("=")
            index = _take(_known(by_long.get(name), token, usage), inline if has_value else None, argv, index,
                          parsed, usage)
        else:
            index = _take_short_cluster(token, by_short, argv, index, parsed, usage)
    if parsed.values["help"]:
        raise HelpRequested(usage)
    return parsed


class HelpRequested(Exception):
    """``-h/--help``: print the usage, exit 0."""


def _known(opt: Opt | None, token: str, usage: str) -> Opt:
    if opt is None:
        raise UsageError(f"unexpected argument '{token}' found", usage)
    return opt


def _take_short_cluster(token: str, by_short: dict[str, Opt], argv: list[str], index: int, parsed: Parsed,
                        usage: str) -> int:
    cluster = token[1:]
    while cluster:
        opt = _known(by_short.get(cluster[0]), f"-{cluster[0]}", usage)
        cluster = cluster[1:]
        if opt.kind == "flag":
            index = _take(opt, None, argv, index, parsed, usage)
            continue
        return _take(opt, cluster or None, argv, index, parsed, usage)
    return index


def _take(opt: Opt, inline: str | None, argv: list[str], index: int, parsed: Parsed, usage: str) -> int:
    parsed.order.append(opt.dest)
    if opt.kind == "flag":
        if inline is not None:
            raise UsageError(f"unexpected value '{inline}' for '--{opt.long}' found; no more were expected", usage)
        parsed.values[opt.dest] = True
        return index
    raw = [inline] if inline is not None else []
    if opt.kind == "value" and not raw and index < len(argv):
        raw, index = [argv[index]], index + 1
    while opt.kind == "values" and index < len(argv) and not argv[index].startswith("-"):
        raw.append(argv[index])
        index += 1
    if not raw:
        raise UsageError(f"a value is required for '{opt.display}' but none was supplied", usage)
    values = [_convert(opt, text, usage) for text in raw]
    parsed.values[opt.dest] = values if opt.kind == "values" else values[0]
    return index


def _convert(opt: Opt, text: str, usage: str) -> Any:
    try:
        return opt.convert(text)
    except ValueError as err:
        raise UsageError(f"invalid value '{text}' for '{opt.display}': {err}", usage) from None


def _ids(words: list[str], usage: str) -> list[int]:
    try:
        return [_usize(word) for word in words]
    except ValueError:
        bad = next(word for word in words if not word.isdigit())
        raise UsageError(f"invalid value '{bad}' for '[TASK_IDS]...': invalid digit found in string", usage) from None


def _conflict(parsed: Parsed, first: str, second: str, names: dict[str, str], usage: str) -> None:
    if parsed.values.get(first) and parsed.values.get(second):
        a, b = sorted((first, second), key=parsed.order.index)
        raise UsageError(f"the argument '{names[a]}' cannot be used with '{names[b]}'", usage)


ADD_OPTS = [
    Opt("working_directory", "w", "working-directory", "value", "WORKING_DIRECTORY"),
    Opt("escape", "e", "escape"), Opt("immediate", "i", "immediate"), Opt("stashed", "s", "stashed"),
    Opt("delay", "d", "delay", "value", "DELAY", _delay_seconds),
    Opt("group", "g", "group", "value", "GROUP"),
    Opt("after", "a", "after", "values", "AFTER", _usize),
    Opt("priority", "o", "priority", "value", "PRIORITY", _isize),
    Opt("label", "l", "label", "value", "LABEL"),
    Opt("print_task_id", "p", "print-task-id"),
]


def _parse_add(argv: list[str], fmt: str) -> dict[str, Any]:
    usage = "pueue add [OPTIONS] <COMMAND>..."
    opts = ADD_OPTS + ([Opt("follow", None, "follow")] if fmt == "v4" else [])
    parsed = parse_args(argv, opts, usage, trailing=True)
    names = {"stashed": "--stashed", "immediate": "--immediate", "delay": "--delay <DELAY>"}
    _conflict(parsed, "stashed", "immediate", names, "pueue add --stashed <COMMAND>...")
    _conflict(parsed, "delay", "immediate", names, "pueue add --delay <DELAY> <COMMAND>...")
    if not parsed.positionals:
        raise UsageError("the following required arguments were not provided:\n  <COMMAND>...", usage)
    words = [shlex.quote(word) for word in parsed.positionals] if parsed.values["escape"] else parsed.positionals
    values = parsed.values
    return {"cmd": "add", "command": " ".join(words), "working_directory": values["working_directory"],
            "stashed": bool(values["stashed"]), "immediate": bool(values["immediate"]), "delay": values["delay"],
            "group": values["group"], "after": values["after"], "priority": values["priority"],
            "label": values["label"], "print_task_id": bool(values["print_task_id"])}


def _parse_status(argv: list[str], fmt: str) -> dict[str, Any]:
    parsed = parse_args(argv, [Opt("json", "j", "json"), Opt("group", "g", "group", "value", "GROUP")],
                        "pueue status [OPTIONS] [QUERY]...")
    return {"cmd": "status", "json": bool(parsed.values["json"]), "group": parsed.values["group"],
            "query_words": parsed.positionals}


def _parse_log(argv: list[str], fmt: str) -> dict[str, Any]:
    usage = "pueue log [OPTIONS] [TASK_IDS]..."
    opts = [Opt("json", "j", "json"), Opt("lines", "l", "lines", "value", "LINES", _usize), Opt("full", "f", "full")]
    if fmt == "v4":
        opts += [Opt("group", "g", "group", "value", "GROUP"), Opt("all", "a", "all")]
    parsed = parse_args(argv, opts, usage)
    _conflict(parsed, "full", "lines", {"full": "--full", "lines": "--lines <LINES>"}, usage)
    values = parsed.values
    return {"cmd": "log", "ids": _ids(parsed.positionals, usage), "json": bool(values["json"]),
            "lines": values["lines"], "full": bool(values["full"]), "group": values.get("group"),
            "all": bool(values.get("all"))}


def _selection_opts(extra: list[Opt]) -> list[Opt]:
    return [Opt("group", "g", "group", "value", "GROUP"), Opt("all", "a", "all"), Opt("children", "c", "children"),
            *extra]


def _parse_selection(name: str, argv: list[str], extra: list[Opt]) -> dict[str, Any]:
    usage = f"pueue {name} [OPTIONS] [TASK_IDS]..."
    parsed = parse_args(argv, _selection_opts(extra), usage)
    ids = _ids(parsed.positionals, usage)
    names = {"group": "--group <GROUP>", "all": "--all", "ids": "[TASK_IDS]..."}
    parsed.values["ids"] = ids
    if ids:
        parsed.order.insert(0, "ids")
    _conflict(parsed, "group", "all", names, usage)
    _conflict(parsed, "ids", "group", names, usage)
    _conflict(parsed, "ids", "all", names, usage)
    return {"cmd": name, **{key: value for key, value in parsed.values.items() if key != "help"},
            "all": bool(parsed.values["all"])}


def _parse_kill(argv: list[str], fmt: str) -> dict[str, Any]:
    return _parse_selection("kill", argv, [Opt("signal", "s", "signal", "value", "SIGNAL", _signal_name)])


def _parse_start(argv: list[str], fmt: str) -> dict[str, Any]:
    return _parse_selection("start", argv, [])


def _parse_pause(argv: list[str], fmt: str) -> dict[str, Any]:
    request = _parse_selection("pause", argv, [Opt("wait", "w", "wait")])
    return {**request, "wait": bool(request["wait"])}


def _parse_group(argv: list[str], fmt: str) -> dict[str, Any]:
    if argv and argv[0] == "add":
        usage = "pueue group add [OPTIONS] <NAME>"
        parsed = parse_args(argv[1:], [Opt("parallel", "p", "parallel", "value", "PARALLEL", _usize)], usage)
        return {"cmd": "group", "action": "add", "name": _one_name(parsed, usage),
                "parallel": parsed.values["parallel"], "json": False}
    if argv and argv[0] == "remove":
        usage = "pueue group remove <NAME>"
        parsed = parse_args(argv[1:], [], usage)
        return {"cmd": "group", "action": "remove", "name": _one_name(parsed, usage), "parallel": None, "json": False}
    parsed = parse_args(argv, [Opt("json", "j", "json")], "pueue group [OPTIONS] [COMMAND]")
    if parsed.positionals:
        raise UsageError(f"unrecognized subcommand '{parsed.positionals[0]}'", "pueue group [OPTIONS] [COMMAND]")
    return {"cmd": "group", "action": None, "name": None, "parallel": None, "json": bool(parsed.values["json"])}


def _one_name(parsed: Parsed, usage: str) -> str:
    if not parsed.positionals:
        raise UsageError("the following required arguments were not provided:\n  <NAME>", usage)
    if len(parsed.positionals) > 1:
        raise UsageError(f"unexpected argument '{parsed.positionals[1]}' found", usage)
    return parsed.positionals[0]


def _parse_parallel(argv: list[str], fmt: str) -> dict[str, Any]:
    usage = "pueue parallel [OPTIONS] [PARALLEL_TASKS]"
    parsed = parse_args(argv, [Opt("group", "g", "group", "value", "GROUP")], usage)
    if len(parsed.positionals) != 1:
        raise UsageError("the stand-in needs exactly one <PARALLEL_TASKS> value", usage)
    try:
        value = _usize(parsed.positionals[0])
    except ValueError as err:
        raise UsageError(f"invalid value '{parsed.positionals[0]}' for '[PARALLEL_TASKS]': {err}", usage) from None
    return {"cmd": "parallel", "group": parsed.values["group"], "parallel": value}


def _parse_clean(argv: list[str], fmt: str) -> dict[str, Any]:
    parsed = parse_args(argv, [Opt("successful_only", "s", "successful-only"),
                               Opt("group", "g", "group", "value", "GROUP")], "pueue clean [OPTIONS]")
    if parsed.positionals:
        raise UsageError(f"unexpected argument '{parsed.positionals[0]}' found", "pueue clean [OPTIONS]")
    return {"cmd": "clean", "group": parsed.values["group"], "successful_only": bool(parsed.values["successful_only"])}


def _parse_remove(argv: list[str], fmt: str) -> dict[str, Any]:
    usage = "pueue remove <TASK_IDS>..."
    parsed = parse_args(argv, [], usage)
    if not parsed.positionals:
        raise UsageError("the following required arguments were not provided:\n  <TASK_IDS>...", usage)
    return {"cmd": "remove", "ids": _ids(parsed.positionals, usage)}


def _parse_shutdown(argv: list[str], fmt: str) -> dict[str, Any]:
    parse_args(argv, [], "pueue shutdown")
    return {"cmd": "shutdown"}


SUBCOMMANDS: dict[str, Callable[[list[str], str], dict[str, Any]]] = {
    "add": _parse_add, "status": _parse_status, "log": _parse_log, "kill": _parse_kill, "start": _parse_start,
    "pause": _parse_pause, "group": _parse_group, "parallel": _parse_parallel, "clean": _parse_clean,
    "remove": _parse_remove, "shutdown": _parse_shutdown,
}
TOP_USAGE = "pueue [OPTIONS] [COMMAND]"


@dataclasses.dataclass(frozen=True)
class LocalOutput:
    """An answer the client gives without the daemon (--version, --help)."""

    stdout: str


def parse_command_line(argv: list[str], settings: Settings) -> dict[str, Any] | LocalOutput:
    """Turn pueue's argv into a request for the daemon, or a local answer."""
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        token = argv[index]
        if token in ("-V", "--version"):
            return LocalOutput(f"pueue {settings.version_string or VERSIONS[settings.format]}\n")
        if token in ("-h", "--help"):
            return LocalOutput(_help_text())
        if token in ("--color", "-c", "--config", "-p", "--profile"):
            index += 2
        elif re.fullmatch(r"-v+|--verbose|--(color|config|profile)=.*", token):
            index += 1
        else:
            raise UsageError(f"unexpected argument '{token}' found", TOP_USAGE)
    name = argv[index] if index < len(argv) else "status"
    if name not in SUBCOMMANDS:
        raise UsageError(f"unrecognized subcommand '{name}'", TOP_USAGE)
    try:
        return SUBCOMMANDS[name](argv[index + 1:], settings.format)
    except HelpRequested as help_request:
        return LocalOutput(f"Usage: {help_request.args[0]}\n")


def _help_text() -> str:
    return ("Interact with the Pueue daemon (pueue stand-in)\n\nUsage: pueue [OPTIONS] [COMMAND]\n\nCommands:\n"
            + "".join(f"  {name}\n" for name in SUBCOMMANDS) + "\nOptions:\n  -h, --help     Print help\n"
            "  -V, --version  Print version\n")


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------

class ClientError(Exception):
    """A client-side failure with pueue's error chain (exit 1)."""

    def __init__(self, chain: list[str], location: str):
        super().__init__(chain[0])
        self.chain = chain
        self.location = location


def connect(paths: Paths) -> socket.socket:
    """Connect to the daemon's socket; raises OSError like a real client would see it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(unix_address(paths.socket))
    except OSError:
        sock.close()
        raise
    sock.settimeout(CLIENT_TIMEOUT_S)
    return sock


def exchange(sock: socket.socket, request: dict[str, Any]) -> Reply:
    """Send one request and read the daemon's reply."""
    sock.sendall(json.dumps(request).encode())
    sock.shutdown(socket.SHUT_WR)
    data = _receive_all(sock)
    if not data:
        raise ConnectionError("the daemon closed the connection without an answer")
    return Reply(**json.loads(data))


def complete_request(request: dict[str, Any], fmt: str, *, cwd: str | None = None,
                     environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Add what only the client knows: its environment, its cwd (``cwd``/``environ``: those of a
    quick client, ``pueue_client``; else this process's), the parsed query."""
    if request["cmd"] == "add":
        environ = os.environ if environ is None else environ
        return {**request, "path": _working_directory(request["working_directory"], fmt, cwd),
                "envs": {k: v for k, v in environ.items() if k != STANDIN_ENV}}
    if request["cmd"] == "status":
        try:
            return {**request, "query": parse_query(request["query_words"])}
        except QueryError as err:
            raise ClientError(["Failed to parse query", str(err)], "pueue/src/client/query/mod.rs:79") from None
    return request


def _working_directory(given: str | None, fmt: str, cwd: str | None = None) -> str:
    """v4.0.3+ canonicalizes on the client and fails; v3 stores the path verbatim."""
    here = cwd if cwd is not None else os.getcwd()
    if fmt == "v3":
        return given if given is not None else here
    try:
        return os.path.realpath(os.path.join(here, given) if given is not None else here, strict=True)
    except OSError as err:
        raise ClientError(["Failed to canonicalize given working directory path", os_error_text(err)],
                          "pueue/src/client/commands/add.rs:43") from None


def daemon_down_text(paths: Paths, fmt: str, error: OSError) -> str:
    cause = (f'I/O error at path "{paths.socket}" while connecting to daemon. Did you start it?:\n'
             f"{os_error_text(error)}")
    return client_error_text(fmt, ["Failed to initialize client.", "Failed to initialize stream.", cause],
                             "pueue/src/client/client.rs:89")


def never_started_text(fmt: str) -> str:
    return client_error_text(fmt, ["Couldn't find a configuration file. Did you start the daemon yet?"],
                             "pueue_lib/src/settings.rs:297")


def garbage_text(real_stdout: str, pending: int) -> str:
    """Non-JSON output for the chaos control, varying with the pending count."""
    kinds = [
        real_stdout[: max(1, len(real_stdout) // 2)].rstrip("\n") + "\n",
        "\x1b[31mthread 'main' panicked at 'broken pipe'\x1b[0m\n",
        "<html><head><title>502 Bad Gateway</title></head></html>\n",
    ]
    return kinds[(pending - 1) % len(kinds)]


def parsed_or_reply(argv: list[str], settings: Settings) -> dict[str, Any] | Reply:
    """pueue's words as a request for the daemon, or the Reply the client prints without one
    (a usage error, exit 2; ``--version``, ``--help``)."""
    try:
        request = parse_command_line(argv, settings)
    except UsageError as err:
        return Reply(stderr=err.text, exit=2)
    return Reply(stdout=request.stdout) if isinstance(request, LocalOutput) else request


def client_request(paths: Paths, argv: list[str], cwd: str | None,
                   environ: dict[str, str]) -> dict[str, Any] | Reply | None:
    """What a quick client's words ask the daemon (``pueue_client``), read exactly as
    ``client_main`` reads them: the request, or the Reply to print at once, or None when the
    full client must answer (a ``lose-add`` is pending for this add: it needs the client's stdout)."""
    settings = load_settings(paths)
    request = parsed_or_reply(argv, settings)
    if isinstance(request, Reply):
        return request
    if request["cmd"] == "add" and lost_add_pending(paths, request["label"]):
        return None
    if cwd is None:
        return None  # its folder was removed: the full client reports that as pueue does
    try:
        return complete_request(request, settings.format, cwd=cwd, environ=environ)
    except ClientError as err:
        return Reply(stderr=client_error_text(settings.format, err.chain, err.location), exit=1)


def client_main(argv: list[str]) -> int:
    """``pueue ARGS``: parse, talk to the daemon, print like the real client."""
    paths = paths_from_env()
    settings = load_settings(paths)
    request = parsed_or_reply(argv, settings)
    if isinstance(request, Reply):  # a usage error, or --version/--help: no daemon needed
        sys.stdout.write(request.stdout)
        sys.stderr.write(request.stderr)
        return request.exit
    if not paths.config.exists():
        sys.stderr.write(never_started_text(settings.format))
        return 1
    lost = take_lost_add(paths, request["label"]) if request["cmd"] == "add" else None
    if lost is not None:
        _log(paths, f"lose-add: the answer to the add labelled {request['label']} is lost"
                    f"{f' and the task stored {lost.late:g} s late' if lost.late else ''}")
        return _add_with_a_lost_answer(paths, request, settings.format, lost)
    reply = _ask_daemon(paths, request, settings.format)
    return _print_reply(paths, request, reply)


def _add_with_a_lost_answer(paths: Paths, request: dict[str, Any], fmt: str, lost: LostAdd) -> int:
    """``lose-add``: send the add, print nothing until the reader of stdout gives up (exit 1).

    A reader still there after ``lost.hang`` seconds gets the normal answer, late:
    the stand-in is slow, never wrong.
    """
    try:
        sock = connect(paths)
        sock.sendall(json.dumps({**complete_request(request, fmt), "late_seconds": lost.late}).encode())
        sock.shutdown(socket.SHUT_WR)
    except (OSError, ClientError):
        return _print_reply(paths, request, _ask_daemon(paths, request, fmt))
    with sock:
        if _reader_goes_away(sys.stdout.fileno(), lost.hang):
            return 1
        sock.settimeout(max(CLIENT_TIMEOUT_S, lost.late + 10))
        try:
            reply = Reply(**json.loads(_receive_all(sock)))
        except (OSError, ValueError) as err:
            text = client_error_text(fmt, ["Failed to receive message from daemon", str(err)],
                                     "pueue_lib/src/network/protocol.rs:91")
            reply = Reply(stderr=text, exit=1)
    return _print_reply(paths, request, reply)


def _reader_goes_away(fd: int, seconds: float) -> bool:
    """True once the other end of pipe/socket ``fd`` is closed (within ``seconds``)."""
    poller = select.poll()
    poller.register(fd, 0)  # only POLLERR/POLLHUP: a pipe's writer gets POLLERR when its reader closes
    return bool(poller.poll(max(0, int(seconds * 1000))))


def _ask_daemon(paths: Paths, request: dict[str, Any], fmt: str) -> Reply:
    try:
        sock = connect(paths)
    except OSError as err:
        return Reply(stderr=daemon_down_text(paths, fmt, err), exit=1)
    with sock:
        try:
            return exchange(sock, complete_request(request, fmt))
        except ClientError as err:
            return Reply(stderr=client_error_text(fmt, err.chain, err.location), exit=1)
        except (OSError, ValueError) as err:
            text = client_error_text(fmt, ["Failed to receive message from daemon", str(err)],
                                     "pueue_lib/src/network/protocol.rs:91")
            return Reply(stderr=text, exit=1)


def with_garbage(paths: Paths, request: dict[str, Any], reply: Reply) -> Reply:
    """``reply``, or garbage in place of its stdout when a ``garbage`` answer is pending for this
    successful ``status --json`` (one is consumed)."""
    if request["cmd"] == "status" and request["json"] and reply.exit == 0:
        pending = take_garbage(paths)
        if pending:
            return dataclasses.replace(reply, stdout=garbage_text(reply.stdout, pending))
    return reply


def _print_reply(paths: Paths, request: dict[str, Any], reply: Reply) -> int:
    reply = with_garbage(paths, request, reply)
    sys.stdout.write(reply.stdout)
    sys.stdout.flush()
    sys.stderr.write(reply.stderr)
    return reply.exit


# ---------------------------------------------------------------------------
# Daemon process management (pueued, pid file, controls)
# ---------------------------------------------------------------------------

def _process_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_standin_daemon(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--daemon" in cmdline and _process_alive(pid)


def daemon_pid(paths: Paths) -> int | None:
    """The running daemon's pid, or None."""
    try:
        pid = int(paths.pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_standin_daemon(pid) else None


def _claim_pid_file(paths: Paths) -> bool:
    if daemon_pid(paths) is not None:
        return False
    with contextlib.suppress(FileNotFoundError):
        paths.pid.unlink()
    try:
        fd = os.open(paths.pid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def _release_pid_file(paths: Paths) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(paths.pid.read_text().strip()) == os.getpid():
            paths.pid.unlink()


def _write_config(paths: Paths) -> None:
    if paths.config.exists():
        return
    paths.config.write_text(
        "# Written by the pueue stand-in on its first start (real pueued writes pueue.yml too).\n"
        f"shared:\n  pueue_directory: {paths.root}\n  runtime_directory: {paths.root}\n"
        f"  use_unix_socket: true\n  unix_socket_path: {paths.socket}\n"
        "daemon:\n  default_parallel_tasks: 1\n  shell_command: [sh, -c, '{{ pueue_command_string }}']\n")


def run_daemon(paths: Paths) -> int:
    """The foreground daemon: claim the pid file, restore, serve until told to stop."""
    paths.task_logs.mkdir(parents=True, exist_ok=True)
    if not _claim_pid_file(paths):
        sys.stderr.write("Error: Pid file already exists and another daemon seems to be running.\n"
                         "Please stop the daemon beforehand.\n")
        return 1
    try:
        os.chdir(paths.root)
        _write_config(paths)
        daemon = Daemon(paths)
        daemon.load_and_restore()
        daemon.bind()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: daemon.request_stop())
        _log(paths, f"daemon {os.getpid()} serving on {paths.socket}")
        daemon.serve()
        daemon.shutdown()
        return 0
    finally:
        _release_pid_file(paths)


def start_daemon(paths: Paths) -> None:
    """Start a detached daemon and wait (up to READY_TIMEOUT_S) until it answers."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.daemon_log, "ab") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--daemon"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError):
            connect(paths).close()
            return
        time.sleep(0.01)


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _is_group_leader(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[2]) == pid
    return False


def _wait_until_dead(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.005)


def stop_daemon(paths: Paths, *, keep_socket: bool = False) -> None:
    """Crash the daemon: SIGKILL it and every task's process group; the state file stays."""
    groups: set[int] = set()
    pid = daemon_pid(paths)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)  # freeze it: no new task, no half-done bookkeeping
        groups.update(_children_of(pid))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_until_dead(pid)
    with file_lock(paths):
        tasks, _ = read_state(paths)
    groups.update(t.pid for t in tasks.values() if t.status in ACTIVE and t.pid)
    for leader in groups:
        if _is_group_leader(leader):
            _signal_group(leader, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        paths.pid.unlink()
    if not keep_socket:
        with contextlib.suppress(FileNotFoundError):
            paths.socket.unlink()


def daemon_main(argv: list[str]) -> int:
    """``pueued [-d]``."""
    paths = paths_from_env()
    if any(arg in ("-V", "--version") for arg in argv):
        print(f"pueued {VERSIONS[load_settings(paths).format]}")
        return 0
    if any(arg in ("-d", "--daemonize") for arg in argv):
        start_daemon(paths)
        print("Pueued is now running in the background")
        return 0
    return run_daemon(paths)


def ctl(paths: Paths, argv: list[str]) -> str:
    """Run one stand-in control (see the module docstring); return what to print."""
    action, args = (argv[0], argv[1:]) if argv else ("", [])
    if action == "format" and len(args) == 1 and args[0] in FORMATS:
        update_settings(paths, format=args[0])
    elif action == "garbage" and len(args) == 1 and args[0].isdigit():
        update_settings(paths, garbage=int(args[0]))
    elif action == "version-string" and len(args) == 1:
        update_settings(paths, version_string=args[0])
    elif action == "stop" and args in ([], ["--stale"]):
        stop_daemon(paths, keep_socket=bool(args))
    elif action == "start" and not args:
        start_daemon(paths)
    elif action == "restart" and not args:
        stop_daemon(paths)
        start_daemon(paths)
    elif action == "lose-add" and args and args[0].isdigit():
        update_settings(paths, **_lose_add_settings(args))
    elif action == "foreign-add":
        return f"{foreign_add(paths, args)}\n"
    elif action == "task-loop" and len(args) == 1 and args[0].isdigit():
        update_settings(paths, task_loop_ms=int(args[0]))
    elif action == "pid" and not args:
        pid = daemon_pid(paths)
        if pid is None:
            raise StandinError("the daemon is not running")
        return f"{pid}\n"
    else:
        raise StandinError(f"unknown control {' '.join(argv)!r}; use format v3|v4, restart, stop [--stale], "
                           "start, garbage N, lose-add N [--late S] [--hang H] [--label PREFIX], "
                           "foreign-add [--label L | --no-label] [-g GROUP] [SECONDS], version-string X, task-loop MS, pid",
                           exit_code=2)
    return ""


def _lose_add_settings(args: list[str]) -> dict[str, Any]:
    usage = "lose-add N [--late S] [--hang H] [--label PREFIX]"
    parsed = _parse_control(args, [Opt("late", None, "late", "value", "S", float),
                                   Opt("hang", None, "hang", "value", "H", float),
                                   Opt("label", None, "label", "value", "PREFIX")], usage)
    values = parsed.values
    if len(parsed.positionals) != 1:
        raise StandinError(f"usage: {usage}", exit_code=2)
    return {"lose_add": int(parsed.positionals[0]), "lose_add_late": values["late"] or 0.0,
            "lose_add_hang": LOST_ADD_HANG_S if values["hang"] is None else values["hang"],
            "lose_add_label": values["label"] or ""}


def foreign_add(paths: Paths, args: list[str]) -> int:
    """Add another user's ``sleep SECONDS; exit 0`` through the daemon; return its id."""
    usage = "foreign-add [--label L | --no-label] [-g GROUP] [SECONDS]"
    parsed = _parse_control(args, [Opt("label", None, "label", "value", "L"), Opt("no_label", None, "no-label"),
                                   Opt("group", "g", "group", "value", "GROUP")], usage)
    values = parsed.values
    if len(parsed.positionals) > 1 or (values["label"] and values["no_label"]):
        raise StandinError(f"usage: {usage}", exit_code=2)
    seconds = float(parsed.positionals[0]) if parsed.positionals else FOREIGN_SECONDS
    label = None if values["no_label"] else values["label"] or FOREIGN_LABEL
    words = ["-p", "-w", str(paths.root), *(["-l", label] if label else []), *(["-g", values["group"]]
             if values["group"] else []), "--", f"sleep {seconds:g}; exit 0"]
    fmt = load_settings(paths).format
    reply = _ask_daemon(paths, _parse_add(words, fmt), fmt)
    if reply.exit != 0:
        raise StandinError(f"foreign-add failed: {(reply.stdout + reply.stderr).strip()}")
    return int(reply.stdout.strip().splitlines()[-1])


def _parse_control(args: list[str], opts: list[Opt], usage: str) -> Parsed:
    try:
        return parse_args(args, opts, usage)
    except (UsageError, HelpRequested):
        raise StandinError(f"usage: {usage}", exit_code=2) from None


def ctl_main(argv: list[str]) -> int:
    sys.stdout.write(ctl(paths_from_env(), argv))
    return 0


def write_wrappers(bin_dir: Path, data_dir: Path, python: str = sys.executable) -> dict[str, Path]:
    """Write executable ``pueue``, ``pueued`` and ``pueue-standin-ctl`` wrappers into ``bin_dir``.

    Each is ``#!/bin/sh`` + ``PUEUE_STANDIN_DIR=<data_dir> exec <python> <program> ...``,
    so a remote shell can run ``bin_dir/pueue status --json`` like the real client. ``pueue``
    starts the quick client (``pueue_client``, with ``-S``: it needs no site packages), which
    hands what the daemon cannot answer to this file. Returns the paths by name.
    """
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve()
    prefix = f"{STANDIN_ENV}={shlex.quote(str(Path(data_dir).absolute()))} exec {shlex.quote(python)}"
    full, quick = shlex.quote(str(here)), shlex.quote(str(here.with_name("pueue_client.py")))
    written = {}
    for name, program in (("pueue", f"-S {quick}"), ("pueued", f"{full} --daemon"),
                          ("pueue-standin-ctl", f"{full} --ctl")):
        target = bin_dir / name
        target.write_text(f"#!/bin/sh\n{prefix} {program} \"$@\"\n")
        target.chmod(0o755)
        written[name] = target
    return written


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["--daemon"]:
            return daemon_main(args[1:])
        if args[:1] == ["--ctl"]:
            return ctl_main(args[1:])
        return client_main(args)
    except StandinError as err:
        sys.stderr.write(f"Error: {err}\n")
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
