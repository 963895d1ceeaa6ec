"""pueue on the HPC: the driver (one runner call per function) and the pueue backend.

Each driver function makes ONE runner call, parses its stdout with
``shared.backends.pueue_parse`` and returns a typed value: no retries, no sleeps, no
database. ``submit_batch`` adds several tasks in that one call (``common.run_batch``), one
outcome per task; ``submit`` is its batch of one. Failures are typed, never ``None``:

- ``Unreachable``: the host could not be reached (raised by the runner);
- ``RemoteError``: pueue ran and exited non-zero, typed by what pueue said
  (``pueue_parse.classify_error``): ``SchedulerOutage`` when the daemon could not take the
  request at all, ``SlotLost`` when a group of ours is gone; a submit whose answer was lost
  is ``SubmitUncertain``;
- ``BadOutput``: pueue answered something we could not read.

``SCHEDULER`` is this module's one entry in the registry (``shared.backends``), with its
part of the config: the slots are ``groups`` (of the ``pueue`` section, or of a ``hosts``
entry), ``hpc.pueue_command`` says where pueue is, and the ``pueue`` section holds the
settings of every scheduler's task output (``log_lines``, ``progress_pattern``, read through
``shared.backends``) and ``resume_paused_groups``.
"""
from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from shared.backends import Scheduler, SlotConfig, SlotKeys
from shared.backends.common import (CLOCK_PREFIX, CLOCKED, DEFAULT_PROGRESS_PATTERN, LOCKED_SUBMIT_PRELUDE,
                                    BatchScript, ItemCall, add_lands_within, checked_label, failure_text,
                                    item_error, run_batch, run_each, settled, submit_refusal, with_exit_codes,
                                    with_text)
from shared.backends.model import KillResult, Runner, Snapshot, SubmitItem, SubmitOutcome, TaskInfo, Words
from shared.backends.pueue_parse import (_KILL_FAILED_LINE, _KILLED_LINE, _REMOVED_LINE,
                                         _checked_env, _is_int, _parse_id_reply, add_answer_lost, add_argv,
                                         classify_error, parse_clocked_status, parse_groups, parse_log,
                                         parse_status_groups, parse_task_id, parse_version)
from shared.checks import Check, attempt, one_line
from shared.checks import setting as key_name
from shared.config_keys import NAME, Entries, bad, command_line, flag, number, optional, regex, setting
from shared.errors import RemoteError, RemoteFailure, SubmitUncertain

_ALREADY_EXISTS = "already exists"
WORDS = Words(scheduler="pueue", task="task", submit="pueue add", status="pueue status", logs="pueue log",
              stop="pueue kill",
              killed_by_others="killed by a signal we did not send (pueued restart, node reboot or another user)",
              slot="pueue group", paused_why="pueued restarted?", resume="pueue start -g {slot}")

# Idempotent add: under a per-label lock on the HPC, add only when no task carries the
# label; the client is killed after ``limit`` seconds, so an add can never land later
# than ``limit`` after the script started. The look for the label is one `pueue status`
# per batch, shared through BATCH_SCRIPT's cache file, for a label whose lock file this
# submit created (``first``): no submit of it ever began before, and any that begins now
# finds the file and looks afresh under the lock, so a lookup taken earlier in the batch
# cannot miss a task of it. Every other label (a retry, a recovery) is looked up afresh.
ADD_SCRIPT = with_exit_codes(r"""
pueue=$1 label=$2 limit=$3 workdir=$4 need_dir=$5; shift 5""" + LOCKED_SUBMIT_PRELUDE.rstrip("\n") + r"""
while [ "$1" != --mqic-add-- ]; do export "$1" || exit @PREPARE_FAILED_EXIT@; shift; done; shift
if [ "$first" = 1 ] && [ -s "${MQIC_BATCH_CACHE:-/nonexistent}" ]; then
  tasks=$(cat -- "$MQIC_BATCH_CACHE") || exit @LOOKUP_FAILED_EXIT@
else
  tasks=$(eval "$pueue status --json") || exit @LOOKUP_FAILED_EXIT@
  [ -z "$MQIC_BATCH_CACHE" ] || printf '%s' "$tasks" > "$MQIC_BATCH_CACHE" || : > "$MQIC_BATCH_CACHE"
fi
case $tasks in *"\"label\":\"$label\""*) echo "$label already has a task" >&2; exit @LABEL_EXISTS_EXIT@;; esac
unset MQIC_BATCH_CACHE
eval "exec timeout -s KILL $limit $pueue \"\$@\""
""")


