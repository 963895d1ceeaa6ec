"""Slurm on the HPC: the ``Backend`` for a cluster, one remote call per method.

Each slot of ours is an entry of ``slurm.partitions`` in the config: a partition with
its account, QOS, gres and extra ``#SBATCH`` lines (``slurm_parse.SubmitSettings``). A
case is one batch job named by its label ``mqic_case_<id>``, started in the case folder
by its own ``sbatch`` (several cases' in ONE ssh call: ``submit_batch``), its output in ``.mqic/slurm-<job id>.out``. The job's comment names its slot
(``mqic_slot=<slot>``), so several slots may share one partition.

The command the submitter passes is already wrapped by ``shared.tasks.wrap_command``,
which writes the exit record ``.mqic/exit_status``; the batch script only enters the
folder, exports the case's variables and ``exec``s it. So one place writes the record,
on Slurm as on pueue: a job ended by a signal (a cancel, a time limit) leaves none.

Failures are typed, never ``None``: ``Unreachable`` (raised by the runner), ``SlurmError``
(a ``RemoteError`` whose ``kind`` says what Slurm meant), ``SlurmOutage`` (a ``SchedulerOutage``:
Slurm could not take a submit, e.g. slurmctld is down: no job was made and no attempt is used
up), ``SubmitUncertain`` (the submit may have landed), ``BadOutput``.

``SCHEDULER`` is this module's one entry in the registry (``shared.backends``), with its
part of the config: a host's slots are ``partitions`` and ``bin_dir`` (the ``slurm``
section, or a ``hosts`` entry).
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from shared.backends import Scheduler, SlotConfig, SlotKeys
from shared.backends import slurm_parse as sp
from shared.backends.common import (CLOCK_PREFIX, CLOCKED, LOCKED_SUBMIT_PRELUDE, LOOKUP_FAILED_EXIT,
                                    PREPARE_FAILED_EXIT, SUBMIT_EXIT_MEANINGS, BatchScript, ItemCall,
                                    add_lands_within, answer_lost, checked_label, failure_text, run_batch,
                                    settled, split_clock, submit_refusal, with_exit_codes, with_text)
from shared.backends.model import KillResult, Runner, Snapshot, SubmitItem, SubmitOutcome, TaskInfo, TaskState, Words
from shared.checks import Check, attempt
from shared.checks import setting as key_name
from shared.config_keys import NAME, Entries, bad, number, optional, setting, text
from shared.errors import RemoteError, RemoteFailure, ResourceShortage, SchedulerOutage, SubmitUncertain

# Read with a marker drawn fresh for each call (``sp.MarkedFormat``): the work dir holds the
# case's folder name, and no character in it may shift a field.
SQUEUE_FIELDS = ("%i", "%j", "%T", "%P", "%V", "%S", "%M", "%Z", "%k", "%r")
WORDS = Words(scheduler="Slurm", task="job", submit="sbatch", status="squeue", logs="job output file",
              stop="scancel",
              killed_by_others="killed by someone else (a scancel we did not send, a preemption or a node failure)",
              slot="partition")
SLOT_COMMENT = "mqic_slot="
JOB_SCRIPT = f"{sp.MQIC_DIR}/slurm-job.sh"
# Slurm's own time limit comes this long after ours (and its SIGKILL grace), so that our
# timeout acts first and Slurm's only when our poller was away.
TIME_LIMIT_MARGIN_SECONDS = 600

# Idempotent submit: under the per-label lock, submit only when no active job carries the
# label; write the batch script into the case folder and run sbatch killed after ``limit``
# seconds (its own exit 255 arrives as 254, never as ssh's "unreachable").
SUBMIT_SCRIPT = with_exit_codes(r"""
label=$1 limit=$2 workdir=$3 need_dir=$4 squeue=$5 script=$6; shift 6""" + LOCKED_SUBMIT_PRELUDE.rstrip("\n") + r"""
jobs=$("$squeue" --me --noheader --name="$label" --format=%i) || exit @LOOKUP_FAILED_EXIT@
[ -z "$jobs" ] || { echo "$label already has job(s)" $jobs >&2; exit @LABEL_EXISTS_EXIT@; }
cd -- "$workdir" && mkdir -p .mqic && printf '%s' "$script" > JOB_SCRIPT || exit @PREPARE_FAILED_EXIT@
timeout -s KILL "$limit" "$@"; status=$?
[ "$status" -ne 255 ] || status=@OWN_255_EXIT@
exit "$status"
""").replace("JOB_SCRIPT", JOB_SCRIPT)
_BEFORE_SBATCH_EXITS = (LOOKUP_FAILED_EXIT, PREPARE_FAILED_EXIT)

# Cancels waiting jobs only (one that started meanwhile is left alone), then lists our
# active jobs: that fresh list says what was removed. scancel's own exit is not the
# answer: it fails for ids Slurm has forgotten, which are gone as wanted.
REMOVE_SCRIPT = r"""
scancel=$1 squeue=$2; shift 2
"$scancel" --state=PENDING "$@" >/dev/null 2>&1
exec "$squeue" --me --noheader --format=%i
"""

LOGS_SCRIPT = r"""
lines=$1 mark=$2; shift 2
while [ $# -ge 2 ]; do
  printf '%s %s\n' "$mark" "$1"
  tail -n "$lines" -- "$2" 2>/dev/null
  echo
  shift 2
done
"""

_REPORTED = {
    sp.TaskState.WAITING: TaskState.QUEUED,
    sp.TaskState.RUNNING: TaskState.RUNNING,
    sp.TaskState.KILLED: TaskState.KILLED,
    sp.TaskState.TIMED_OUT: TaskState.FAILED,
    sp.TaskState.UNKNOWN: TaskState.UNKNOWN,
}
# The request never reached a scheduler that could take it: no job, not the case's fault.
_OUTAGE_KINDS = frozenset({sp.SlurmErrorKind.CONTROLLER_DOWN, sp.SlurmErrorKind.ACCOUNTING_DOWN,
                           sp.SlurmErrorKind.LIMIT_REACHED})
_KILL_ERROR_ID = re.compile(r"job id (\d+)")


class SlurmOutage(sp.SlurmError, SchedulerOutage):
    """Slurm could not take the request (slurmctld down, a submit limit): nothing was made."""


class PartitionProblem(RemoteError):
    """A slot's partition is missing on the cluster, or too short for our time limit."""

    def __init__(self, argv: Sequence[str], message: str):
        super().__init__(list(argv), 0, message)
        self.args = (message,)


# -- the one mapping of a job onto our words ---------------------------------------------------

def task_of_job(job: sp.QueuedJob) -> TaskInfo | None:
    """A job of ``squeue`` as a task, or None when only its exit record can tell its outcome.

    Jobs that ended by themselves (COMPLETED, FAILED, OUT_OF_MEMORY: squeue has no exit
    code) or in a way nobody knows (NODE_FAIL: the processes may have run on) are left
    out, so ``shared.tasks`` resolves them from the exit record as a task the scheduler
    forgot. Jobs ended by a cancel or a preemption are KILLED and by Slurm's time limit
    FAILED ("time limit reached"): a signal leaves no record. Waiting jobs have no start
    (squeue's is an estimate). The group is the slot named in the job's comment, else
    the partition (a job we did not submit).
    """
    verdict = job.verdict
    state = _REPORTED.get(verdict.state)
    if state is None or (state is TaskState.UNKNOWN and verdict.ended):
        return None
    return TaskInfo(
        id=job.job_id, label=job.name, group=slot_of(job), state=state, detail=verdict.detail,
        path=job.work_dir, enqueued_at=_utc(job.submitted),
        start=None if state is TaskState.QUEUED else _utc(job.started), ended=verdict.ended,
    )


def slot_of(job: sp.QueuedJob) -> str:
    """The slot in the job's comment ``mqic_slot=<slot>``, else its partition."""
    return job.comment[len(SLOT_COMMENT):] if job.comment.startswith(SLOT_COMMENT) else job.partition


def _utc(moment: datetime | None) -> datetime | None:
    # squeue runs with TZ=UTC, so its zone-less times are UTC.
    return moment.replace(tzinfo=timezone.utc) if moment is not None else None


def squeue_call(bin_dir: str = "") -> tuple[list[str], sp.MarkedFormat]:
    """The argv that lists our jobs (``SQUEUE_FIELDS``, a fresh marker) and the format to read it with."""
    fmt = sp.MarkedFormat.fresh(SQUEUE_FIELDS)
    return sp.squeue_argv(bin_dir=bin_dir, fmt=fmt.text), fmt


def parse_snapshot(text: str, fmt: sp.MarkedFormat) -> Snapshot:
    """The clock line, then the jobs of ``squeue --format=<fmt.text>``; BadOutput otherwise."""
    hpc_time, rest = split_clock(text, "squeue")
    tasks = [task for job in sp.parse_marked_squeue(rest, fmt) if (task := task_of_job(job)) is not None]
    return Snapshot(tasks={task.id: task for task in tasks}, hpc_time=hpc_time)


def parse_logs(text: str, mark: str) -> dict[int, str]:
    """The output of LOGS_SCRIPT: after each ``<mark> <id>`` line, that job's tail."""
    found: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in (text or "").splitlines():
        head, _, job_id = line.partition(" ")
        if head == mark and job_id.isdigit():
            current = found.setdefault(int(job_id), [])
        elif current is not None:
            current.append(line)
    # LOGS_SCRIPT ends each tail with one newline of its own.
    return {job_id: "\n".join(lines[:-1] if lines and not lines[-1] else lines) for job_id, lines in found.items()}


# -- settings from the config ---------------------------------------------------------------------

def time_limit_seconds(timeout_hours: float, kill_grace_seconds: float) -> int:
    """Slurm's ``--time`` for a case: our own timeout, its SIGKILL grace and a margin."""
    return int(timeout_hours * 3600 + kill_grace_seconds + TIME_LIMIT_MARGIN_SECONDS)


def settings_from_config(config, host) -> dict[str, sp.SubmitSettings]:
    """Each slot's ``SubmitSettings`` from the ``host``'s partitions and ``main_loop``."""
    limit = time_limit_seconds(config.main_loop.running_case_timeout_hours, config.main_loop.kill_grace_seconds)
    return {slot.name: sp.SubmitSettings(partition=slot.partition, account=slot.account, qos=slot.qos,
                                         gres=slot.gres, time_limit_seconds=limit,
                                         extra_sbatch_lines=slot.extra_sbatch)
            for slot in host.slot_config.partitions}


# -- the backend ----------------------------------------------------------------------------------------

class SlurmBackend:
    """The ``Backend`` for a host whose jobs run under Slurm: each slot is a partition entry."""

    kind = "slurm"
    words = WORDS

    def __init__(self, runner: Runner, slots: Mapping[str, sp.SubmitSettings], timeout: float, bin_dir: str = ""):
        self.runner, self.slots, self.timeout, self.bin_dir = runner, dict(slots), timeout, bin_dir

    @classmethod
    def from_config(cls, config, host, runner: Runner) -> SlurmBackend:
        return cls(runner, settings_from_config(config, host), host.hpc.command_timeout_seconds,
                   host.slot_config.bin_dir)

    def _run(self, argv: Sequence[str]) -> str:
        try:
            return self.runner.run(list(argv), timeout=self.timeout)
        except RemoteError as error:
            raise sp.SlurmError.from_remote_error(error) from None

    def _command(self, name: str) -> str:
        return sp.command_path(self.bin_dir, name)

    def snapshot(self) -> Snapshot:
        """Our jobs and the HPC's clock in ONE call (``squeue --me --states=all``, times in UTC)."""
        squeue, fmt = squeue_call(self.bin_dir)
        return parse_snapshot(self._run(["sh", "-c", CLOCKED, "sh", CLOCK_PREFIX, "env", "TZ=UTC", *squeue]), fmt)

    def submit(self, *, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool = False) -> int:
        """One job per label, in ONE call (see SUBMIT_SCRIPT); the job id: the batch of one."""
        item = SubmitItem(slot=slot, label=label, workdir=workdir, command=command, env=env,
                          require_workdir=require_workdir)
        return settled(self.submit_batch([item])[0])

    def submit_batch(self, items: Sequence[SubmitItem]) -> list[SubmitOutcome]:
        """SUBMIT_SCRIPT for each item in order (one ``sbatch`` each), in ONE call: one outcome per
        item. ValueError, before anything is sent, for a label that is no job name of ours or a
        slot without a partition."""
        limit = str(max(1, int(self.timeout)))
        calls = [ItemCall(item.label, item.workdir, self._submit_words(item, limit)) for item in items]
        return run_batch(self.runner, SUBMIT_BATCH, calls, limit=limit, timeout=self.timeout)

    def _submit_words(self, item: SubmitItem, limit: str) -> tuple[str, ...]:
        """SUBMIT_SCRIPT's words for one item (after ``$0``): its job script, then its sbatch argv."""
        case_id = sp.case_id_from_job_name(checked_label(item.label))
        if case_id is None or sp.job_name(case_id) != item.label:
            raise ValueError(f"a Slurm job name must be mqic_case_<id>: {item.label!r}")
        settings = self._settings(item.slot)
        workdir = item.workdir
        script = sp.batch_script(case_id, workdir, item.command, settings, item.env)
        sbatch = sp.sbatch_argv(case_id, workdir, settings, script_path=f"{workdir.rstrip('/')}/{JOB_SCRIPT}",
                                bin_dir=self.bin_dir, comment=f"{SLOT_COMMENT}{item.slot}")
        return (item.label, limit, workdir, str(int(item.require_workdir)), self._command("squeue"), script, *sbatch)

    def _settings(self, slot: str) -> sp.SubmitSettings:
        try:
            return self.slots[slot]
        except KeyError:
            raise ValueError(f"no Slurm partition is configured for slot {slot!r}") from None

    def add_lands_within(self) -> float:
        return add_lands_within(self.timeout)

    def logs(self, tasks: Sequence[TaskInfo], lines: int) -> dict[int, str]:
        """The tail of each job's output file in ONE call ("" before it exists)."""
        if lines < 1:
            raise ValueError(f"lines must be at least 1, got {lines}")
        known = [task for task in tasks if task.path.startswith("/")]
        if not known:
            return {task.id: "" for task in tasks}
        mark = f"--mqic-log-{uuid.uuid4().hex}--"
        pairs = [word for task in known for word in (str(task.id), sp.output_path(task.path, task.id))]
        found = parse_logs(self._run(["sh", "-c", LOGS_SCRIPT, "sh", str(lines), mark, *pairs]), mark)
        return {task.id: found.get(task.id, "") for task in tasks}

    def stop(self, task_ids: Sequence[int], *, gently: bool) -> KillResult:
        """``scancel --signal=TERM --full`` (gently) or ``scancel``; ids Slurm no longer knows are ``failed``."""
        ids = list(dict.fromkeys(task_ids))
        try:
            self._run(sp.scancel_argv(ids, signal="TERM" if gently else None, bin_dir=self.bin_dir))
        except sp.SlurmError as error:
            gone = {int(found) for found in _KILL_ERROR_ID.findall(error.stderr)} & set(ids)
            if error.kind is not sp.SlurmErrorKind.INVALID_JOB_ID or not gone:
                raise
            return KillResult(killed=tuple(i for i in ids if i not in gone), failed=tuple(i for i in ids if i in gone))
        return KillResult(killed=tuple(ids), failed=())

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        """Cancel the waiting jobs among ``task_ids``; finished ones are gone already (removed too).

        A job that is running is left alone and comes back in ``failed``.
        """
        ids = list(dict.fromkeys(task_ids))
        scancel = sp.scancel_argv(ids, bin_dir=self.bin_dir)
        out = self._run(["sh", "-c", REMOVE_SCRIPT, "sh", scancel[0], self._command("squeue"), *scancel[1:]])
        active = {int(word) for word in out.split() if word.isdigit()}
        return KillResult(killed=tuple(i for i in ids if i not in active), failed=tuple(i for i in ids if i in active))

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        """Check that each slot's partition exists and allows our time limit; nothing is created."""
        argv = sp.sinfo_argv(bin_dir=self.bin_dir)
        partitions = sp.parse_partitions(self._run(argv))
        for slot in wanted:
            problem = _partition_problem(slot, self._settings(slot), partitions)
            if problem:
                raise PartitionProblem(argv, problem)
        return []

    def resume_slot(self, slot: str) -> None:
        """Nothing to do: Slurm does not pause a partition of ours by itself (``pauses_slots`` is False)."""

    def version(self) -> str:
        return sp.parse_version(self._run(sp.version_argv(bin_dir=self.bin_dir)))


def _partition_problem(slot: str, settings: sp.SubmitSettings, partitions: Mapping[str, sp.PartitionInfo]) -> str:
    found = partitions.get(settings.partition)
    if found is None:
        return (f"partition {settings.partition!r} of slot {slot} does not exist on the cluster "
                f"(sinfo lists: {', '.join(sorted(partitions)) or 'none'})")
    wanted = settings.time_limit_seconds
    if found.time_limit_seconds is not None and wanted is not None and found.time_limit_seconds < wanted:
        allowed = sp.format_time_limit(found.time_limit_seconds)
        return (f"partition {settings.partition!r} of slot {slot} allows {allowed}, less than our "
                f"--time={sp.format_time_limit(wanted)} (running_case_timeout_hours + kill_grace_seconds + "
                f"{TIME_LIMIT_MARGIN_SECONDS} s): jobs would wait for ever")
    return ""


def _submit_failure(error: RemoteError, label: str, workdir: str) -> RemoteFailure:
    """What a failed SUBMIT_SCRIPT means: a refusal, an outage, an uncertain submit, or a SlurmError.

    Each says in a few words what failed (``sbatch failed (exit 1: Slurm controller
    unreachable): sbatch: error: ...``), never the script.
    """
    refusal = submit_refusal(error, label, workdir)
    if refusal is not error:
        return refusal
    slurm = sp.SlurmError.from_remote_error(error)
    if slurm.kind in _OUTAGE_KINDS:
        slurm = SlurmOutage(slurm.argv, slurm.exit_code, slurm.stderr, slurm.stdout)
    meaning = "; ".join(filter(None, (SUBMIT_EXIT_MEANINGS.get(error.exit_code), slurm.kind.meaning)))
    text = failure_text(WORDS.submit, slurm, meaning)
    if answer_lost(error) or (error.exit_code not in _BEFORE_SBATCH_EXITS and slurm.kind.submit_may_have_landed):
        return SubmitUncertain(f"{text}; the job may have been made: looking for {label}")
    # The HPC's system ran short (disk, processes: ``shared.remote`` said so): that passes.
    return with_text(error if isinstance(error, ResourceShortage) else slurm, text)


SUBMIT_BATCH = BatchScript(shell="sh", script=SUBMIT_SCRIPT, words=WORDS, read_id=sp.parse_sbatch,
                           failure=_submit_failure)


# -- mqic doctor --------------------------------------------------------------------------------------

def doctor_checks(config, host, runner: Runner) -> list[Check]:
    """sbatch answers with its version; every slot's partition exists and allows our time limit."""
    backend = SlurmBackend.from_config(config, host, runner)
    slurm = host.slot_config
    bin_dir = key_name(config, host, "bin_dir", "slurm")
    where = f"{bin_dir} is {slurm.bin_dir}" if slurm.bin_dir else f"set {bin_dir} if they are not on the PATH"
    slots = ", ".join(f"{p.name} -> {p.partition}" for p in slurm.partitions)

    def partitions() -> str:
        backend.ensure_slots({slot.name: slot.parallel for slot in host.slots})
        return slots

    return [attempt("slurm", lambda: f"sbatch {backend.version()}",
                    f"install the Slurm client commands (sbatch, squeue, scancel, sinfo) on the HPC; {where}"),
            attempt("slurm partitions", partitions,
                    f"fix {key_name(config, host, 'partitions', 'slurm')} (sinfo lists the"
                    f" partitions) or lower main_loop.running_case_timeout_hours")]


# -- its part of the config ------------------------------------------------------------------------

SLURM_WORD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+=-]{0,127}$")


