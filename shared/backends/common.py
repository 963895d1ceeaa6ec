"""What every backend's remote calls share, so that each rule lives in one place.

- The HPC's clock: a listing (``pueue status``, ``squeue``) is preceded by the line
  ``mqic-clock <epoch>`` from the same remote call, so task times are compared on the
  HPC's own clock.
- The idempotent submit: a shell prelude that takes a lock per label on the HPC
  (``<parent of workdir>/.mqic-locks/<label>.lock``) and checks the working directory;
  each backend's submit script goes on from there (check the label, add the task with
  its client killed after ``limit`` seconds). Its exit codes become typed refusals.
- The batch: several submits in ONE remote call (``run_batch``). Each item runs its
  backend's submit script as today, in order, and its answer comes back as one record set
  off by a marker drawn fresh for the call; an item without a whole record is uncertain.
- A case's progress, read from its output whatever the scheduler (``parse_progress``).
"""
from __future__ import annotations

import re
import secrets
import shlex
from dataclasses import dataclass
from typing import Callable, Sequence

from shared.backends.model import Runner, SubmitOutcome, Words
from shared.errors import (AlreadySubmitted, BadOutput, RemoteError, RemoteFailure, SchedulerOutage,
                           SubmitLockBusy, SubmitUncertain, WorkdirMissing)
from shared.remote import remote_error

CLOCK_PREFIX = "mqic-clock "
CLOCKED = 'printf \'%s%s\\n\' "$1" "$(date +%s)"; shift; exec "$@"'

# The locked submit's own exit codes; the scripts get them through ``with_exit_codes``.
LOCK_BUSY_EXIT = 85
WORKDIR_MISSING_EXIT = 86
LABEL_EXISTS_EXIT = 87
LOOKUP_FAILED_EXIT = 88
PREPARE_FAILED_EXIT = 89
NOT_STARTED_EXIT = 90  # a batch's item not started: the batch's time to start items had run out
OWN_255_EXIT = 254  # the command's own exit 255, moved off ssh's 255 ("unreachable")
_EXIT_CODES = {
    "LOCK_BUSY_EXIT": LOCK_BUSY_EXIT, "WORKDIR_MISSING_EXIT": WORKDIR_MISSING_EXIT,
    "LABEL_EXISTS_EXIT": LABEL_EXISTS_EXIT, "LOOKUP_FAILED_EXIT": LOOKUP_FAILED_EXIT,
    "PREPARE_FAILED_EXIT": PREPARE_FAILED_EXIT, "NOT_STARTED_EXIT": NOT_STARTED_EXIT,
    "OWN_255_EXIT": OWN_255_EXIT,
}
_EXIT_PLACEHOLDER = re.compile(r"@([A-Z0-9_]+_EXIT)@")
DEFAULT_PROGRESS_PATTERN = r"Generating particles for \((?P<done>\d+) of (?P<total>\d+) batches\)"
LOCK_FOLDER = ".mqic-locks"
SAFE_LABEL = re.compile(r"[A-Za-z0-9_.-]+")



def with_exit_codes(script: str) -> str:
    """``script`` with each ``@NAME_EXIT@`` replaced by that exit code (KeyError for an unknown name)."""
    return _EXIT_PLACEHOLDER.sub(lambda match: str(_EXIT_CODES[match[1]]), script)


# Expects $label, $limit, $workdir and $need_dir set by the script it starts.
LOCKED_SUBMIT_PRELUDE = with_exit_codes(r"""
lockdir=${workdir%/*}/LOCKS
mkdir -p -- "$lockdir" || exit @PREPARE_FAILED_EXIT@
first=0; (set -C; : > "$lockdir/$label.lock") 2>/dev/null && first=1
exec 9>>"$lockdir/$label.lock" || exit @PREPARE_FAILED_EXIT@
flock -w "$limit" 9 || { echo "another submission of $label holds its lock" >&2; exit @LOCK_BUSY_EXIT@; }
[ "$need_dir" = 0 ] || [ -d "$workdir" ] || exit @WORKDIR_MISSING_EXIT@
""").replace("LOCKS", LOCK_FOLDER)

_EXCERPT_CHARS = 200
_LINE_CHARS = 300
# What the locked submit's own exit codes mean (85-87 become typed refusals).
SUBMIT_EXIT_MEANINGS = {
    LOOKUP_FAILED_EXIT: "the look for an earlier task of the case failed",
    PREPARE_FAILED_EXIT: "the submit could not be prepared on the HPC (lock folder, environment or job script)",
    137: "killed after the command timeout",
    OWN_255_EXIT: "the command itself exited 255",
}