def submit(
    runner: Runner, pueue_cmd: Sequence[str], *, group: str, label: str, workdir: str,
    command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
    require_workdir: bool = False,
) -> int:
    """Add one task, at most one per label, and return its pueue id: the batch of one.

    One remote call: under a lock per label (``<parent of workdir>/.mqic-locks``) it
    adds the task only if no task carries ``label`` (AlreadySubmitted otherwise) and
    kills its own pueue client after ``timeout`` seconds, so an add whose answer was
    lost can no longer land once that time has passed. ``require_workdir`` checks that
    ``workdir`` exists first (WorkdirMissing). SubmitUncertain when the answer was lost
    (``pueue_parse.add_answer_lost``, or no answer at all); other failures are raised
    typed; BadOutput if no id.
    """
    item = SubmitItem(slot=group, label=label, workdir=workdir, command=command, env=env or {},
                      require_workdir=require_workdir)
    return settled(submit_batch(runner, pueue_cmd, [item], timeout=timeout)[0])


def submit_batch(runner: Runner, pueue_cmd: Sequence[str], items: Sequence[SubmitItem],
                 timeout: float | None = None) -> list[SubmitOutcome]:
    """``submit`` for each item in order, in ONE remote call (``common.run_batch``): one outcome
    per item, its task id or its typed failure. ValueError, before anything is sent, for an
    item that could not be added (a label or variable name the script cannot take)."""
    limit = str(max(1, int(timeout or 60)))
    pueue_words = " ".join(shlex.quote(word) for word in pueue_cmd)
    calls = [ItemCall(item.label, item.workdir, _add_words(pueue_words, limit, item)) for item in items]
    return run_batch(runner, ADD_BATCH, calls, limit=limit, timeout=timeout)


def _add_words(pueue_words: str, limit: str, item: SubmitItem) -> tuple[str, ...]:
    """ADD_SCRIPT's words for one item (after ``$0``)."""
    checked_label(item.label)
    add = add_argv(["pueue"], group=item.slot, label=item.label, workdir=item.workdir, command=item.command)
    env_words = [f"{name}={value}" for name, value in _checked_env(item.env or {}).items()]
    return (pueue_words, item.label, limit, item.workdir, str(int(item.require_workdir)), *env_words,
            "--mqic-add--", *add[1:])


def _submit_failure(error: RemoteError, label: str, workdir: str) -> RemoteFailure:
    """What a failed ADD_SCRIPT means: a refusal, an add whose answer was lost, or the typed error."""
    refusal = submit_refusal(error, label, workdir)
    if refusal is not error:
        return refusal
    text = failure_text(WORDS.submit, error)
    if add_answer_lost(error):
        return SubmitUncertain(f"{text}; the task may have been added: looking for {label}")
    return with_text(classify_error(error), text)


ADD_BATCH = BatchScript(shell="sh", script=ADD_SCRIPT, words=WORDS, read_id=parse_task_id, failure=_submit_failure)


def _run(runner: Runner, argv: Sequence[str], timeout: float | None) -> str:
    """One pueue call; a failure comes back typed by what pueue said (``classify_error``)."""
    try:
        return runner.run(list(argv), timeout=timeout)
    except RemoteError as error:
        raise classify_error(error) from None


