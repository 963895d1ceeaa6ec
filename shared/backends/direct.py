"""No scheduler at all: each case runs straight on the GPU box we log into, one per GPU.

For the small clinic with one GPU box and nothing installed on it but bash and util-linux
(``flock``, ``setsid``). Slots are configured like pueue groups (``groups: {gpu0: {gpu: 0}}``);
a slot runs one task at a time, the next one waits for it (a flock on the slot's lock file).

Everything lives in a state folder of ours alone on the host, ``<remote_base_dir>/.mqic-direct/``::

    lock              the state lock: submit and remove hold it, a snapshot shares it
    next_id           the next task id (ids are never reused)
    slots/<slot>.lock held by the task running in the slot (and inherited by its processes)
    tasks/<id>/       one task: label, slot, workdir, command, enqueued, boot (the host's
                      boot id), runner (its pid), started/ (who may start it: the runner or
                      a remove, whoever makes it first), pgid, start, exit, end, output

``submit_batch`` is ONE ssh call for several tasks (``common.run_batch``; ``submit`` is its batch
of one); for each, in turn: the per-label lock and workdir check of
``common.LOCKED_SUBMIT_PRELUDE``, the refusal of a label that already has a task, the id,
the record, and a runner started with ``setsid`` (it outlives the ssh connection). The
runner waits for the slot, starts the (already wrapped) command in its own process group
in the workdir with the case's variables, stamps its start, waits, and stamps its end: the
exit code, ``signal`` when the group was signalled (no exit was recorded), ``spawn`` when
the workdir was gone. ``snapshot`` lists every record with the HPC's clock; a task whose
runner and process group are both gone without an end stamp (a reboot, a kill of
everything) is left out, so that ``shared.tasks`` reads its exit record, as for a task a
scheduler forgot: never "failed" by guess. An ended task's record is dropped by the first
submit a day after its end (``ENDED_KEPT_SECONDS``); its exit record stays in its folder.

What it does not do: no fair order among tasks waiting for one slot (flock's), no
``parallel`` above 1, no pausing, no resource limits.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Sequence

from shared.backends import Scheduler
from shared.backends.pueue import GROUPS
from shared.backends.common import (CLOCK_PREFIX, LOCKED_SUBMIT_PRELUDE, BatchScript, ItemCall, add_lands_within,
                                    checked_label, failure_text, run_batch, settled, split_clock, submit_refusal,
                                    with_exit_codes, with_text)
from shared.backends.model import KillResult, Runner, Snapshot, SubmitItem, SubmitOutcome, TaskInfo, TaskState, Words
from shared.checks import Check, attempt
from shared.errors import BadOutput, RemoteError, RemoteFailure

STATE_FOLDER = ".mqic-direct"
RUNNER_NAME = "mqic-direct-runner"  # the runner's $0: how a live pid is told from a reused one
WORDS = Words(scheduler="the direct runner", task="task", submit="direct start", status="direct task list",
              logs="direct task output", stop="kill",
              killed_by_others="killed by a signal we did not send (another user or process)")
# An ended task's record is kept this long, then the next submit drops it (a snapshot stays
# short); what became of it is in the exit record in its case folder, as for a job Slurm forgot.
ENDED_KEPT_SECONDS = 24 * 3600
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIELDS = ("label", "slot", "workdir", "enqueued", "start", "end", "live")

# Every script starts here: $1 is remote_base_dir ("~" expanded here), $2 the lock wait.
# ``alive DIR``: its runner (this boot, still our runner) or its process group still lives;
# ``runner_alive`` and ``group_alive`` leave the pid they read in $r and $g.
_PROLOGUE = r"""
base=$1 limit=$2; shift 2
case $base in "~") base=$HOME;; "~/"*) base=$HOME/${base#"~/"};; esac
S=$base/STATE
boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)
slurp() { REPLY=; IFS= read -r -d '' REPLY < "$1"; } 2>/dev/null   # a whole file, without a fork
this_boot() { slurp "$1/boot"; [ "$REPLY" = "$boot" ]; }
runner_alive() {
  slurp "$1/runner"; r=$REPLY
  [ -n "$r" ] && this_boot "$1" && kill -0 "$r" 2>/dev/null &&
    { [ ! -r "/proc/$r/cmdline" ] || tr '\0' '\n' < "/proc/$r/cmdline" | grep -qx RUNNER; }
}
group_alive() { slurp "$1/pgid"; g=$REPLY; [ -n "$g" ] && this_boot "$1" && kill -0 -- "-$g" 2>/dev/null; }
alive() { runner_alive "$1" || group_alive "$1"; }
state_lock() { mkdir -p -- "$S" && exec 8>>"$S/lock" && flock "$@" -w "$limit" 8; }
""".replace("STATE", STATE_FOLDER).replace("RUNNER", RUNNER_NAME)

# Runs in its own session (setsid), outside the task's process group, so that a signal
# to the task leaves it alive to say so. The slot's lock (fd 9) is inherited by the task.
RUNNER_SCRIPT = r"""
dir=$1 lockfile=$2 workdir=$3 command=$4; shift 4
stamp() { printf '%s' "$2" > "$dir/$1.part" && mv -f -- "$dir/$1.part" "$dir/$1"; }
exec 9>>"$lockfile" && flock 9 || exit 1
mkdir -- "$dir/started" 2>/dev/null || exit 0   # removed while it waited
cd -- "$workdir" 2>/dev/null || { stamp end "$(date +%s) spawn"; exit 0; }
setsid bash -c '"$@"; echo "$?" > "$0"' "$dir/exit" env "$@" sh -c "$command" </dev/null >>"$dir/output" 2>&1 &
group=$!
stamp pgid "$group"
stamp start "$(date +%s)"
wait "$group"
status=signal
[ -s "$dir/exit" ] && status=$(cat -- "$dir/exit")
stamp end "$(date +%s) $status"
"""

# $1.. after the prologue: label workdir need_dir slot command runner-script, then NAME=value words.
SUBMIT_SCRIPT = with_exit_codes(_PROLOGUE + r"""
label=$1 workdir=$2 need_dir=$3 slot=$4 command=$5 runner=$6; shift 6""" + LOCKED_SUBMIT_PRELUDE.rstrip("\n") + r"""
mkdir -p -- "$S/tasks" "$S/slots" || exit @PREPARE_FAILED_EXIT@
state_lock || { echo "the state lock of $S stayed busy" >&2; exit @LOCK_BUSY_EXIT@; }
rm -rf -- "$S"/tasks/.new-*   # a submit cut short while it wrote its record
old=$(( $(date +%s) - KEPT ))
for d in "$S"/tasks/*/; do
  d=${d%/}
  [ -d "$d" ] || continue
  if [ -f "$d/end" ]; then   # ended long ago: dropped (the exit record in its folder outlives it)
    slurp "$d/end"
    case ${REPLY%% *} in ''|*[!0-9]*) ;; *) [ "${REPLY%% *}" -ge "$old" ] || { rm -rf -- "$d"; continue; };; esac
  fi
  slurp "$d/label"; [ "$REPLY" = "$label" ] || continue
  if [ -f "$d/end" ] || alive "$d"; then echo "$label already has task ${d##*/}" >&2; exit @LABEL_EXISTS_EXIT@; fi
  rm -rf -- "$d"   # ended without a stamp: not listed, its exit record tells