def split_clock(text: str, what: str) -> tuple[float, str]:
    """``mqic-clock <epoch>`` on the first line: (the HPC's epoch, the rest); BadOutput otherwise."""
    first, _, rest = (text or "").partition("\n")
    value = first[len(CLOCK_PREFIX):].strip()
    if not first.startswith(CLOCK_PREFIX) or not value.isdigit():
        excerpt = (text or "").strip()[:_EXCERPT_CHARS]
        raise BadOutput(f"{what}: expected the HPC clock first, got {excerpt!r}")
    return float(value), rest


def checked_label(label: str) -> str:
    """``label`` if the submit scripts can match it exactly (letters, digits, ``_ . -``); else ValueError."""
    if not SAFE_LABEL.fullmatch(label or ""):
        raise ValueError(f"label must be letters, digits, '_', '.', '-': {label!r}")
    return label


def add_lands_within(timeout: float) -> float:
    """Seconds after sending a submit (a batch of them) by which each add has landed or never will.

    The remote login may start the batch up to ``timeout`` late; no item starts later than
    ``timeout`` after the batch began (``BATCH_SCRIPT``); an item's lock wait and its killed
    client each last at most ``timeout``; 10 s cover the scheduler's own handling.
    """
    return 4 * timeout + 10


def submit_refusal(error: RemoteError, label: str, workdir: str) -> RemoteFailure:
    """The typed refusal for an exit code of the locked submit, else ``error`` itself."""
    if error.exit_code == WORKDIR_MISSING_EXIT:
        return WorkdirMissing(f"working directory {workdir} does not exist on the HPC")
    if error.exit_code == LABEL_EXISTS_EXIT:
        return AlreadySubmitted(f"a task labelled {label} already exists on the HPC")
    if error.exit_code == LOCK_BUSY_EXIT:
        return SubmitLockBusy(f"another submission of {label} is still in flight on the HPC")
    return error


def answer_lost(error: RemoteError) -> bool:
    """True when a submit's client ended by a signal (exit > 128: killed after ``limit``, or its
    own 255 moved to 254): it cannot tell whether the scheduler took the request."""
    return error.exit_code > 128


def first_line(text: str) -> str:
    """The first line of ``text`` that is not blank, stripped and cut short ("" if none).

    A heading such as pueue's ``Error:`` takes the line it introduces with it.
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines or [""])[0]
    return line if len(line) <= _LINE_CHARS else line[:_LINE_CHARS] + "..."


def failure_text(what: str, error: RemoteError, meaning: str = "") -> str:
    """``<what> failed (exit N: meaning): <first line of stderr>``: a failure in a few words.

    Never the argv: a submit's argv holds a whole script, which says nothing to an operator.
    """
    meaning = meaning or SUBMIT_EXIT_MEANINGS.get(error.exit_code, "")
    said = first_line(error.stderr) or first_line(error.stdout)
    return f"{what} failed (exit {error.exit_code}{': ' + meaning if meaning else ''})" + (f": {said}" if said else "")


def with_text(error: RemoteFailure, text: str) -> RemoteFailure:
    """``error`` itself, its message replaced by ``text`` (argv, exit code and stderr are kept)."""
    error.args = (text,)
    return error


def parse_progress(output: str, pattern: str | re.Pattern[str] = DEFAULT_PROGRESS_PATTERN) -> float | None:
    """Percent done (100*done/total) from the newest match of ``pattern`` in a task's output.

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


# -- batches: several submits in ONE remote call -----------------------------------------------------



@dataclass(frozen=True)
class ItemCall:
    """One item as the batch sends it: the words its backend's submit script takes (after ``$0``)."""

    label: str
    workdir: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class ItemAnswer:
    """What one item's submit script said: its exit code, stdout and stderr."""

    code: int
    stdout: str
    stderr: str