def statuses(runner: Runner, pueue_cmd: Sequence[str], timeout: float | None = None) -> Snapshot:
    """All tasks and groups of the host in ONE remote call, with the HPC's clock."""
    argv = ["sh", "-c", CLOCKED, "sh", CLOCK_PREFIX, *pueue_cmd, "status", "--json"]
    return parse_clocked_status(_run(runner, argv, timeout))


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
    entries = parse_log(_run(runner, argv, timeout))
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
        stdout = _run(runner, argv, timeout)
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

    Reads ``group --json`` once, then in ONE remote call (``run_each``) runs ``group add NAME -p N``
    for each missing group and ``parallel N -g NAME`` where the limit differs (48 groups on a slow
    login cost 48 logins one by one). A concurrent creation ("already exists") is not an error; the
    limit is then set explicitly. Returns once the groups it made are listed (v3 makes them
    asynchronously: ``_wait_listed``).
    """
    existing = parse_groups(_run(runner, [*pueue_cmd, "group", "--json"], timeout))
    changes = {name: parallel for name, parallel in wanted.items()
               if name not in existing or existing[name].parallel_tasks != parallel}
    commands = [[*pueue_cmd, "group", "add", name, "-p", str(parallel)] if name not in existing
                else [*pueue_cmd, "parallel", str(parallel), "-g", name] for name, parallel in changes.items()]
    created = []
    for (name, parallel), command, answer in zip(changes.items(), commands, run_each(runner, commands, timeout=timeout)):
        if answer.code == 0:
            created += [name] if name not in existing else []
        elif name not in existing and _ALREADY_EXISTS in f"{answer.stdout}\n{answer.stderr}":
            set_parallel(runner, pueue_cmd, name, parallel, timeout=timeout)  # someone else made it meanwhile
        else:
            raise classify_error(item_error(command, answer))
    if created:
        _wait_listed(runner, pueue_cmd, created, timeout)
    return created


def _wait_listed(runner: Runner, pueue_cmd: Sequence[str], names: Sequence[str], timeout: float | None,
                 reads: int = 10) -> None:
    """Return once ``group --json`` lists every group of ``names``: pueue v3 makes a group about
    0.2 s after answering ``group add``, and an add to it before then fails. At most ``reads``
    reads, 0.2 s apart; a group still missing then shows as SlotLost at its first add."""
    for read in range(reads):
        if set(names) <= set(parse_groups(_run(runner, [*pueue_cmd, "group", "--json"], timeout))):
            return
        if read + 1 < reads:
            time.sleep(0.2)


def set_parallel(
    runner: Runner, pueue_cmd: Sequence[str], group: str, parallel: int, timeout: float | None = None,
) -> None:
    """``parallel N -g GROUP``: set a group's limit (running tasks are never stopped)."""
    _run(runner, [*pueue_cmd, "parallel", str(parallel), "-g", group], timeout)


def resume_group(runner: Runner, pueue_cmd: Sequence[str], group: str, timeout: float | None = None) -> None:
    """``start -g GROUP``: resume a paused group (a daemon restart pauses groups with queued tasks)."""
    _run(runner, [*pueue_cmd, "start", "-g", group], timeout)


def version(runner: Runner, pueue_cmd: Sequence[str], timeout: float | None = None) -> str:
    """The client's version, e.g. "4.0.4"."""
    return parse_version(_run(runner, [*pueue_cmd, "--version"], timeout))


class PueueBackend:
    """The ``Backend`` for a host running pueue: each slot is a pueue group."""

    kind = "pueue"
    words = WORDS

    def __init__(self, runner: Runner, pueue_cmd: Sequence[str], timeout: float):
        self.runner, self.pueue_cmd, self.timeout = runner, list(pueue_cmd), timeout

    @classmethod
    def from_config(cls, config, host, runner: Runner) -> PueueBackend:
        return cls(runner, tuple(host.hpc.pueue_command), host.hpc.command_timeout_seconds)

    def snapshot(self) -> Snapshot:
        return statuses(self.runner, self.pueue_cmd, timeout=self.timeout)

    def submit(self, *, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool = False) -> int:
        return submit(self.runner, self.pueue_cmd, group=slot, label=label, workdir=workdir, command=command,
                      env=env, timeout=self.timeout, require_workdir=require_workdir)

    def submit_batch(self, items: Sequence[SubmitItem]) -> list[SubmitOutcome]:
        return submit_batch(self.runner, self.pueue_cmd, items, timeout=self.timeout)

    def add_lands_within(self) -> float:
        return add_lands_within(self.timeout)

    def logs(self, tasks: Sequence[TaskInfo], lines: int) -> dict[int, str]:
        return logs(self.runner, self.pueue_cmd, [t.id for t in tasks], lines=lines, timeout=self.timeout)

    def stop(self, task_ids: Sequence[int], *, gently: bool) -> KillResult:
        return kill(self.runner, self.pueue_cmd, task_ids, timeout=self.timeout, gently=gently)

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        return remove(self.runner, self.pueue_cmd, task_ids, timeout=self.timeout)

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        return ensure_groups(self.runner, self.pueue_cmd, wanted, timeout=self.timeout)

    def resume_slot(self, slot: str) -> None:
        resume_group(self.runner, self.pueue_cmd, slot, timeout=self.timeout)

    def version(self) -> str:
        return version(self.runner, self.pueue_cmd, timeout=self.timeout)


# -- mqic doctor --------------------------------------------------------------------------------------

def doctor_checks(config, host, runner: Runner) -> list[Check]:
    """pueue answers with its version; every group of ours exists on the host and is not paused."""
    cmd, timeout = list(host.hpc.pueue_command), host.hpc.command_timeout_seconds
    return [attempt("pueue", lambda: f"version {version(runner, cmd, timeout=timeout)}",
                    f"install pueue on the HPC and start it (pueued -d); {key_name(config, host, 'pueue_command')}"
                    f" is {shlex.join(cmd)}"),
            check_groups(host, runner, cmd, timeout)]