done
slurp "$S/next_id"; id=${REPLY:-1}
case $id in ''|*[!0-9]*) echo "bad $S/next_id: $id" >&2; exit @PREPARE_FAILED_EXIT@;; esac
new=$S/tasks/.new-$id
{ printf '%s' "$((id + 1))" > "$S/next_id.part" && mv -f -- "$S/next_id.part" "$S/next_id" &&
  rm -rf -- "$new" && mkdir -- "$new" && cd -- "$new" && printf '%s' "$label" > label && printf '%s' "$slot" > slot &&
  printf '%s' "$workdir" > workdir && printf '%s' "$command" > command && printf '%s' "$boot" > boot &&
  date +%s | tr -d '\n' > enqueued && : > output && cd / && mv -- "$new" "$S/tasks/$id"; } || exit @PREPARE_FAILED_EXIT@
setsid bash -c "$runner" RUNNER "$S/tasks/$id" "$S/slots/$slot.lock" "$workdir" "$command" "$@" \
  </dev/null >/dev/null 2>&1 8>&- 9>&- &
printf '%s' "$!" > "$S/tasks/$id/runner"
echo "$id"
""").replace("RUNNER", RUNNER_NAME).replace("KEPT", str(ENDED_KEPT_SECONDS))

# $1 the marker; one record per task: <mark>T<id><mark>label<mark>...<mark>live<mark>
SNAPSHOT_SCRIPT = _PROLOGUE + r"""
mark=$1
printf '%s%s\n' "CLOCK" "$(date +%s)"
[ -d "$S/tasks" ] || exit 0
state_lock -s || { echo "the state lock of $S stayed busy" >&2; exit 1; }
for d in "$S"/tasks/*/; do
  [ -f "$d/label" ] || continue
  d=${d%/}
  if [ -f "$d/end" ]; then live=-; elif alive "$d"; then live=1; else live=0; fi
  printf '%sT%s%s' "$mark" "${d##*/}" "$mark"
  for f in label slot workdir enqueued start end; do slurp "$d/$f"; printf '%s%s' "$REPLY" "$mark"; done
  printf '%s%s\n' "$live" "$mark"
