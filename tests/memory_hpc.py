"""An HPC in memory for the fast tier: a scheduler, its host's disk and an injected clock, no process.

``MemoryHpc`` is one host. Its tasks live in memory and move only when someone looks (every
call of its ``MemoryBackend`` or ``MemoryRemote`` first brings the host up to ``clock()``):
waiting tasks start in id order where their slot has room, and a running task's *program*
(a Python callable, see ``Run``) is stepped with the seconds it has run on the HPC's clock.
Its disk is a real local folder (``remote_base_dir`` of the host's config), so uploads,
exit records and results are real files.

It keeps to the contract of ``shared.backends.Backend`` and ``shared.remote.Remote``: the same
return types, the same typed failures (``Unreachable`` while ``down``, ``SchedulerOutage``
while ``scheduler_down``, ``AlreadySubmitted``, ``WorkdirMissing``, ``SubmitLockBusy``,
``SlotLost``...), and it passes ``tests/test_backend_contract.py``. Of the shell the workers
send through ``remote.run``/``run_script`` it knows only the few scripts they use (each by
identity), and fails the test loudly on anything else; a task's command must be one of its
``programs`` (wrapped by ``shared.tasks.wrap_command``, whose exit record it then writes).

What a test steers: ``clock.advance(s)``, ``down``, ``scheduler_down``, ``fail_next(op, error)``,
``kill(id)`` (a signal we did not send), ``clean()`` (``pueue clean``), ``pause(slot)``,
``restart()`` (a daemon restart), ``remove_slot(slot)``, ``hold_lock(label)``, ``reuse_ids``.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

from shared import tasks
from shared.backends.common import (LOCK_FOLDER, PREPARE_FAILED_EXIT, add_lands_within, checked_label,
                                    failure_text, with_text)
from shared.backends.model import KillResult, Snapshot, SubmitItem, SubmitOutcome, TaskInfo, TaskState
from shared.backends.pueue import WORDS
from shared.errors import (AlreadySubmitted, HostKeyMismatch, RemoteError, RemoteFailure,
                           SchedulerOutage, SlotLost, SubmitLockBusy, Unreachable, WorkdirMissing)
from shared.remote import UPLOAD_PREFIX, UnsafeMember, UploadCase, UploadOutcome, UploadResult, folder_manifest
from shared.retention import REMOVE_SCRIPT

# The command the memory configs run (``hpc.remote_command``): the fake MOQUI of ``fake_moqui``.
MOQUI_COMMAND = "python interpreter.py && python moquisim.py"
_WRAP_HEAD, _WRAP_TAIL = tasks.wrap_command("\0").split("\0")
_RECORDS_SCRIPT = tasks._READ_RECORDS


class Clock:
    """The injected clock: the HPC's and the workers' (``ctx.clock``); moves only when told."""

    def __init__(self, start: float):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Run:
    """What a program sees at each step: its task, folder, environment, how long it has run, and
    ``say`` to print a line. ``memory`` is the program's own, kept between steps. A step returns
    None while the program runs on, or its exit code."""

    task_id: int
    label: str
    workdir: Path
    env: dict[str, str]
    elapsed: float = 0.0
    output: list[str] = field(default_factory=list)
    memory: dict = field(default_factory=dict)

    def say(self, line: str) -> None:
        self.output.append(line)


Program = Callable[[Run], "int | None"]


def sleeps(seconds: float, code: int = 0) -> Program:
    """A program that runs ``seconds`` on the HPC's clock, then exits ``code`` (``sleep N``)."""
    return lambda run: code if run.elapsed >= seconds else None


