"""Keeps a stale pyenv rehash lock from stalling every login to the sandbox HPC.

On machines like the one this project is built on, the login user's ``~/.bashrc`` runs
``pyenv init -`` (as a cluster login runs ``module``), whose ``pyenv rehash`` holds the lock file
``$PYENV_ROOT/shims/.pyenv-shim`` for well under a second. A login killed in that moment (the
tests cut connections on purpose: ``SandboxSshd.stop`` kills every session) leaves the file
behind, and from then on EVERY login waits 60 s for it (pyenv's ``PYENV_REHASH_TIMEOUT``) before
giving up: every command to the sandbox HPC times out. On a real cluster an administrator removes
such a file; for the sandbox a sweeper thread does: a lock older than ``STALE_AFTER_S`` is removed.
Its age is all there is to go by: the logins waiting for it run ``pyenv-rehash`` too, and a live
rehash holds it for about 0.05 s here (it writes the file when it takes it).
"""
from __future__ import annotations

import os
import pwd
import threading
import time
from pathlib import Path

STALE_AFTER_S = 2.0
SWEEP_INTERVAL_S = 0.5

_watched: set[Path] = set()
_watched_guard = threading.Lock()


def lock_of(user: str) -> Path:
    """The pyenv rehash lock that ``user``'s login would take (it need not exist)."""
    home = Path(pwd.getpwnam(user).pw_dir)
    own_root = os.environ.get("PYENV_ROOT") if user == pwd.getpwuid(os.geteuid()).pw_name else None
    return Path(own_root or home / ".pyenv") / "shims" / ".pyenv-shim"


def remove_if_stale(lock: Path, now: float) -> bool:
    """Remove ``lock`` when it is older than ``STALE_AFTER_S``; True if it was removed."""
    try:
        age = now - lock.stat().st_mtime
    except OSError:
        return False
    if age < STALE_AFTER_S:
        return False
    try:
        lock.unlink()
    except OSError:
        return False
    return True


def keep_free(user: str) -> None:
    """Sweep ``user``'s rehash lock now, then every ``SWEEP_INTERVAL_S`` in a daemon thread (one per
    process and lock) for as long as this process lives. Nothing happens where pyenv is absent."""
    lock = lock_of(user)
    if not os.path.isdir(lock.parent):  # also False where we may not look (another user's PYENV_ROOT)
        return
    remove_if_stale(lock, time.time())
    with _watched_guard:
        if lock in _watched:
            return
        _watched.add(lock)
    threading.Thread(target=_sweep_forever, args=(lock,), name="sandbox-pyenv-lock", daemon=True).start()


def _sweep_forever(lock: Path) -> None:
    while True:
        time.sleep(SWEEP_INTERVAL_S)
        remove_if_stale(lock, time.time())