done
""".replace("CLOCK", CLOCK_PREFIX)

# $1 the signal, then ids: "killed <id>" or "failed <id>" for each.
STOP_SCRIPT = _PROLOGUE + r"""
sig=$1; shift
for id; do
  d=$S/tasks/$id
  if [ ! -f "$d/end" ] && group_alive "$d" && kill -s "$sig" -- "-$g" 2>/dev/null
  then echo "killed $id"; else echo "failed $id"; fi
done
"""

# ids: "removed <id>" (never started, ended, or gone) or "failed <id>" (running).
REMOVE_SCRIPT = _PROLOGUE + r"""
[ -d "$S/tasks" ] || { for id; do echo "removed $id"; done; exit 0; }
state_lock || { echo "the state lock of $S stayed busy" >&2; exit 1; }
for id; do
  d=$S/tasks/$id
  if [ ! -d "$d" ]; then echo "removed $id"
  elif mkdir -- "$d/started" 2>/dev/null; then   # it can no longer start: end its waiting runner
    runner_alive "$d" && kill -s TERM -- "-$r" 2>/dev/null
    rm -rf -- "$d"; echo "removed $id"
  elif [ -f "$d/end" ] || ! alive "$d"; then rm -rf -- "$d"; echo "removed $id"
  else echo "failed $id"; fi
done
"""

# $1 the marker, $2 lines, then ids: "<mark> <id>" and the tail of its output.
LOGS_SCRIPT = _PROLOGUE + r"""
mark=$1 lines=$2; shift 2
for id; do
  printf '%s %s\n' "$mark" "$id"
  tail -n "$lines" -- "$S/tasks/$id/output" 2>/dev/null
  echo
done
"""

# Slot names, then: "created <slot>" for each lock file made.
ENSURE_SCRIPT = _PROLOGUE + r"""
mkdir -p -- "$S/tasks" "$S/slots" || exit 1
for slot; do
  [ -e "$S/slots/$slot.lock" ] || { : >> "$S/slots/$slot.lock" && echo "created $slot"; } || exit 1
done
"""

VERSION_SCRIPT = r"""printf '%s\n' "$BASH_VERSION"; command -v flock >/dev/null && command -v setsid >/dev/null ||
  { echo "flock and setsid (util-linux) are needed on the host" >&2; exit 1; }"""


class SlotProblem(RemoteError):
    """A slot the direct backend cannot run: not configured, or ``parallel`` above 1."""

    def __init__(self, message: str):
        super().__init__([], 0, message)
        self.args = (message,)


# -- pure reading of what the scripts print ------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One task record as the snapshot printed it (``live``: "1" alive, "0" gone, "-" ended)."""

    id: int
    label: str
    slot: str
    workdir: str
    enqueued: str
    start: str
    end: str
    live: str