def fake_moqui(run: Run) -> int | None:
    """What ``sandbox/fake_moqui`` does, on the HPC's clock: ``mqi_fake.json``'s ``seconds``,
    ``batches`` and ``mode`` (ok, fail, hang, crash); one progress line per batch; ``output/``."""
    knobs = run.memory.get("knobs")
    if knobs is None:
        knobs = run.memory["knobs"] = json.loads((run.workdir / "mqi_fake.json").read_text())
        run.say(f"Simulating {knobs.get('batches', 10) * 10000} histories with {knobs.get('batches', 10)} batches")
        run.memory["batch"] = 0
    seconds, batches, mode = float(knobs.get("seconds", 1)), int(knobs.get("batches", 10)), knobs.get("mode", "ok")
    trouble_at = max(1, batches // 2)
    while run.memory["batch"] < batches and run.elapsed >= seconds / batches * (run.memory["batch"] + 1):
        if mode == "hang" and run.memory["batch"] >= trouble_at:
            return None  # holds on without a word, for ever
        run.memory["batch"] += 1
        run.say(f"Generating particles for ({run.memory['batch']} of {batches} batches)")
        if run.memory["batch"] == trouble_at and mode == "fail":
            run.say("FATAL ERROR: CUDA error: an illegal memory access was encountered (memory fake)")
            return 1
        if run.memory["batch"] == trouble_at and mode == "crash":
            run.say("Segmentation fault")
            return 139
    if run.memory["batch"] < batches or mode == "hang":
        return None
    out = run.workdir / "output"
    out.mkdir(exist_ok=True)
    (out / "dose.raw").write_bytes(bytes(4000))
    (out / "Dose.mhd").write_text("ObjectType = Image\nElementDataFile = dose.raw\n")
    run.say(f"Total execution time: {seconds:.2f} s")
    return 0


@dataclass
class _Task:
    id: int
    label: str
    group: str
    workdir: str
    command: str
    program: Program
    run: Run
    records: bool               # wrapped by tasks.wrap_command: leaves .mqic/exit_status
    enqueued_at: float
    state: TaskState = TaskState.QUEUED
    exit_code: int | None = None
    start: float | None = None
    end: float | None = None
    detail: str = ""

    def info(self) -> TaskInfo:
        stamp = (lambda t: None if t is None else datetime.fromtimestamp(t, tz=timezone.utc))
        return TaskInfo(id=self.id, label=self.label, group=self.group, state=self.state,
                        exit_code=self.exit_code if self.state is TaskState.FAILED else None, detail=self.detail,
                        path=self.workdir, command=self.command, enqueued_at=stamp(self.enqueued_at),
                        start=stamp(self.start), end=stamp(self.end), ended=self.state.is_done)


class MemoryHpc:
    """One HPC host in memory: its scheduler's tasks and slots, its disk (``base``), its clock."""

    def __init__(self, name: str, base: Path, clock: Clock, *, programs: Mapping[str, Program] | None = None,
                 seconds_per_call: float = 0.0):
        self.name, self.base, self.clock = name, Path(base), clock
        self.programs: dict[str, Program] = {MOQUI_COMMAND: fake_moqui, **(programs or {})}
        self.seconds_per_call = seconds_per_call  # HPC time each call costs (the contract's wait loops)
        self.slots: dict[str, int] = {}           # slot -> how many of its tasks run at once
        self.paused: set[str] = set()
        self.tasks: dict[int, _Task] = {}
        self.next_id = 0
        self.reuse_ids = False                    # True: a new id is the highest listed + 1 (pueue after clean)
        self.down = False                         # every call: Unreachable
        self.scheduler_down = False               # every scheduler call: SchedulerOutage
        self.key_refused = False                  # check_host_key: HostKeyMismatch
        self.locks: set[str] = set()              # labels whose submit lock someone else holds
        self.failures: dict[str, list[tuple[RemoteFailure, bool]]] = {}
        self.calls: list[str] = []                # every operation, in order
        self._lock = threading.RLock()

    # -- what a test steers ------------------------------------------------------------------------
    def fail_next(self, operation: str, error: RemoteFailure, *, after: bool = False, times: int = 1) -> None:
        """The next ``times`` calls of ``operation`` raise ``error``; ``after``: only once it was done
        (a submit whose answer was lost: the task exists)."""
        self.failures.setdefault(operation, []).extend([(error, after)] * times)

    def kill(self, task_id: int) -> None:
        """A signal we did not send (another user, a node reboot): the task ends Killed, no exit record."""
        with self._lock:
            self.settle()
            self._end(self.tasks[task_id], TaskState.KILLED)

    def clean(self) -> list[int]:
        """``pueue clean``: the scheduler forgets every finished task (their folders stay)."""
        with self._lock:
            self.settle()
            gone = [i for i, t in self.tasks.items() if t.state.is_done]
            for task_id in gone:
                del self.tasks[task_id]
            return gone

    def pause(self, slot: str) -> None:
        with self._lock:
            self.settle()
            self.paused.add(slot)

    def restart(self) -> None:
        """A daemon restart: running tasks are killed, slots holding waiting tasks come back paused."""
        with self._lock:
            self.settle()
            for task in self.tasks.values():
                if task.state.is_active:
                    self._end(task, TaskState.KILLED)
            self.paused |= {t.group for t in self.tasks.values() if t.state.is_waiting}

    def remove_slot(self, slot: str) -> None:
        with self._lock:
            self.slots.pop(slot, None)

    def hold_lock(self, label: str) -> None:
        self.locks.add(label)

    def labelled(self, label: str) -> list[TaskInfo]:
        """The tasks carrying ``label``, as the scheduler lists them now (a look, not a call)."""
        with self._lock:
            self.settle()
            return [t.info() for _, t in sorted(self.tasks.items()) if t.label == label]

    # -- time ----------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Bring the host up to ``clock()``: step running programs, then start what may start."""
        for task in [t for t in self.tasks.values() if t.state is TaskState.RUNNING]:
            self._step(task)
        for task in sorted((t for t in self.tasks.values() if t.state.is_waiting), key=lambda t: t.id):
            running = sum(1 for t in self.tasks.values() if t.group == task.group and t.state.is_active)
            if task.group in self.slots and task.group not in self.paused and running < self.slots[task.group]:
                self._start(task)

    def _start(self, task: _Task) -> None:
        task.state, task.start = TaskState.RUNNING, self.clock()
        folder = Path(task.workdir)
        if not folder.is_dir():
            task.state, task.end, task.detail = TaskState.FAILED_TO_SPAWN, self.clock(), f"{folder}: no such folder"
            return
        if task.records:  # the wrapper's first words: mkdir .mqic, rm the old record
            (folder / tasks.RECORD_DIR).mkdir(exist_ok=True)
            (folder / tasks.EXIT_RECORD).unlink(missing_ok=True)
        self._step(task)

    def _step(self, task: _Task) -> None:
        task.run.elapsed = self.clock() - task.start
        code = task.program(task.run)
        if task.records:
            (Path(task.workdir) / tasks.OUTPUT_RECORD).write_text("".join(f"{line}\n" for line in task.run.output))
        if code is None:
            return
        if task.records:
            record = Path(task.workdir) / tasks.EXIT_RECORD
            record.with_name("exit_status.part").write_text(f"{code}\n")
            os.replace(record.with_name("exit_status.part"), record)
        task.exit_code = code
        self._end(task, TaskState.SUCCESS if code == 0 else TaskState.FAILED)

    def _end(self, task: _Task, state: TaskState) -> None:
        task.state, task.end = state, self.clock()

    def _call(self, operation: str, *, scheduler: bool = False) -> tuple[RemoteFailure, bool] | None:
        """Every call: costs its HPC time, settles, then fails as the test said (before or after)."""
        self.calls.append(operation)
        self.clock.advance(self.seconds_per_call)
        if self.down:
            raise Unreachable(f"{self.name}: ssh failed: connect to host {self.name} port 22: Connection refused")
        self.settle()
        if scheduler and self.scheduler_down:
            raise SchedulerOutage(["pueue", operation], 1, "Error: Failed while connecting to daemon: "
                                                           "Connection refused (os error 111)")
        queued = self.failures.get(operation)
        if queued:
            error, after = queued.pop(0)
            if not after:
                raise error
            return error, after
        return None

    # -- the scheduler (MemoryBackend) ---------------------------------------------------------------
    def submit(self, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool) -> int:
        checked_label(label)
        with self._lock:
            late = self._call("submit", scheduler=True)
            task_id = self._submit_one(slot, label, workdir, command, env, require_workdir)
            if late:
                raise late[0]
            return task_id

    def submit_batch(self, items: Sequence[SubmitItem]) -> list[SubmitOutcome]:
        """Every item in ONE call, each with its own lock and label check. A failure the test queued
        for the call is every item's outcome (before: none was added; after: each was)."""
        for item in items:
            checked_label(item.label)
        if not items:
            return []
        with self._lock:
            try:
                late = self._call("submit", scheduler=True)
            except RemoteFailure as failure:
                return [failure for _ in items]
            outcomes: list[SubmitOutcome] = []
            for item in items:
                try:
                    outcomes.append(self._submit_one(item.slot, item.label, item.workdir, item.command,
                                                     dict(item.env), item.require_workdir))
                except RemoteFailure as failure:
                    outcomes.append(failure)
            return [late[0] for _ in items] if late else outcomes

    def _submit_one(self, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
                    require_workdir: bool) -> int:
        """One item of a submit call (the call's lock held): its lock and label check, then the add."""
        lockdir = Path(workdir).parent / LOCK_FOLDER
        if lockdir.exists() and not lockdir.is_dir():
            error = RemoteError(["sh", "-c", "<submit script>"], PREPARE_FAILED_EXIT,
                                f"mkdir: cannot create directory '{lockdir}': File exists\n")
            raise with_text(error, failure_text(WORDS.submit, error))
        if label in self.locks:
            raise SubmitLockBusy(f"another submission of {label} is still in flight on the HPC")
        if require_workdir and not Path(workdir).is_dir():
            raise WorkdirMissing(f"working directory {workdir} does not exist on the HPC")
        if any(t.label == label for t in self.tasks.values()):
            raise AlreadySubmitted(f"a task labelled {label} already exists on the HPC")
        if slot not in self.slots:
            error = SlotLost(["pueue", "add"], 1, f"Error: Group {slot} doesn't exists. Use one of these: "
                                                  f"{sorted(self.slots)}")
            raise with_text(error, failure_text(WORDS.submit, error))
        lockdir.mkdir(parents=True, exist_ok=True)
        (lockdir / f"{label}.lock").touch()
        return self._add(slot, label, workdir, command, env)

    def _add(self, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str]) -> int:
        inner = command[len(_WRAP_HEAD):-len(_WRAP_TAIL)] if self._wrapped(command) else command
        program = self.programs.get(inner)
        if program is None:
            raise AssertionError(f"memory HPC {self.name}: no program for the command {inner!r}; "
                                 f"give one in MemoryHpc(programs=...)")
        if self.reuse_ids:
            task_id = max(self.tasks, default=-1) + 1
        else:
            task_id, self.next_id = self.next_id, self.next_id + 1
        run = Run(task_id=task_id, label=label, workdir=Path(workdir), env={**env, "PWD": workdir})
        self.tasks[task_id] = _Task(task_id, label, slot, workdir, command, program, run,
                                    records=self._wrapped(command), enqueued_at=self.clock())
        self.settle()
        return task_id

    @staticmethod
    def _wrapped(command: str) -> bool:
        return command.startswith(_WRAP_HEAD) and command.endswith(_WRAP_TAIL)

    def snapshot(self) -> Snapshot:
        with self._lock:
            self._call("snapshot", scheduler=True)
            return Snapshot(tasks={i: t.info() for i, t in sorted(self.tasks.items())},
                            paused_slots=tuple(sorted(self.paused & set(self.slots))), hpc_time=self.clock())

    def logs(self, task_ids: Sequence[int], lines: int) -> dict[int, str]:
        if not task_ids:
            return {}
        if lines < 1:
            raise ValueError(f"lines must be at least 1, got {lines}")
        with self._lock:
            self._call("logs", scheduler=True)
            return {i: "\n".join(self.tasks[i].run.output[-lines:]) for i in task_ids if i in self.tasks}

    def stop(self, task_ids: Sequence[int], gently: bool) -> KillResult:
        if not task_ids:
            raise ValueError("refusing to stop without task ids")
        with self._lock:
            self._call("stop", scheduler=True)
            done = [i for i in dict.fromkeys(task_ids) if i in self.tasks and self.tasks[i].state.is_active]
            for task_id in done:
                self._end(self.tasks[task_id], TaskState.KILLED)
            return KillResult(killed=tuple(done), failed=tuple(i for i in dict.fromkeys(task_ids) if i not in done))

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        if not task_ids:
            raise ValueError("refusing to remove without task ids")
        with self._lock:
            self._call("remove", scheduler=True)
            done = [i for i in dict.fromkeys(task_ids) if i in self.tasks and not self.tasks[i].state.is_active]
            for task_id in done:
                del self.tasks[task_id]
            return KillResult(killed=tuple(done), failed=tuple(i for i in dict.fromkeys(task_ids) if i not in done))

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        with self._lock:
            self._call("ensure_slots", scheduler=True)
            created = [name for name in wanted if name not in self.slots]
            self.slots.update(wanted)
            self.settle()
            return created

    def resume_slot(self, slot: str) -> None:
        with self._lock:
            self._call("resume_slot", scheduler=True)
            self.paused.discard(slot)
            self.settle()

    # -- the host's shell and disk (MemoryRemote) ------------------------------------------------------
    def run(self, argv: Sequence[str]) -> str:
        argv = [str(word) for word in argv]
        with self._lock:
            if argv == ["true"]:
                self._call("true")
                return ""
            if len(argv) < 4 or argv[:2] != ["sh", "-c"] or argv[3] != "sh":
                raise AssertionError(f"memory HPC {self.name}: unknown remote command {argv!r}")
            script, args = argv[2], argv[4:]
            if script == _RECORDS_SCRIPT:
                self._call("exit_records")
                return self._records(args)
            if script == tail_script():
                self._call("output_tail")
                return self._tail(Path(args[0]) / tasks.OUTPUT_RECORD, int(args[1]))
            if script == REMOVE_SCRIPT:
                self._call("remove_folder")
                return self._remove_folder(*args)
            raise AssertionError(f"memory HPC {self.name}: unknown remote script {script[:200]!r}")

    @staticmethod
    def _records(folders: Sequence[str]) -> str:
        out = []
        for i, folder in enumerate(folders, start=1):
            record = Path(folder) / tasks.EXIT_RECORD
            out.append(f"{i} {record.read_bytes()[:32].decode(errors='replace')}" if record.is_file() else f"{i} -")
        return "".join(f"{line.rstrip(chr(10))}\n" for line in out)

    @staticmethod
    def _tail(path: Path, lines: int) -> str:
        if not path.is_file():
            return ""
        kept = path.read_text(errors="replace").splitlines()[-lines:]
        return "".join(f"{line}\n" for line in kept)

    def _remove_folder(self, base: str, folder: str) -> str:
        if not folder.startswith(f"{base}/") or folder == f"{base}/":
            raise RemoteError(["sh", "-c", "<remove>"], 5, f"refused: {folder} is not inside {base}")
        path = Path(folder)
        if not path.exists() and not path.is_symlink():
            return "absent"
        real = str(path.resolve())
        if not real.startswith(f"{base}/"):
            raise RemoteError(["sh", "-c", "<remove>"], 5, f"refused: {folder} resolves to {real}, outside {base}")
        shutil.rmtree(path)
        return "removed"

    def base_dir(self) -> str:
        with self._lock:
            self._call("base_dir")
            self.base.mkdir(parents=True, exist_ok=True)
            return str(self.base.resolve())

    def upload(self, local_dir: Path, folder_name: str, case_id: int) -> UploadResult:
        outcome = self.upload_many([UploadCase(local_dir, folder_name, case_id)])[0]
        if isinstance(outcome, RemoteFailure):
            raise outcome
        return outcome

    def upload_many(self, cases: Sequence[UploadCase]) -> list[UploadOutcome]:
        """Every case in ONE upload call (as one stream and one verify-and-rename), each landing
        complete or not at all. A case whose folder here cannot be read fails alone (LocalFailure);
        a failure the test queued for the call is every case's outcome (after: each landed)."""
        outcomes: dict[int, UploadOutcome] = {}
        manifests = {}
        for index, case in enumerate(cases):
            try:
                manifests[index] = folder_manifest(case.local_dir)  # LocalFailure: the trouble is ours
            except RemoteFailure as failure:
                outcomes[index] = failure
        if manifests:
            try:
                base = self.base_dir()
                with self._lock:
                    late = self._call("upload")
                    for index, (files, size) in manifests.items():
                        outcomes[index] = self._land(base, cases[index], files, size)
            except RemoteFailure as failure:
                outcomes.update((index, failure) for index in manifests)
            else:
                if late:
                    outcomes.update((index, late[0]) for index in manifests)
        return [outcomes[index] for index in range(len(cases))]

    def _land(self, base: str, case: UploadCase, files: int, size: int) -> UploadResult:
        temp = Path(base, f"{UPLOAD_PREFIX}{case.case_id}-{os.urandom(4).hex()}")
        shutil.copytree(case.local_dir, temp, symlinks=True)
        final = Path(base, case.folder_name)
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)
        for stale in Path(base).glob(f"{UPLOAD_PREFIX}{case.case_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return UploadResult(remote_dir=str(final), files=files, bytes=size)

    def download_results(self, remote_dir: str, patterns: Sequence[str], local_dir: Path) -> list[str]:
        if not patterns:
            return []
        with self._lock:
            self._call("download")
            return self._fetch(remote_dir, patterns, local_dir)

    def download_many(self, wanted: Sequence[tuple[str, Path]], patterns: Sequence[str]) -> dict[int, list[str]]:
        """Every folder in ONE download call; a folder with nothing fetched is left out, and all are
        when the call fails (as ``Remote.download_many``)."""
        with self._lock:
            try:
                self._call("download")
                fetched = {index: self._fetch(remote_dir, patterns, Path(local_dir))
                           for index, (remote_dir, local_dir) in enumerate(wanted) if Path(remote_dir).is_dir()}
            except RemoteFailure:
                for _, local_dir in wanted:
                    shutil.rmtree(local_dir, ignore_errors=True)
                return {}
            return {index: names for index, names in fetched.items() if names}

    def _fetch(self, remote_dir: str, patterns: Sequence[str], local_dir: Path) -> list[str]:
        folder = Path(remote_dir)
        if not folder.is_dir():
            raise RemoteError(["download results"], 3, f"sh: cd: can't cd to {remote_dir}")
        names = []
        for path in sorted(p for p in folder.rglob("*") if any(
                fnmatch.fnmatch(str(p.relative_to(folder)), pattern) for pattern in patterns)):
            name = str(path.relative_to(folder))
            if path.is_symlink():
                raise UnsafeMember(name, f"symbolic link to {os.readlink(path)!r}; links are never fetched")
            if path.is_file():
                (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, local_dir / name)
                names.append(name)
        return names

    def check_host_key(self) -> None:
        with self._lock:
            self._call("handshake")
            if self.key_refused:
                raise HostKeyMismatch(self.name, "Host key verification failed.", fingerprint="SHA256:memory")


def tail_script() -> str:
    """The script ``shared.tasks.read_output_tail`` sends (the same text, built the same way)."""
    return f'tail -n "$2" -- "$1/{tasks.OUTPUT_RECORD}" 2>/dev/null || true'


class MemoryBackend:
    """``shared.backends.Backend`` over a ``MemoryHpc``; it speaks pueue's words (slots pause as pueue's do)."""

    kind = "memory"
    words = WORDS

    def __init__(self, hpc: MemoryHpc, timeout: float = 30):
        self.hpc, self.timeout = hpc, timeout

    def snapshot(self) -> Snapshot:
        return self.hpc.snapshot()

    def submit(self, *, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool = False) -> int:
        return self.hpc.submit(slot, label, workdir, command, dict(env), require_workdir)

    def submit_batch(self, items: Sequence[SubmitItem]) -> list[SubmitOutcome]:
        return self.hpc.submit_batch(items)

    def add_lands_within(self) -> float:
        return add_lands_within(self.timeout)

    def logs(self, tasks_wanted: Sequence[TaskInfo], lines: int) -> dict[int, str]:
        return self.hpc.logs([t.id for t in tasks_wanted], lines)

    def stop(self, task_ids: Sequence[int], *, gently: bool) -> KillResult:
        return self.hpc.stop(task_ids, gently)

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        return self.hpc.remove(task_ids)

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        return self.hpc.ensure_slots(wanted)

    def resume_slot(self, slot: str) -> None:
        self.hpc.resume_slot(slot)

    def version(self) -> str:
        with self.hpc._lock:
            self.hpc._call("version", scheduler=True)
        return "4.0.4 (in memory)"


class MemoryRemote:
    """What the workers use of ``shared.remote.Remote``, on a ``MemoryHpc``'s disk."""

    def __init__(self, hpc: MemoryHpc):
        self.memory = hpc

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> str:
        return self.memory.run(argv)

    def run_script(self, script: str, *args: str, timeout: float | None = None) -> str:
        return self.memory.run(["sh", "-c", script, "sh", *args])

    def base_dir(self) -> str:
        return self.memory.base_dir()

    def remote_case_dir(self, folder_name: str) -> str:
        return f"{self.base_dir()}/{folder_name}"

    def upload(self, local_dir: Path, folder_name: str, *, case_id: int, timeout: float | None = None) -> UploadResult:
        return self.memory.upload(Path(local_dir), folder_name, case_id)

    def upload_many(self, cases: Sequence[UploadCase], *, timeout: float | None = None) -> list[UploadOutcome]:
        return self.memory.upload_many(cases)

    def download_results(self, remote_dir: str, patterns: Sequence[str], local_dir: Path, *,
                         timeout: float | None = None) -> list[str]:
        return self.memory.download_results(remote_dir, patterns, Path(local_dir))

    def download_many(self, wanted: Sequence[tuple[str, Path]], patterns: Sequence[str], *,
                      timeout: float | None = None) -> dict[int, list[str]]:
        return self.memory.download_many(wanted, patterns)

    def check_host_key(self, *, timeout: float | None = None) -> None:
        self.memory.check_host_key()

    def ensure_master(self) -> None:
        """No connection to share in memory."""

    def close(self) -> None:
        """No connection to close in memory."""


# -- configs and worker contexts ------------------------------------------------------------------------

def memory_config_data(root: Path, *, groups: dict | None = None, hosts: list[dict] | None = None,
                       **sections: dict) -> dict:
    """A config (as ``sandbox.hpc.config_data``, the system tier's) whose HPC lives in memory under ``root``."""
    from sandbox.hpc import config_data
    from sandbox.sshd import SshEndpoint
    endpoint = SshEndpoint("memory.invalid", 22, "physics", root / "keys" / "id", root / "keys" / "known_hosts")
    overrides = {"main_loop": {"backoff_base_seconds": 10, "lease_seconds": 60},
                 "scanner": {"ready_marker": None}, "web": {"listen": "127.0.0.1:0"}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    data = config_data(root, endpoint, Path("/opt/pueue/bin/pueue"), project_root=root, groups=groups,
                       hosts=hosts, **overrides)
    data["hpc"]["remote_command"] = MOQUI_COMMAND
    data["hpc"]["control_dir"] = str(root / "ssh")
    return data


class MemorySandbox:
    """A per-test sandbox in memory: a config on disk, one ``MemoryHpc`` per configured host, one clock."""

    def __init__(self, root: Path, *, groups: dict | None = None, hosts: list[dict] | None = None,
                 programs: Mapping[str, Program] | None = None, **sections: dict):
        import yaml
        from shared.config import parse_config

        self.root = root
        (root / "incoming").mkdir(parents=True, exist_ok=True)
        if hosts is not None:  # each host its own name, disk and slots (``groups``)
            hosts = [{"host": f"{h['name']}.memory.invalid", "user": "physics", "identity_file": str(root / "keys" / "id"),
                      "known_hosts_file": str(root / "keys" / "known_hosts"),
                      "remote_base_dir": str(root / f"remote-{h['name']}"), **h} for h in hosts]
        data = memory_config_data(root, groups=groups, hosts=hosts, **sections)
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.config = parse_config(data, self.config_path)
        self.clock = Clock(int(datetime.now(timezone.utc).timestamp()))
        self.hpcs = {host.name: MemoryHpc(host.name, Path(host.hpc.remote_base_dir), self.clock, programs=programs)
                     for host in self.config.hosts}

    @property
    def hpc(self) -> MemoryHpc:
        """The first (in a one-host config: the only) host."""
        return next(iter(self.hpcs.values()))

    def hosts(self) -> dict:
        """``Context.hosts`` for this sandbox: each configured host on its ``MemoryHpc``."""
        from shared.worker import Host
        return {host.name: Host(host, MemoryRemote(self.hpcs[host.name]),
                                MemoryBackend(self.hpcs[host.name], host.hpc.command_timeout_seconds))
                for host in self.config.hosts}

    def context(self, name: str = "test", config=None):
        """A worker ``Context`` as ``build_context`` makes it, its hosts in memory and its clock ours."""
        from shared.worker import build_context
        ctx = build_context(config or self.config, name)
        ctx.hosts = {k: v for k, v in self.hosts().items() if k in ctx.hosts}
        ctx.clock = self.clock
        return ctx

    def tasks_labelled(self, label: str, host: str | None = None) -> list[TaskInfo]:
        return (self.hpcs[host] if host else self.hpc).labelled(label)
