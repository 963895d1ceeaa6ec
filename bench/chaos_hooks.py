"""Crash hooks for the chaos run: every worker loads them from ``hooks/sitecustomize.py``.

Stdlib only and no project imports: this runs at interpreter start-up in every worker.
The driver drops token files ``<zone>-<n>`` into a tokens folder; the first worker to reach
that zone takes one (only one process can win the unlink), notes it in ``taken/`` and SIGKILLs
itself, noting the death in ``hits/`` first. A token taken but no death means the worker was
killed by something else in between; a token still there at the end means the zone was armed
but never reached. The driver reports both.
"""
from __future__ import annotations

import os
import random
import re
import signal
import sys
import threading

ZONES = ("before_finalize", "mid_upload", "after_add", "before_move")
SPOOL_STAGES = ("queued", "active", "done", "failed")
UPLOAD_PREFIX = ".mqic-upload-"  # shared.remote.UPLOAD_PREFIX (no project import here)
TRANSFER_PROGRAMS = ("scp", "rsync")


def command_text(argv: list[str]) -> str:
    return " ".join(argv)


def is_upload(argv: list[str]) -> bool:
    """True for the process that copies a case to the HPC, whatever ``hpc.transfer`` is.

    scp and rsync are the copying programs themselves; with ``transfer: tar`` it is the ssh
    that runs ``tar -x`` into the upload folder (the local ``tar -c`` feeding it names no
    remote folder).
    """
    if not argv:
        return False
    text = command_text(argv)
    if os.path.basename(argv[0]) in TRANSFER_PROGRAMS:
        return True
    return UPLOAD_PREFIX in text and "tar " in text and "-x" in text and "rm -rf" not in text


def is_finalize(argv: list[str]) -> bool:
    """The remote call that verifies an upload and renames it into place (it cleans up with rm -rf)."""
    text = command_text(argv)
    return "rm -rf" in text and UPLOAD_PREFIX in text


def is_add(argv: list[str]) -> bool:
    """A ``pueue add`` of one of our cases (plain, or inside a remote script that adds by label)."""
    text = command_text(argv)
    return "--print-task-id" in text or (" add " in text and "mqic_case_" in text)


CASE_WORDS = re.compile(r"mqic_case_(\d+)|\.mqic-upload-(\d+)-")


def cases_in(argv: list[str]) -> int:
    """How many cases one add, upload or finalize call carries (a batch: more than one)."""
    return len({a or b for a, b in CASE_WORDS.findall(command_text(argv))})


def install_crash_hooks(tokens_dir: str, hits_dir: str, taken_dir: str | None = None) -> None:
    """Make this process SIGKILL itself in a danger zone whenever a token for that zone exists.

    Zones, seen through Python audit events:

    - ``before_finalize``: an upload has been copied; the remote verify-and-rename is about to run;
    - ``mid_upload``: a random 5-80 ms after the upload process starts (scp, rsync, or the ssh
      of a tar pipe); the copying child lives on, orphaned. A small case may be copied by then:
      the worker still dies before it goes on, and takes no other zone's token meanwhile;
    - ``after_add``: the spool lock taken right after a ``pueue add`` returned, i.e. before the
      task id is recorded;
    - ``before_move``: a rename into a spool stage, i.e. after the status commit, before the move.
    """
    local = threading.local()  # per thread: another thread inside the hook must not hide our event
    state = {"add_sent": False, "dying": False}

    def take(zone: str) -> bool:
        if state["dying"]:
            return False
        try:
            names = sorted(n for n in os.listdir(tokens_dir) if n.startswith(zone + "-"))
        except OSError:
            return False
        for name in names:
            try:
                os.unlink(os.path.join(tokens_dir, name))
            except OSError:
                continue
            note(taken_dir, zone)
            return True
        return False

    def note(folder: str | None, zone: str, cases: int = 0) -> None:
        if folder is not None:
            with open(os.path.join(folder, f"{zone}-{os.getpid()}-{threading.get_ident()}"), "w") as record:
                record.write(f"cases {cases}\n" + " ".join(sys.argv))

    def die(zone: str, cases: int) -> None:
        note(hits_dir, zone, cases)  # cases: how many the call it died in carried (2+: inside a batch)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_popen(args: tuple) -> None:
        argv = [str(word) for word in (args[1] or [])]
        if is_add(argv):
            state["add_sent"] = True
            local.add_cases = cases_in(argv)
        elif is_finalize(argv) and take("before_finalize"):
            die("before_finalize", cases_in(argv))
        elif is_upload(argv) and take("mid_upload"):
            state["dying"] = True
            threading.Timer(random.uniform(0.005, 0.08), die, args=("mid_upload", cases_in(argv))).start()

    def on_event(event: str, args: tuple) -> None:
        if event == "subprocess.Popen":
            on_popen(args)
        elif event == "open" and state["add_sent"] and str(args[0]).endswith(".spool.lock"):
            state["add_sent"] = False
            if take("after_add"):
                die("after_add", getattr(local, "add_cases", 0))
        elif event == "os.rename" and os.path.basename(os.path.dirname(str(args[1]))) in SPOOL_STAGES:
            if take("before_move"):
                die("before_move", 0)

    def hook(event: str, args: tuple) -> None:
        if getattr(local, "busy", False) or event not in ("subprocess.Popen", "open", "os.rename"):
            return
        local.busy = True
        try:
            on_event(event, args)
        finally:
            local.busy = False

    sys.addaudithook(hook)