# $1 the marker, $2 the limit, $3 the shell, $4 the submit script; then for each item its word
# count and its words. Each item runs the script in a shell of its own (its lock is released
# when it ends), in order, and prints one record: <M>S<index><M><stderr><M><stdout><M><exit><M>
# and a newline. The head is printed before the item starts, the exit after it ended, so a
# record cut short is an item that may have run. No item starts ``limit`` seconds or more after
# the batch began (``add_lands_within``): it gets NOT_STARTED_EXIT instead. The item's words are
# its first ``n`` words, copied onto the end of the list then shifted off the front (no eval).
BATCH_SCRIPT = with_exit_codes(r"""
mark=$1 limit=$2 shell=$3 script=$4; shift 4
MQIC_BATCH_CACHE=$(mktemp "${TMPDIR:-/tmp}/mqic-batch.XXXXXX" 2>/dev/null) || MQIC_BATCH_CACHE=
export MQIC_BATCH_CACHE
trap '[ -z "$MQIC_BATCH_CACHE" ] || rm -f -- "$MQIC_BATCH_CACHE"' EXIT
cutoff=$(( $(date +%s) + limit )) index=0
item() {
  _n=$1 _i=0; shift
  for _w; do [ "$_i" -lt "$_n" ] && set -- "$@" "$_w"; _i=$((_i + 1)); done
  shift "$_i"
  exec "$shell" -c "$script" "$shell" "$@"
}
while [ $# -gt 0 ]; do
  n=$1; shift
  case $n in ''|*[!0-9]*) exit @PREPARE_FAILED_EXIT@;; esac
  [ "$n" -le $# ] || exit @PREPARE_FAILED_EXIT@
  printf '%sS%s%s' "$mark" "$index" "$mark"
  if [ "$index" -gt 0 ] && [ "$(date +%s)" -ge "$cutoff" ]; then
    out= code=@NOT_STARTED_EXIT@
  else
    { out=$(item "$n" "$@" 2>&3 3>&-); code=$?; } 3>&1
  fi
  printf '%s%s%s%s%s\n' "$mark" "$out" "$mark" "$code" "$mark"
  shift "$n"
  index=$((index + 1))
done
exit 0
""")
# One remote command line: sshd hands it to the login shell as ONE argument (Linux takes at most
# 128 KiB there), so a batch is refused above this many characters of quoted words.
MAX_BATCH_CHARS = 100_000
_RECORD_TOKENS = 5  # S<index>, stderr, stdout, exit code, what follows the closing marker


def fresh_mark() -> str:
    """A marker no remote output can know: drawn fresh for each call."""
    return f"~mqic-batch-{secrets.token_hex(12)}~"


def batch_argv(mark: str, limit: str, shell: str, script: str, calls: Sequence[ItemCall]) -> list[str]:
    """The argv of ONE remote call that runs ``script`` (with ``shell``) once per item, in order.

    ValueError when the whole command line would be longer than ``MAX_BATCH_CHARS``.
    """
    words = [word for call in calls for word in (str(len(call.words)), *call.words)]
    argv = ["sh", "-c", BATCH_SCRIPT, "sh", mark, limit, shell, script, *words]
    size = sum(len(shlex.quote(word)) + 1 for word in argv)
    if size > MAX_BATCH_CHARS:
        raise ValueError(f"a batch of {len(calls)} submits is {size} characters, more than one remote command "
                         f"line takes ({MAX_BATCH_CHARS}): submit fewer at once")
    return argv


def parse_batch(text: str, mark: str) -> dict[int, ItemAnswer]:
    """The whole records of BATCH_SCRIPT's answer, by item index, in order from 0.

    A record cut short (no closing marker after its exit code), and everything after a
    record that does not fit, are left out: those items are uncertain. Whatever an item
    printed stays inside its own record: without the marker, no text can end it.
    """
    found: dict[int, ItemAnswer] = {}
    _head, *tokens = (text or "").split(mark)
    for start in range(0, len(tokens) - _RECORD_TOKENS + 1, _RECORD_TOKENS):
        tag, stderr, stdout, code, after = tokens[start:start + _RECORD_TOKENS]
        if tag != f"S{len(found)}" or not code.isdigit() or after.strip():
            break
        found[len(found)] = ItemAnswer(int(code), stdout, stderr)
    return found


# The script of an item that is one plain command: its words are the command's argv.
EXEC_ITEM = 'exec "$@"'


