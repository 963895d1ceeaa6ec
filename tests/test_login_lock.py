"""A stale pyenv rehash lock (a login killed mid-rehash) must not stall every sandbox login."""
from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from sandbox import login_lock
from sandbox.sshd import SandboxSshd

NOW = 1_000_000.0


def lock_aged(tmp_path: Path, seconds: float) -> Path:
    lock = tmp_path / ".pyenv-shim"
    lock.write_text("#!/usr/bin/env bash\n")
    os.utime(lock, (NOW - seconds, NOW - seconds))
    return lock


def test_an_old_lock_is_removed(tmp_path: Path):
    lock = lock_aged(tmp_path, login_lock.STALE_AFTER_S + 1)

    assert login_lock.remove_if_stale(lock, NOW)
    assert not lock.exists()


def test_a_fresh_lock_is_left_to_its_rehash(tmp_path: Path):
    lock = lock_aged(tmp_path, login_lock.STALE_AFTER_S - 1)

    assert not login_lock.remove_if_stale(lock, NOW)
    assert lock.exists()


def test_no_lock_is_nothing_to_do(tmp_path: Path):
    assert not login_lock.remove_if_stale(tmp_path / ".pyenv-shim", NOW)


@pytest.mark.system
@pytest.mark.timeout(60)
def test_a_stale_rehash_lock_does_not_stall_logins(tmp_path: Path):
    """Before the sweeper, each login here waited pyenv's 60 s for the dead rehash's lock."""
    lock = login_lock.lock_of(pwd.getpwuid(os.geteuid()).pw_name)
    if not lock.parent.is_dir():
        pytest.skip("the login user has no pyenv here: nothing to keep free")
    with SandboxSshd(tmp_path / "sshd") as sshd:
        lock.write_text("#!/usr/bin/env bash\n")
        os.utime(lock, (time.time() - 120, time.time() - 120))  # a rehash killed two minutes ago
        started = time.monotonic()
        result = subprocess.run([*sshd.endpoint.ssh_base_argv(), "true"], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=45)
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < 20, f"a login took {took:.1f} s behind a stale rehash lock"