def task_of_record(record: Record) -> TaskInfo | None:
    """The ONE mapping of a record onto our words, or None when only the exit record can tell.

    An end stamp gives the outcome: exit 0 SUCCESS, another code FAILED, ``signal`` KILLED
    (the group was signalled: no exit was recorded), ``spawn`` FAILED_TO_SPAWN. Without
    one, a live runner or group is RUNNING once started, else QUEUED. Neither alive nor an
    end stamp that can be read: left out (None), never "failed" by guess.
    """
    base = dict(id=record.id, label=record.label, group=record.slot, path=record.workdir,
                enqueued_at=_moment(record.enqueued), start=_moment(record.start))
    if record.live == "-":
        ended = _ended(record.end)
        if ended is None:
            return None
        state, exit_code, detail = ended
        return TaskInfo(**base, state=state, exit_code=exit_code, detail=detail,
                        end=_moment(record.end.split(" ", 1)[0]), ended=True)
    if record.live != "1":
        return None
    state = TaskState.RUNNING if base["start"] is not None else TaskState.QUEUED
    return TaskInfo(**base, state=state)


def _ended(end: str) -> tuple[TaskState, int | None, str] | None:
    _, _, status = end.strip().partition(" ")
    if status.isdigit():
        code = int(status)
        return (TaskState.SUCCESS, None, "") if code == 0 else (TaskState.FAILED, code, "")
    if status == "signal":
        return TaskState.KILLED, None, "its process group was ended by a signal"
    if status == "spawn":
        return TaskState.FAILED_TO_SPAWN, None, "its working directory did not exist when its slot came free"
    return None


def _moment(text: str) -> datetime | None:
    text = (text or "").strip()
    return datetime.fromtimestamp(int(text), tz=timezone.utc) if text.isdigit() else None


def parse_records(text: str, mark: str) -> list[Record]:
    """The records of SNAPSHOT_SCRIPT's output (after its clock line); BadOutput if one is cut."""
    records = []
    for chunk in text.split(f"{mark}T")[1:]:
        words = chunk.split(mark)
        if len(words) != len(_FIELDS) + 2 or not words[0].isdigit() or words[-1].strip():
            raise BadOutput(f"direct task list: a record that cannot be read: {chunk[:200]!r}")
        records.append(Record(int(words[0]), *words[1:-1]))
    return records


def parse_snapshot(text: str, mark: str) -> Snapshot:
    """The clock line, then the task records; BadOutput otherwise."""
    hpc_time, rest = split_clock(text, WORDS.status)
    tasks = [task for record in parse_records(rest, mark) if (task := task_of_record(record)) is not None]
    return Snapshot(tasks={task.id: task for task in tasks}, hpc_time=hpc_time)


def parse_acted(text: str, ids: Sequence[int], done_word: str) -> KillResult:
    """``<done_word> <id>`` / ``failed <id>`` lines: what was done; an id not answered is ``failed``."""
    said = dict(reversed(line.split(" ", 1)) for line in text.splitlines() if " " in line)
    return KillResult(killed=tuple(i for i in ids if said.get(str(i)) == done_word),
                      failed=tuple(i for i in ids if said.get(str(i)) != done_word))


def parse_logs(text: str, mark: str) -> dict[int, str]:
    """The output of LOGS_SCRIPT: after each ``<mark> <id>`` line, that task's tail."""
    found: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in (text or "").splitlines():
        head, _, task_id = line.partition(" ")
        if head == mark and task_id.isdigit():
            current = found.setdefault(int(task_id), [])
        elif current is not None:
            current.append(line)
    # LOGS_SCRIPT ends each tail with one newline of its own.
    return {task_id: "\n".join(lines[:-1] if lines and not lines[-1] else lines) for task_id, lines in found.items()}


