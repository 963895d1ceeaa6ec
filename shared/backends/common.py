"""What every backend's remote calls share, so that each rule lives in one place.

- The HPC's clock: a listing (``pueue status``, ``squeue``) is preceded by the line
  ``mqic-clock <epoch>`` from the same remote call, so task times are compared on the
  HPC's own clock.
- The idempotent submit: a shell prelude that takes a lock per label on the HPC
  (``<parent of workdir>/.mqic-locks/<label>.lock``) and checks the working directory;
  each backend's submit script goes on from there (check the label, add the task with
  its client killed after ``limit`` seconds). Its exit codes become typed refusals.
- A case's progress, read from its output whatever the scheduler (``parse_progress``).
"""
from __future__ import annotations

import re

from shared.errors import (AlreadySubmitted, BadOutput, RemoteError, RemoteFailure, SubmitLockBusy,
                           WorkdirMissing)

CLOCK_PREFIX = "mqic-clock "
CLOCKED = 'printf \'%s%s\\n\' "$1" "$(date +%s)"; shift; exec "$@"'

# The locked submit's own exit codes; the scripts get them through ``with_exit_codes``.
LOCK_BUSY_EXIT = 85
WORKDIR_MISSING_EXIT = 86
LABEL_EXISTS_EXIT = 87
LOOKUP_FAILED_EXIT = 88
PREPARE_FAILED_EXIT = 89
OWN_255_EXIT = 254  # the command's own exit 255, moved off ssh's 255 ("unreachable")
_EXIT_CODES = {
    "LOCK_BUSY_EXIT": LOCK_BUSY_EXIT, "WORKDIR_MISSING_EXIT": WORKDIR_MISSING_EXIT,
    "LABEL_EXISTS_EXIT": LABEL_EXISTS_EXIT, "LOOKUP_FAILED_EXIT": LOOKUP_FAILED_EXIT,
    "PREPARE_FAILED_EXIT": PREPARE_FAILED_EXIT, "OWN_255_EXIT": OWN_255_EXIT,
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
mkdir -p -- "$lockdir" && exec 9>>"$lockdir/$label.lock" || exit @PREPARE_FAILED_EXIT@
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
    """Seconds after sending a submit by which its add has landed or never will.

    The remote login may start the script up to ``timeout`` late, the lock wait and the
    killed client each last at most ``timeout``; 10 s cover the scheduler's own handling.
    """
    return 3 * timeout + 10


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
