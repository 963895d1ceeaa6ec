"""The ssh control folder (``/tmp/mqic-ssh-<uid>`` by default) is used only when it is ours.

Its name is predictable, so another local user could create it first (or a symlink by
that name) and reach or watch the shared ssh connection. Each refusal names the path,
what is wrong and the fix, and is an ``Unreachable``: cases wait, none is failed.
"""
from __future__ import annotations

import os
import pwd
import shutil
import stat
from pathlib import Path

import pytest

from console.cli import main as cli_main
from shared.errors import Unreachable
from shared.remote import Remote, UnsafeControlDir, ensure_private_dir
from tests.conftest import hpc_overrides, make_config


@pytest.fixture
def control(tmp_path):
    """A control dir path in /tmp (sticky, world-writable, as in real life), removed afterwards."""
    path = Path(f"/tmp/mqic-t-ctl-{os.getpid()}-{tmp_path.name}")
    yield path
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_missing_folder_is_created_0700_whatever_the_umask(control):
    old = os.umask(0o277)  # would give 0500
    try:
        ensure_private_dir(control)
    finally:
        os.umask(old)
    info = os.lstat(control)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and mode_of(control) == 0o700
    ensure_private_dir(control)  # and accepted as it is afterwards


def test_a_symlink_is_refused_and_its_target_left_alone(control, tmp_path):
    target = tmp_path / "someone elses"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    control.symlink_to(target)
    with pytest.raises(UnsafeControlDir) as caught:
        ensure_private_dir(control)
    assert str(caught.value) == (f"control dir {control} is a symlink (to {target}), not a folder of ours; "
                                 f"refusing to use it: remove it (rm {control}) or set hpc.control_dir to a "
                                 f"private folder")
    assert mode_of(target) == 0o755  # the old code's chmod followed the link


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_a_folder_owned_by_another_user_is_refused(control):
    nobody = pwd.getpwnam("nobody")
    control.mkdir(mode=0o700)
    os.chown(control, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(UnsafeControlDir) as caught:
        ensure_private_dir(control)
    message = str(caught.value)
    assert message.startswith(f"control dir {control} belongs to uid {nobody.pw_uid} (nobody), not to us "
                              f"(uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name}))")
    assert "set hpc.control_dir to a private folder" in message


def test_a_folder_open_to_others_is_refused_not_silently_fixed(control):
    control.mkdir()
    control.chmod(0o755)
    with pytest.raises(UnsafeControlDir, match=rf"control dir {control} has mode 0755, not 0700.*"
                                               rf"chmod 700 {control}"):
        ensure_private_dir(control)
    assert mode_of(control) == 0o755


def test_a_plain_file_is_refused(control):
    control.write_text("not a folder")
    with pytest.raises(UnsafeControlDir, match=rf"control dir {control} is not a folder; refusing to use it"):
        ensure_private_dir(control)


def test_remote_commands_refuse_to_connect_through_an_unsafe_folder(tmp_path, sshd, control, capsys):
    control.mkdir()
    control.chmod(0o777)
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", control))
    with pytest.raises(Unreachable, match="has mode 0777"):  # workers: "cannot reach it safely"
        Remote(config.hosts[0].hpc).run(["true"])
    assert os.listdir(control) == []  # no socket, no lock file: nothing was used

    try:
        code = cli_main(["--config", str(config.source), "doctor"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    assert code == 1
    assert f"FAIL control dir: UnsafeControlDir: control dir {control} has mode 0777" in out
    assert f"-> fix: remove {control} (as its owner or root) and let mqic create it" in out

    control.chmod(0o700)
    assert Remote(config.hosts[0].hpc).run(["echo", "ok"]) == "ok\n"
    cli_main(["--config", str(config.source), "doctor"])
    assert f"OK   control dir: {control} is ours, mode 0700" in capsys.readouterr().out
    Remote(config.hosts[0].hpc).close()
