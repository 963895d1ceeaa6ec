"""The sandbox sshd is a real sshd: key-only, strict host keys, stoppable and healable."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.sshd import SandboxSshd, SandboxSshdError, SshEndpoint

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]  # every test here starts real processes

REPO_ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE_EXIT = 255


@pytest.fixture
def sshd(tmp_path: Path):
    sandbox = SandboxSshd(tmp_path / "sshd")
    sandbox.start()
    yield sandbox
    sandbox.stop(kill_sessions=True)


def run_ssh(endpoint: SshEndpoint, *remote: str, options: tuple[str, ...] = (),
            timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run ssh with extra ``-o``-style options placed before the destination."""
    base = endpoint.ssh_base_argv()
    argv = [*base[:-1], *options, base[-1], *remote]
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)


def make_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_ssh_with_the_sandbox_key_runs_a_command(sshd: SandboxSshd):
    result = run_ssh(sshd.endpoint, "echo", "hello")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"


def test_a_wrong_key_is_refused_without_asking_for_a_password(sshd: SandboxSshd, tmp_path: Path):
    stranger = dataclasses.replace(sshd.endpoint, identity_file=make_key(tmp_path / "stranger"))

    result = run_ssh(stranger, "true")

    assert result.returncode == UNREACHABLE_EXIT
    assert "Permission denied (publickey)" in result.stderr


@pytest.mark.parametrize("known_hosts_line", ["other-key", "nothing"])
def test_an_unexpected_host_key_is_never_accepted(sshd: SandboxSshd, tmp_path: Path,
                                                  known_hosts_line: str):
    known_hosts = tmp_path / "known_hosts"
    if known_hosts_line == "other-key":
        other_public = make_key(tmp_path / "impostor").with_suffix(".pub").read_text()
        key_type, key_base64 = other_public.split()[:2]
        known_hosts.write_text(f"[127.0.0.1]:{sshd.endpoint.port} {key_type} {key_base64}\n")
    else:
        known_hosts.write_text("")
    suspicious = dataclasses.replace(sshd.endpoint, known_hosts_file=known_hosts)

    result = run_ssh(suspicious, "true")

    assert result.returncode == UNREACHABLE_EXIT
    assert "Host key verification failed" in result.stderr
    assert known_hosts.read_text().count("\n") <= 1, "ssh must not learn the new key"


def test_stop_makes_ssh_fail_fast_and_start_heals_on_the_same_port(sshd: SandboxSshd):
    endpoint = sshd.endpoint

    sshd.stop()
    started = time.monotonic()
    down = run_ssh(endpoint, "true", options=("-o", "ConnectTimeout=3"))
    elapsed = time.monotonic() - started
    assert not sshd.is_running()
    assert down.returncode == UNREACHABLE_EXIT
    assert elapsed < 3

    assert sshd.start() == endpoint
    assert sshd.is_running()
    assert run_ssh(endpoint, "true").returncode == 0


def test_stop_with_kill_sessions_breaks_an_established_control_master(sshd: SandboxSshd,
                                                                       tmp_path: Path):
    socket_path = tmp_path / "mux.sock"
    mux = ("-S", str(socket_path), "-o", "ConnectTimeout=3")
    master = run_ssh(sshd.endpoint, "true", options=("-M", *mux, "-o", "ControlPersist=60"))
    assert master.returncode == 0, master.stderr
    try:
        through_master = run_ssh(sshd.endpoint, "echo", "muxed", options=mux)
        assert through_master.stdout == "muxed\n", through_master.stderr

        sshd.stop(kill_sessions=True)

        after_outage = run_ssh(sshd.endpoint, "echo", "muxed", options=mux)
        assert after_outage.returncode == UNREACHABLE_EXIT
        assert after_outage.stdout == ""
    finally:
        run_ssh(sshd.endpoint, "-O", "exit", options=mux, timeout=5)


def test_stop_without_kill_sessions_keeps_established_connections(sshd: SandboxSshd,
                                                                  tmp_path: Path):
    mux = ("-S", str(tmp_path / "mux.sock"), "-o", "ConnectTimeout=3")
    assert run_ssh(sshd.endpoint, "true", options=("-M", *mux, "-o", "ControlPersist=60")).returncode == 0
    try:
        sshd.stop(kill_sessions=False)

        assert run_ssh(sshd.endpoint, "echo", "still", options=mux).stdout == "still\n"
    finally:
        run_ssh(sshd.endpoint, "-O", "exit", options=mux, timeout=5)
        sshd.stop(kill_sessions=True)


def test_from_state_reattaches_and_stops(sshd: SandboxSshd, tmp_path: Path):
    reattached = SandboxSshd.from_state(tmp_path / "sshd")

    assert reattached.is_running()
    assert reattached.endpoint == sshd.endpoint
    reattached.stop()

    assert not reattached.is_running()
    assert not sshd.is_running()


def test_start_on_a_running_sandbox_only_returns_its_endpoint(sshd: SandboxSshd, tmp_path: Path):
    assert SandboxSshd(tmp_path / "sshd").start() == sshd.endpoint
    assert sshd.is_running()


def test_from_state_without_a_sandbox_raises(tmp_path: Path):
    with pytest.raises(SandboxSshdError):
        SandboxSshd.from_state(tmp_path / "nothing-here")


def test_cli_starts_in_one_process_and_stops_in_another(tmp_path: Path):
    root = tmp_path / "sshd"

    def cli(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandbox.sshd", action, str(root)],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)

    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        endpoint = json.loads(started.stdout)
        assert endpoint["host"] == "127.0.0.1"
        assert run_ssh(SandboxSshd.from_state(root).endpoint, "true").returncode == 0
        assert json.loads(cli("status").stdout)["running"] is True
    finally:
        stopped = cli("stop")
    assert json.loads(stopped.stdout)["running"] is False
    assert cli("status").returncode == 3


def test_a_failed_start_reports_the_sshd_log(tmp_path: Path):
    with SandboxSshd(tmp_path / "first") as first:
        busy_port = first.endpoint.port

        with pytest.raises(SandboxSshdError, match="(?s)sshd exited.*Bind to port"):
            SandboxSshd(tmp_path / "second", port=busy_port).start()