def run_each(runner: Runner, commands: Sequence[Sequence[str]], *, timeout: float | None) -> list[ItemAnswer]:
    """Run each command (an argv) in turn in ONE remote call (``BATCH_SCRIPT``); the answer of each.

    For commands that are safe to send again (making sure of a slot): when the call failed or its
    answer was cut short before every command had its record, that failure is raised (a
    ``SchedulerOutage`` for a command the batch no longer started), so the caller asks again."""
    if not commands:
        return []
    limit = str(max(1, int(timeout or 60)))
    mark = fresh_mark()
    calls = [ItemCall("", "", tuple(str(word) for word in command)) for command in commands]
    text = runner.run(batch_argv(mark, limit, "sh", EXEC_ITEM, calls), timeout=batch_timeout(timeout, len(calls)))
    answers = parse_batch(text, mark)
    if len(answers) < len(commands):
        raise BadOutput(f"the answer to {len(commands)} commands in one call was cut short after {len(answers)}")
    for command, answer in zip(commands, answers.values()):
        if answer.code == NOT_STARTED_EXIT:
            said = f"not sent: the call had used its {limit} s before this command's turn"
            raise with_text(SchedulerOutage(list(command), answer.code, said), said)
    return list(answers.values())


def item_error(argv: Sequence[str], answer: ItemAnswer) -> RemoteError:
    """The failure of one item as the runner would have raised it for a call of its own."""
    # The OS's words ("No space left on device") are read in one place: the remote layer.
    return remote_error(list(argv), answer.code, answer.stderr, answer.stdout)


@dataclass(frozen=True)
class BatchScript:
    """How a backend submits one item: the shell and script each item runs, how its answer reads."""

    shell: str
    script: str
    words: Words
    read_id: Callable[[str], int]                            # the id in a good item's stdout, or BadOutput
    failure: Callable[[RemoteError, str, str], RemoteFailure]  # (error, label, workdir): the typed failure


def run_batch(runner: Runner, how: BatchScript, calls: Sequence[ItemCall], *, limit: str,
              timeout: float | None) -> list[SubmitOutcome]:
    """Submit every item in ONE runner call; one outcome per item, in order.

    An item with a whole record is certain: its id, or the typed failure its own submit
    would have raised. Items without one (the call failed, its answer was lost or cut)
    are ``SubmitUncertain``: recovery finds each by its label. No call for no items.
    """
    if not calls:
        return []
    mark = fresh_mark()
    argv = batch_argv(mark, limit, how.shell, how.script, calls)
    failed: RemoteFailure | None = None
    try:
        text = runner.run(argv, timeout=batch_timeout(timeout, len(calls)))
    except RemoteError as error:  # the batch itself ended badly: the records it printed still count
        failed, text = error, error.stdout
    except RemoteFailure as error:
        failed, text = error, ""
    answers = parse_batch(text, mark)
    return [_outcome(how, call, answers.get(index), failed, int(limit)) for index, call in enumerate(calls)]


def batch_timeout(timeout: float | None, count: int) -> float | None:
    """The runner's limit for a batch of ``count``: one item as one submit; more may take up to
    the start cutoff plus the last item's lock wait and add (``BATCH_SCRIPT``)."""
    if count <= 1 or timeout is None:
        return timeout
    return 3 * timeout + 10


def _outcome(how: BatchScript, call: ItemCall, answer: ItemAnswer | None, failed: RemoteFailure | None,
             limit: int) -> SubmitOutcome:
    if answer is None:
        why = f"no answer for it ({_call_failure(failed)})" if failed is not None else "its answer was cut short"
        uncertain = SubmitUncertain(f"{how.words.submit}: {why}; the {how.words.task} may have been made: "
                                    f"looking for {call.label}")
        uncertain.__cause__ = failed
        return uncertain
    argv = [how.shell, "-c", how.script, how.shell, *call.words]
    if answer.code == NOT_STARTED_EXIT:
        said = f"{how.words.submit} not sent: the batch had used its {limit} s to start submits before this one's turn"
        return with_text(SchedulerOutage(argv, answer.code, said), said)
    if answer.code != 0:
        return how.failure(item_error(argv, answer), call.label, call.workdir)
    try:
        return how.read_id(answer.stdout)
    except BadOutput as error:
        return error


def _call_failure(error: RemoteFailure) -> str:
    """How the batch call itself failed, in a few words (never its script)."""
    if isinstance(error, RemoteError):
        said = first_line(error.stderr) or first_line(error.stdout)
        return f"the batch exited {error.exit_code}" + (f": {said}" if said else "")
    return first_line(str(error))


def settled(outcome: SubmitOutcome) -> int:
    """The task id of an outcome; its failure raised."""
    if isinstance(outcome, RemoteFailure):
        raise outcome
    return outcome