def checked_env(env: Mapping[str, str]) -> list[str]:
    """``NAME=value`` words for ``env``; ValueError for a name a shell could not export."""
    bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"not environment variable names: {bad!r}")
    return [f"{name}={value}" for name, value in env.items()]


def _mark() -> str:
    return f"--mqic-direct-{uuid.uuid4().hex}--"


# -- the backend ------------------------------------------------------------------------------

class DirectBackend:
    """The ``Backend`` for a box without a scheduler: each slot is one GPU, one task at a time."""

    kind = "direct"
    words = WORDS
    gpus_visible = True  # tasks run on the host we log into: nvidia-smi there sees their GPUs (shared.gpus)

    def __init__(self, runner: Runner, base_dir: str, slots: Mapping[str, str | None], timeout: float):
        self.runner, self.base_dir, self.slots, self.timeout = runner, base_dir, dict(slots), timeout

    @classmethod
    def from_config(cls, config, host, runner: Runner) -> DirectBackend:
        return cls(runner, host.hpc.remote_base_dir, {group.name: group.gpu for group in host.slot_config.groups},
                   host.hpc.command_timeout_seconds)

    def _run(self, script: str, *args: str) -> str:
        limit = str(max(1, int(self.timeout)))
        return self.runner.run(["bash", "-c", script, "bash", self.base_dir, limit, *args], timeout=self.timeout)

    def snapshot(self) -> Snapshot:
        """Every task of our state folder and the HPC's clock, in ONE call."""
        mark = _mark()
        return parse_snapshot(self._run(SNAPSHOT_SCRIPT, mark), mark)

    def submit(self, *, slot: str, label: str, workdir: str, command: str, env: Mapping[str, str],
               require_workdir: bool = False) -> int:
        """One task per label, in ONE call (see SUBMIT_SCRIPT); the task id: the batch of one.

        ``CUDA_VISIBLE_DEVICES`` comes from the slot's ``gpu`` unless ``env`` sets it.
        """
        item = SubmitItem(slot=slot, label=label, workdir=workdir, command=command, env=env,
                          require_workdir=require_workdir)
        return settled(self.submit_batch([item])[0])

    def submit_batch(self, items: Sequence[SubmitItem]) -> list[SubmitOutcome]:
        """SUBMIT_SCRIPT for each item in order, in ONE call: one outcome per item. ValueError, before
        anything is sent, for a slot that is not configured or a variable name bash cannot export."""
        limit = str(max(1, int(self.timeout)))
        calls = [ItemCall(item.label, item.workdir, self._submit_words(item, limit)) for item in items]
        return run_batch(self.runner, SUBMIT_BATCH, calls, limit=limit, timeout=self.timeout)

    def _submit_words(self, item: SubmitItem, limit: str) -> tuple[str, ...]:
        """SUBMIT_SCRIPT's words for one item (after ``$0``), its prologue's first."""
        checked_label(item.label)
        if item.slot not in self.slots:
            raise ValueError(f"no direct slot is configured as {item.slot!r}")
        gpu = self.slots[item.slot]
        words = checked_env({**({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}), **item.env})
        return (self.base_dir, limit, item.label, item.workdir, str(int(item.require_workdir)), item.slot,
                item.command, RUNNER_SCRIPT, *words)

    def add_lands_within(self) -> float:
        return add_lands_within(self.timeout)

    def logs(self, tasks: Sequence[TaskInfo], lines: int) -> dict[int, str]:
        """The tail of each task's output in ONE call ("" for a task without one)."""
        if lines < 1:
            raise ValueError(f"lines must be at least 1, got {lines}")
        if not tasks:
            return {}
        mark = _mark()
        found = parse_logs(self._run(LOGS_SCRIPT, mark, str(lines), *(str(t.id) for t in tasks)), mark)
        return {task.id: found.get(task.id, "") for task in tasks}

    def stop(self, task_ids: Sequence[int], *, gently: bool) -> KillResult:
        """SIGTERM (``gently``) or SIGKILL to each running task's process group; others are ``failed``."""
        ids = _checked_ids(task_ids)
        return parse_acted(self._run(STOP_SCRIPT, "TERM" if gently else "KILL", *map(str, ids)), ids, "killed")

    def remove(self, task_ids: Sequence[int]) -> KillResult:
        """Drop waiting (their runner ends) and ended tasks; a running one comes back in ``failed``."""
        ids = _checked_ids(task_ids)
        return parse_acted(self._run(REMOVE_SCRIPT, *map(str, ids)), ids, "removed")

    def ensure_slots(self, wanted: Mapping[str, int]) -> list[str]:
        """Create the state folder and each slot's lock file where missing; the slots created."""
        for slot, parallel in wanted.items():
            if slot not in self.slots:
                raise SlotProblem(f"slot {slot!r} is not configured for this direct host")
            if parallel != 1:
                raise SlotProblem(f"slot {slot}: parallel {parallel}, but a direct slot runs one task at a time "
                                  f"(give each GPU its own slot)")
        out = self._run(ENSURE_SCRIPT, *wanted)
        return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("created ")]

    def resume_slot(self, slot: str) -> None:
        """Nothing to do: nothing pauses a direct slot."""

    def version(self) -> str:
        """bash's version on the host (flock and setsid checked), e.g. "5.2.15(1)-release (bash, direct)"."""
        out = self.runner.run(["bash", "-c", VERSION_SCRIPT], timeout=self.timeout).strip()
        if not out or not out[0].isdigit():
            raise BadOutput(f"direct: expected bash's version, got {out[:200]!r}")
        return f"{out.splitlines()[0]} (bash, direct: no scheduler)"


