"""The sandbox's slow-host knob (sandbox/sshd.py ``login_delay``): pure parts, no process started.

A slow host's sshd runs every session through a login script (``ForceCommand``); without the
knob its config has no such line, as before.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.sshd import SandboxSshd, _Layout, _sshd_config_text, login_script_text


def test_without_the_knob_the_sshd_config_has_no_login_script(tmp_path: Path):
    text = _sshd_config_text(_Layout(tmp_path), 2222, "root")
    assert "ForceCommand" not in text
    assert "Subsystem sftp internal-sftp" in text


def test_a_slow_host_runs_every_session_through_its_login_script(tmp_path: Path):
    layout = _Layout(tmp_path)
    text = _sshd_config_text(layout, 2222, "root", login_script=True)
    assert f"ForceCommand {layout.login_script}" in text.splitlines()


def test_the_login_script_sleeps_what_the_delay_file_says_then_runs_the_command_or_sftp(tmp_path: Path):
    script = login_script_text(tmp_path / "it's delay", tmp_path / "log", Path("/usr/lib/openssh/sftp-server"))
    assert "cat '" + str(tmp_path) + "/it'\"'\"'s delay'" in script  # quoted: a path is never shell code
    assert 'sleep "$delay"' in script
    assert "internal-sftp) exec /usr/lib/openssh/sftp-server" in script
    assert 'exec "${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"' in script


def test_set_login_delay_writes_the_file_read_at_each_login_and_refuses_negative(tmp_path: Path):
    sshd = SandboxSshd(tmp_path / "sshd")
    sshd.set_login_delay(2.5)
    assert (tmp_path / "sshd" / "login_delay_seconds").read_text() == "2.5\n"
    sshd.set_login_delay(0)
    assert (tmp_path / "sshd" / "login_delay_seconds").read_text() == "0\n"
    with pytest.raises(ValueError):
        sshd.set_login_delay(-1)
