"""Only an answer the host failed to give marks it down (issue 16): our own trouble is a
LocalFailure, a refused host key is HostKeyMismatch, its own state, never an outage.

Remote-layer tests run against the session's real sshd with a known_hosts file that names
another key (what an interception looks like to ssh) or none; worker tests call ``tick``
and ``note_reach`` with real SQLite files.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from shared.errors import HostKeyMismatch, LocalFailure, Unreachable
from shared.remote import Remote, presented_host_keys
from tests.conftest import hpc_overrides, make_config


def other_key_line(tmp_path: Path, endpoint) -> str:
    """A known_hosts line naming the sandbox's address with a key it does not have."""
    key = tmp_path / "impostor_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    fields = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    return f"[{endpoint.host}]:{endpoint.port} {fields}\n"


@pytest.fixture
def remote_with_known_hosts(tmp_path, sshd):
    """Builder: a Remote to the sandbox sshd that trusts the ``known_hosts`` text given."""
    if not sshd.is_running():
        sshd.start()
    made = []

    def build(known_hosts: str) -> Remote:
        path = tmp_path / f"known_hosts_{len(made)}"
        path.write_text(known_hosts)
        control = Path(f"/tmp/mqic-hk-{len(made)}-{id(made)}")
        config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", control,
                                                         known_hosts_file=str(path), transfer="tar"))
        made.append(Remote(config.hosts[0].hpc))
        return made[-1]

    yield build
    for remote in made:
        remote.close()
        shutil.rmtree(remote.control_dir, ignore_errors=True)


def served_fingerprint(sshd) -> str:
    return sshd.host_key_fingerprint()


def test_a_changed_host_key_is_host_key_mismatch_with_the_fingerprint_seen(tmp_path, sshd, remote_with_known_hosts):
    remote = remote_with_known_hosts(other_key_line(tmp_path, sshd.endpoint))
    before = sshd.sessions_started()
    with pytest.raises(HostKeyMismatch) as caught:
        remote.run(["true"])
    error = caught.value
    assert not isinstance(error, Unreachable) and not error.unknown
    assert "host key changed: possible interception" in str(error)
    assert error.fingerprint == served_fingerprint(sshd)
    assert "Offending ED25519 key in" in str(error)
    local = tmp_path / "case"
    local.mkdir()
    (local / "plan.in").write_text("plan\n")
    with pytest.raises(HostKeyMismatch):
        remote.upload(local, "1_case", case_id=1)
    with pytest.raises(HostKeyMismatch):
        remote.check_host_key()
    assert sshd.sessions_started() == before  # nothing ran on the host


def test_an_unknown_host_key_is_host_key_mismatch_too(remote_with_known_hosts):
    remote = remote_with_known_hosts("")
    with pytest.raises(HostKeyMismatch) as caught:
        remote.run(["true"])
    assert caught.value.unknown and "host key unknown" in str(caught.value)


def test_the_handshake_check_accepts_the_right_key_and_starts_no_session(sshd, remote_with_known_hosts):
    remote = remote_with_known_hosts(sshd.endpoint.known_hosts_file.read_text())
    before = sshd.sessions_started()
    remote.check_host_key()
    assert sshd.sessions_started() == before
    remote.run(["true"])
    assert sshd.sessions_started() == before + 1  # the log counts what a command does


def test_presented_host_keys_names_the_fingerprint_without_writing_known_hosts(tmp_path, sshd, remote_with_known_hosts):
    remote = remote_with_known_hosts(other_key_line(tmp_path, sshd.endpoint))
    known = remote.hpc.known_hosts_file.read_text()
    lines = presented_host_keys(remote.hpc)
    assert any(served_fingerprint(sshd) in line and "ED25519" in line for line in lines)
    assert remote.hpc.known_hosts_file.read_text() == known


def test_an_upload_of_a_missing_local_folder_is_a_local_failure(tmp_path, remote_config):
    remote = Remote(remote_config.hosts[0].hpc)
    with pytest.raises(LocalFailure) as caught:
        remote.upload(tmp_path / "not-there", "1_gone", case_id=1)
    assert "not-there" in str(caught.value) and not isinstance(caught.value, Unreachable)


def test_a_local_tar_that_fails_mid_upload_is_a_local_failure(tmp_path, remote_config):
    """The folder is read by tar after the manifest: a file that cannot be read then is ours."""
    hpc = remote_config.hosts[0].hpc
    remote = Remote(hpc)
    local = tmp_path / "case"
    local.mkdir()
    (local / "plan.in").write_text("plan\n")
    remote.ensure_master()
    with pytest.raises(LocalFailure) as caught:
        remote._upload_tar(tmp_path / "vanished", f"{remote.base_dir()}/.mqic-upload-9-x", 20)
    assert "our local tar" in str(caught.value)


def test_results_that_cannot_be_written_here_are_a_local_failure(tmp_path, remote_config):
    remote = Remote(remote_config.hosts[0].hpc)
    case = remote.remote_case_dir("7_results")
    remote.run(["mkdir", "-p", case])
    remote.run(["sh", "-c", 'echo dose > "$1/dose.raw"', "sh", case])
    not_a_folder = tmp_path / "file-not-folder"
    not_a_folder.write_text("x")
    with pytest.raises(LocalFailure):
        remote.download_results(case, ["*.raw"], not_a_folder)