def read_task_id(out: str) -> int:
    """The id SUBMIT_SCRIPT prints last; BadOutput otherwise."""
    task_id = out.strip().splitlines()[-1] if out.strip() else ""
    if not task_id.isdigit():
        raise BadOutput(f"{WORDS.submit}: expected the task id, got {out[-200:]!r}")
    return int(task_id)


def _submit_failure(error: RemoteError, label: str, workdir: str) -> RemoteFailure:
    """What a failed SUBMIT_SCRIPT means: a refusal, else the error said in a few words."""
    refusal = submit_refusal(error, label, workdir)
    return refusal if refusal is not error else with_text(error, failure_text(WORDS.submit, error))


SUBMIT_BATCH = BatchScript(shell="bash", script=SUBMIT_SCRIPT, words=WORDS, read_id=read_task_id,
                           failure=_submit_failure)


def _checked_ids(task_ids: Sequence[int]) -> list[int]:
    """Distinct ids in order; ValueError for none or anything that is not a non-negative int."""
    bad = [i for i in task_ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad or not task_ids:
        raise ValueError(f"not task ids: {bad or 'none given'!r}")
    return list(dict.fromkeys(task_ids))


# -- mqic doctor --------------------------------------------------------------------------------------

def doctor_checks(config, host, runner: Runner) -> list[Check]:
    """bash, flock and setsid answer; the state folder and every slot's lock file exist (made if missing)."""
    backend = DirectBackend.from_config(config, host, runner)

    def slots() -> str:
        made = backend.ensure_slots({slot.name: slot.parallel for slot in host.slots})
        names = ", ".join(slot.name for slot in host.slots)
        return f"{names} (made now: {', '.join(made)})" if made else names

    return [attempt("direct", backend.version, "the host needs bash and util-linux (flock, setsid) on the PATH"),
            attempt("direct slots", slots, f"check that {backend.base_dir}/{STATE_FOLDER} can be written, and give each"
                                           " GPU its own slot with parallel 1")]


SCHEDULER = Scheduler(
    name="direct", words=WORDS, build=DirectBackend.from_config, doctor_checks=doctor_checks,
    check_names=("direct", "direct slots"),
    slot_keys=GROUPS,    # configured like pueue's groups (``pueue.groups`` or a hosts entry's ``groups``)
    gpus_visible=True,   # tasks run on the host we log into: nvidia-smi there sees their GPUs
)