def slurm_word(value: Any) -> str:
    if not isinstance(value, str) or not SLURM_WORD.match(value):
        raise bad(value, "one word of letters, digits and _ . : + = -")
    return value


def sbatch_lines(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
        raise bad(value, "a list of options such as --mem=16G")
    for line in value:
        try:
            sp.sbatch_line(line)
        except ValueError:
            raise bad(line, "one sbatch option such as --mem=16G or '#SBATCH --cpus-per-task=4'") from None
    return tuple(value)


def hpc_folder(value: Any) -> str:
    if value is None:
        return ""
    if not text(value).startswith("/"):
        raise bad(value, "an absolute folder on the HPC")
    return value


@dataclass(frozen=True, kw_only=True)
class PartitionConfig:
    """One slot of ours on a Slurm cluster: the partition its jobs go to, and how."""
    name: str
    partition: str = setting(slurm_word, help="the partition its jobs go to (several slots may name the same one)")
    account: str | None = setting(optional(slurm_word), None, "`sbatch --account`")
    qos: str | None = setting(optional(slurm_word), None, "`sbatch --qos`")
    gres: str | None = setting(optional(slurm_word), None, "`sbatch --gres`, e.g. `gpu:1`")
    extra_sbatch: tuple[str, ...] = setting(
        sbatch_lines, [], "more `sbatch` options, one per item, such as `--mem=16G` (a leading `#SBATCH` is accepted)")
    depth: int = setting(number(minimum=1, integer=True), 1,
                         "how many of our cases the slot holds at a time, running or pending in Slurm's queue")


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    """A Slurm host's slots (the ``slurm`` section, or the ``partitions`` and ``bin_dir`` of a ``hosts`` entry)."""
    partitions: tuple[PartitionConfig, ...] = setting(
        Entries(PartitionConfig, "slot name", NAME, "a mapping of slot names to partition settings, e.g. "
                                                    "{gpu_a: {partition: gpu, gres: 'gpu:1'}}"),
        None, "our slots by name, e.g. `{gpu_a: {partition: gpu, gres: 'gpu:1'}}`; every value a single word of "
              "letters, digits, `_ . : + = -`. Refused with `hpc.backend: pueue` and with `hosts:`",
        shown="required with `hpc.backend: slurm`")
    bin_dir: str = setting(hpc_folder, None, "absolute folder of `sbatch`, `squeue`, `scancel`, `sinfo` on the HPC",
                           shown="none (the PATH)")

    def slots(self) -> tuple[SlotConfig, ...]:
        return tuple(SlotConfig(name=p.name, gres=p.gres, depth=p.depth) for p in self.partitions)


PARTITIONS = SlotKeys(section="slurm", keys=SlurmConfig, noun="Slurm")

SCHEDULER = Scheduler(
    name="slurm", words=WORDS, build=SlurmBackend.from_config, doctor_checks=doctor_checks,
    check_names=("slurm", "slurm partitions"),
    slot_keys=PARTITIONS,
    pauses_slots=False,   # Slurm never pauses a partition of ours by itself
    gpus_visible=False,   # jobs run on compute nodes: the login session sees none of their GPUs
)
