"""The only code that touches the results share: run as a child process by ``shared.share``.

A syscall on a hung network share (SMB/NFS hard mount, FUSE) can block for as long as
the server is gone and cannot be interrupted, not even by SIGKILL; a thread stuck like
that would also hold up its process's exit. So every operation on ``deliver_to`` runs
here, in a process of its own that the worker abandons when it stops answering.

Protocol: one JSON request on stdin; a line ``.`` on stdout after every step (the parent
counts it as a sign of life); then one JSON line, ``{"ok": ...}`` or ``{"error": type,
"message": ...}``. Standard library only, so it starts fast. It dies with its parent
(``PR_SET_PDEATHSIG``): a worker killed mid-copy never leaves a copy running on.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

from shared.processes import pid_alive

PARTIAL_PREFIX = ".mqic-partial-"
REPLACED_PREFIX = ".mqic-replaced-"
CHUNK = 1 << 20
PR_SET_PDEATHSIG = 1


class Refused(Exception):
    """The share is there but the step is refused (the message says why)."""

    kind = "DeliveryError"


class NotMounted(Refused):
    kind = "ShareNotMounted"


def alive() -> None:
    sys.stdout.write(".\n")
    sys.stdout.flush()


def die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own kill is the only limit
    if os.getppid() == 1:
        sys.exit(3)  # the parent died before the prctl took


def check_share(request: dict) -> Path:
    """``deliver_to`` must be a folder, and proven to be the share: a mount point or holding the marker."""
    folder = Path(request["deliver_to"])
    if not folder.is_dir():
        raise NotMounted(f"results.deliver_to {folder} is not a folder (is the share mounted?)")
    alive()
    marker = request.get("marker")
    if marker:
        if not (folder / marker).exists():
            raise NotMounted(f"share not mounted: the marker file {marker} is missing in {folder}")
    elif request.get("expect_mount") and not os.path.ismount(folder):
        raise NotMounted(f"share not mounted: {folder} is not a mount point (mount the share, or set "
                         f"results.share_marker or results.expect_mount: false)")
    alive()
    return folder


def remove_stale(folder: Path, case_id: int | None = None) -> list[str]:
    """Temporary copies whose copying process is gone (``.mqic-partial-<case>-<pid>``)."""
    removed = []
    for prefix in (PARTIAL_PREFIX, REPLACED_PREFIX):
        pattern = f"{prefix}{'' if case_id is None else f'{case_id}-'}*"
        for leftover in folder.glob(pattern):
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover.name)
            alive()
    return removed


def sha256_of(path: Path, on_chunk: Callable[[], None] = lambda: None) -> str:
    """The file's sha256, read a chunk at a time (``on_chunk`` after each: the child's sign of life)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            on_chunk()
    return digest.hexdigest()


def copy_file(source: Path, target: Path) -> None:
    """Contents only (shares often refuse chmod), flushed to disk, a sign of life per chunk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            alive()
        writer.flush()
        os.fsync(writer.fileno())


def verify(partial: Path, expected: dict) -> None:
    """Every copy has the recorded size, and the recorded sha256 when one is given."""
    for name, (size, digest) in expected.items():
        copied = partial / name
        if copied.stat().st_size != size:
            raise Refused(f"size of the copy of {name} differs from the fetched file")
        if digest is not None and sha256_of(copied, alive) != digest:
            raise Refused(f"checksum of the copy of {name} differs from the fetched file")
        alive()


def rename_into_place(partial: Path, target: Path, token: str) -> bool:
    """Rename ``partial`` to ``target``; an earlier folder there is renamed aside, then removed."""
    if not target.exists() and not target.is_symlink():
        os.rename(partial, target)
        return False
    if target.is_symlink() or not target.is_dir():
        raise Refused(f"{target} exists and is not a folder; remove it to let the delivery through")
    aside = target.with_name(f"{REPLACED_PREFIX}{token}")
    os.rename(target, aside)
    os.rename(partial, target)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def deliver(request: dict) -> dict:
    folder = check_share(request)
    case_id = request["case_id"]
    remove_stale(folder, case_id)
    token = f"{case_id}-{os.getpid()}"
    partial = folder / f"{PARTIAL_PREFIX}{token}"
    source = Path(request["source"])
    expected = {name: tuple(pair) for name, pair in request["expected"].items()}
    try:
        for name in expected:
            copy_file(source / name, partial / name)
        verify(partial, expected)
        replaced = rename_into_place(partial, folder / request["case_name"], token)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"target": str(folder / request["case_name"]), "replaced": replaced}


def probe(request: dict) -> dict:
    folder = check_share(request)
    removed = remove_stale(folder) if request.get("clean", True) else []
    return {"removed": removed, "writable": os.access(folder, os.W_OK | os.X_OK)}


OPERATIONS = {"deliver": deliver, "probe": probe}


def main() -> int:
    die_with_parent()
    request = json.loads(sys.stdin.read())
    try:
        answer = {"ok": OPERATIONS[request["op"]](request)}
    except Refused as exc:
        answer = {"error": exc.kind, "message": str(exc)}
    except OSError as exc:
        answer = {"error": "OSError", "message": str(exc)}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
