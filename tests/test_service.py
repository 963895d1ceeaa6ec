"""`mqic service`: systemd units that start supervisord at boot as an unprivileged user, and a daily backup.

No systemd runs here, so `systemd-analyze verify` (which checks every key, the user and that each
command exists) is the check; the units are rendered for a real account created for the test.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from console import service
from tests.conftest import cli, make_config

pytestmark = pytest.mark.system  # every test here starts real processes

USER = "mqic-svc-test"


@pytest.fixture
def service_user():
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a user for the unit needs root and useradd")
    subprocess.run(["useradd", "--system", "--no-create-home", USER], capture_output=True)
    yield USER
    subprocess.run(["userdel", USER], capture_output=True)


def verify(paths) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (scripts/setup.sh installs systemd as root)")
    return subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                          timeout=60)


def test_installed_units_pass_systemd_verify_and_run_as_the_named_user(tmp_path, capsys, service_user):
    config = make_config(tmp_path)
    code, out, err = cli(capsys, config, "service", "install", "--as", service_user, "--keep", "7",
                         "--unit-dir", str(tmp_path / "units"))
    assert code == 0, err
    units = sorted((tmp_path / "units").iterdir())
    assert [u.name for u in units] == sorted(service.UNITS)
    result = verify(units)
    assert result.returncode == 0, result.stderr
    main = (tmp_path / "units" / "mqic.service").read_text()
    assert f"User={service_user}" in main and "Restart=on-failure" in main
    assert f"MQIC_CONFIG={config.source.resolve()}" in main
    assert "-n" in main and "supervisord.conf" in main
    # a clean stop waits for the slowest worker's stopwaitsecs (the submitter's upload step)
    assert f"TimeoutStopSec={service.longest_stop_wait(service.Path(service.__file__).parents[1] / 'supervisord.conf') + 60}" in main
    backup = (tmp_path / "units" / "mqic-backup.service").read_text()
    assert '"backup" "--keep" "7"' in backup
    assert "Persistent=true" in (tmp_path / "units" / "mqic-backup.timer").read_text()
    assert "systemctl enable --now mqic.service mqic-backup.timer" in out


def test_a_user_install_has_no_user_line_and_says_how_to_start_at_boot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = make_config(tmp_path)
    code, out, _ = cli(capsys, config, "service", "install", "--user")
    assert code == 0
    main = (tmp_path / "xdg" / "systemd" / "user" / "mqic.service").read_text()
    assert "User=" not in main and "WantedBy=default.target" in main
    assert "systemctl --user enable --now" in out and "loginctl enable-linger" in out
    result = verify(sorted((tmp_path / "xdg" / "systemd" / "user").iterdir()))
    assert result.returncode == 0, result.stderr


def test_root_and_unknown_accounts_are_refused(tmp_path, capsys):
    config = make_config(tmp_path)
    code, _, err = cli(capsys, config, "service", "install", "--as", "root", "--unit-dir", str(tmp_path / "u"))
    assert code == 1 and "refusing to run MQI Communicator as root" in err
    code, _, err = cli(capsys, config, "service", "install", "--as", "no-such-user-xyz",
                       "--unit-dir", str(tmp_path / "u"))
    assert code == 1 and "user 'no-such-user-xyz' does not exist" in err
    assert not (tmp_path / "u").exists()


def test_status_says_what_is_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = make_config(tmp_path)
    code, out, _ = cli(capsys, config, "service", "status", "--user")
    assert code == 0
    assert "mqic.service: not installed" in out and "supervisord:" in out