def check_groups(host, runner: Runner, cmd: list[str], timeout: float) -> Check:
    try:
        groups = parse_status_groups(_run(runner, [*cmd, "status", "--json"], timeout))
    except (RemoteFailure, OSError) as exc:
        return Check("pueue groups", False, one_line(exc), "start the pueue daemon: pueued -d")
    ours = host.slot_config.groups
    wanted = [g.name for g in ours]
    missing = [name for name in wanted if name not in groups]
    paused = [name for name in wanted if name in groups and groups[name].paused]
    if missing:
        adds = "; ".join(f"pueue group add {g.name} -p {g.parallel}" for g in ours if g.name in missing)
        return Check("pueue groups", False, f"missing on the HPC: {', '.join(missing)}",
                     f"the submitter creates them when it starts, or run: {adds}")
    if paused:
        return Check("pueue groups", False, f"paused: {', '.join(paused)}",
                     "; ".join(f"pueue start -g {name}" for name in paused))
    return Check("pueue groups", True, ", ".join(wanted))


# -- its part of the config ------------------------------------------------------------------------

def gpu_index(value: Any) -> str:
    if isinstance(value, bool) or not re.fullmatch(r"[0-9A-Za-z,:-]+", str(value)):
        raise bad(value, "a GPU index such as 0 or '0,1'")
    return str(value)


def progress_regex(value: Any) -> str:
    if not {"done", "total"} <= set(re.compile(regex(value)).groupindex):
        raise bad(value, "named groups 'done' and 'total'")
    return value


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """One pueue group of ours: an entry of ``pueue.groups`` (or of a host's ``groups``)."""
    name: str
    gpu: str | None = setting(optional(gpu_index), None,
                              "pins `CUDA_VISIBLE_DEVICES` to this GPU index (e.g. `0`, or `'0,1'`)")
    parallel: int = setting(number(minimum=1, integer=True), 1, "how many tasks pueue runs at once in the group")
    depth: int = setting(
        number(minimum=1, integer=True), 1,
        "how many of our cases the group holds at once, running or queued in pueue behind each other (`depth: 2` "
        "puts the next case in the group's queue while one runs, so pueue starts it the moment the GPU frees)")


@dataclass(frozen=True, kw_only=True)
class GroupsConfig:
    """A pueue host's slots: ``pueue.groups`` (one host), or a ``hosts`` entry's ``groups``."""
    groups: tuple[GroupConfig, ...] = setting(
        Entries(GroupConfig, "group name", NAME, "a non-empty mapping of group names", names_alone=True),
        {"default": {}},
        "a pueue host's slots, its GPU groups by name, e.g. `{gpu_a: {gpu: 0}, gpu_b: {gpu: 1}}` (a list of names "
        "takes every default). Refused with `hpc.backend: slurm` and with `hosts:` (each host has its own `groups`)")

    def slots(self) -> tuple[SlotConfig, ...]:
        return tuple(SlotConfig(name=g.name, gpu=g.gpu, parallel=g.parallel, depth=g.depth) for g in self.groups)


@dataclass(frozen=True, kw_only=True)
class PueueHostKeys:
    """What ``hpc`` (and each ``hosts`` entry) says of pueue, whatever the host's backend."""
    pueue_command: tuple[str, ...] = setting(command_line, "pueue", "path of pueue on the HPC (pueue only)")


@dataclass(frozen=True, kw_only=True)
class PueueConfig:
    """The ``pueue`` section: its ``groups`` aside (``GroupsConfig``), read whatever the backend."""
    resume_paused_groups: bool = setting(flag, False, "resume groups that a pueued restart paused")
    log_lines: int = setting(number(minimum=1, integer=True), 15,
                             "log lines read per pass and kept as a failed case's log tail (Slurm too)")
    progress_pattern: str = setting(progress_regex, DEFAULT_PROGRESS_PATTERN,
                                    "regex with named groups `done` and `total` (Slurm too)",
                                    shown="MOQUI's `Generating particles for (i of N batches)`")


GROUPS = SlotKeys(section="pueue", keys=GroupsConfig, noun="pueue")

SCHEDULER = Scheduler(
    name="pueue", words=WORDS, build=PueueBackend.from_config, doctor_checks=doctor_checks,
    check_names=("pueue", "pueue groups"),
    slot_keys=GROUPS, sections={"pueue": PueueConfig}, host_keys=PueueHostKeys,
    pauses_slots=True,   # a daemon restart pauses groups with queued tasks; ``start -g`` resumes one
    gpus_visible=True,   # tasks run on the host we log into: nvidia-smi there sees their GPUs
)
