"""An HPC whose sshd has no SFTP subsystem: OpenSSH 9 scp cannot copy there, tar and scp -O can.

Against a real sshd started without ``Subsystem sftp``. The scp failure used to look like
an outage ("Connection closed", exit 255), so the case waited for ever; now it is a
configuration error that says which setting fixes it, and ``mqic doctor`` finds it.
"""
from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest

from console.cli import main as cli_main
from sandbox.sshd import SandboxSshd
from shared.errors import RemoteError, Unreachable
from shared.remote import Remote, TransferUnsupported, folder_manifest
from tests.conftest import hpc_overrides, make_config
from tests.test_remote import make_case

pytestmark = pytest.mark.system  # every test here starts real processes

_counter = itertools.count()


@pytest.fixture(scope="module")
def sshd_without_sftp(tmp_path_factory):
    server = SandboxSshd(tmp_path_factory.mktemp("sshd-nosftp"), sftp=False)
    server.start()
    assert "Subsystem" not in (server.endpoint.identity_file.parent / "sshd_config").read_text()
    yield server
    server.stop()


@pytest.fixture
def config_for(tmp_path, sshd_without_sftp):
    made = []

    def build(**hpc):
        control = Path(f"/tmp/mqic-t-nosftp-{os.getpid()}-{next(_counter)}")
        config = make_config(tmp_path, hpc=hpc_overrides(sshd_without_sftp.endpoint, tmp_path / "remote",
                                                         control, **hpc))
        made.append(config)
        return config

    yield build
    for config in made:
        Remote(config.hosts[0].hpc).close()
        shutil.rmtree(config.hosts[0].hpc.control_dir, ignore_errors=True)


def test_tar_is_the_default_transfer(config_for):
    assert config_for().hosts[0].hpc.transfer == "tar"


def test_scp_upload_says_it_needs_sftp_and_how_to_fix_it(config_for, tmp_path):
    remote = Remote(config_for(transfer="scp").hosts[0].hpc)
    local = make_case(tmp_path / "local" / "case")
    with pytest.raises(TransferUnsupported) as caught:
        remote.upload(local, "1_case", case_id=1)
    error = caught.value
    assert isinstance(error, RemoteError) and not isinstance(error, Unreachable)  # not an outage
    assert "no SFTP server" in str(error)
    assert 'hpc.scp_command: "scp -O"' in str(error) and "hpc.transfer: tar" in str(error)
    assert os.listdir(tmp_path / "remote") == []  # nothing half-copied left behind


@pytest.mark.parametrize("hpc", [{"transfer": "tar"}, {"transfer": "scp", "scp_command": "scp -O"}],
                         ids=["tar", "scp -O"])
def test_tar_and_legacy_scp_upload_without_sftp(config_for, tmp_path, hpc):
    remote = Remote(config_for(**hpc).hosts[0].hpc)
    local = make_case(tmp_path / "local" / "case")
    result = remote.upload(local, "2_case", case_id=2)
    assert folder_manifest(Path(result.remote_dir)) == folder_manifest(local)


def doctor(capsys, config) -> tuple[int, dict[str, str]]:
    try:
        code = cli_main(["--config", str(config.source), "doctor"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    return code, dict(line.split(":", 1) for line in out.strip().splitlines())


def test_doctor_tries_the_configured_transfer_end_to_end(config_for, capsys, tmp_path):
    code, lines = doctor(capsys, config_for(transfer="scp"))
    assert code == 1 and "OK   ssh" in lines
    assert "TransferUnsupported" in lines["FAIL transfer"]
    assert '-> fix: set hpc.transfer: tar, or hpc.scp_command: "scp -O"' in lines["FAIL transfer"]

    code, lines = doctor(capsys, config_for(transfer="tar"))
    assert "tar upload of 2 files verified and removed again" in lines["OK   transfer"]
    assert os.listdir(tmp_path / "remote") == []  # the probe folder is gone again


def test_scp_closing_after_it_had_written_is_still_an_outage(remote_config, tmp_path):
    """The "no SFTP" verdict needs both: the host answers, and scp created nothing."""
    remote = Remote(remote_config.hosts[0].hpc)
    temp = tmp_path / "remote" / ".mqic-upload-3-cafe"
    assert remote._answers_without(str(temp)) is True
    temp.mkdir(parents=True)  # a copy that had started: its connection really was lost
    assert remote._answers_without(str(temp)) is False
