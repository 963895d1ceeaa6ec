"""Only an answer the host failed to give marks it down (issue 16): our own trouble is a
LocalFailure, a refused host key is HostKeyMismatch, its own state, never an outage.

Remote-layer tests run against the session's real sshd with a known_hosts file that names
another key (what an interception looks like to ssh) or none; worker tests call ``tick``
and ``note_reach`` with real SQLite files.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from console.top import render

from shared.config import parse_config
from shared.db import connect
from shared.errors import HostKeyMismatch, LocalFailure, Unreachable
from shared.liveness import down_hosts, HOST_KEY, host_key_refused
from shared.notify import watch_reachability
from shared.queries import overview
from shared.remote import Remote, last_lines, presented_host_keys
from shared.states import CaseStatus
from shared.store import get_case
from shared.tasks import counts_as_attempt
from shared.worker import build_context, note_reach
from tests.conftest import cli, hpc_overrides, make_config
from tests.test_workers import ctx_for, poll_until_final, registered
from workers import poller, reaper, submitter


def other_key_line(tmp_path: Path, endpoint) -> str:
    """A known_hosts line naming the sandbox's address with a key it does not have."""
    key = tmp_path / "impostor_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    fields = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    other_key_line.last = f"[{endpoint.host}]:{endpoint.port} {fields}\n"
    return other_key_line.last


@pytest.fixture
def remote_with_known_hosts(tmp_path, sshd):
    """Builder: a Remote to the sandbox sshd that trusts the ``known_hosts`` text given."""
    if not sshd.is_running():
        sshd.start()
    made = []

    def build(known_hosts: str) -> Remote:
        path = tmp_path / f"known_hosts_{len(made)}"
        path.write_text(known_hosts)
        control = Path(f"/tmp/mqic-hk-{os.getpid()}-{len(made)}-{id(made)}")  # one per xdist worker too
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


# -- workers: what is recorded of a host ---------------------------------------------------------

def reach_row(conn, host: str):
    return conn.execute("SELECT ok, problem, error, down_since FROM host_reach WHERE host = ?", (host,)).fetchone()


def test_only_an_answer_the_host_failed_to_give_marks_it_down(tmp_path):
    ctx = build_context(make_config(tmp_path), "test")
    host = next(iter(ctx.hosts.values()))
    note_reach(ctx, host, LocalFailure("local folder /spool/queued/1_x is missing"))
    assert reach_row(ctx.conn, host.name) is None                     # ours: says nothing of the host
    ctx.stop.set()
    note_reach(ctx, host, Unreachable("ssh failed: exit 255"))        # our own stop killed the call
    assert reach_row(ctx.conn, host.name) is None and down_hosts(ctx.conn) == {}
    ctx.stop.clear()
    note_reach(ctx, host, Unreachable("Connection refused"))
    assert tuple(reach_row(ctx.conn, host.name))[:2] == (0, None)


def test_a_refused_key_is_its_own_state_until_a_call_gets_through(tmp_path):
    ctx = build_context(make_config(tmp_path), "test")
    host = next(iter(ctx.hosts.values()))
    ctx.clock = lambda: 100.0
    note_reach(ctx, host, Unreachable("Connection refused"))
    ctx.clock = lambda: 200.0
    note_reach(ctx, host, HostKeyMismatch("hpc", "Offending ED25519 key in kh:1", fingerprint="SHA256:abc"))
    ok, problem, error, down_since = reach_row(ctx.conn, host.name)
    assert (ok, problem, down_since) == (0, HOST_KEY, 200.0)          # a new problem: its own notice
    assert "possible interception" in error and "SHA256:abc" in error
    ctx.clock = lambda: 300.0
    note_reach(ctx, host, Unreachable("no answer within 20s"))        # does not hide the key problem
    assert tuple(reach_row(ctx.conn, host.name))[:2] == (0, HOST_KEY)
    assert "possible interception" in reach_row(ctx.conn, host.name)["error"]
    assert host_key_refused(ctx.conn) == {host.name} and host.name in down_hosts(ctx.conn)
    note_reach(ctx, host, None)                                       # the operator fixed known_hosts
    assert tuple(reach_row(ctx.conn, host.name)) == (1, None, None, None)


def test_neither_a_local_failure_nor_a_refused_key_uses_up_an_attempt(tmp_path):
    assert not counts_as_attempt(LocalFailure("disk full"))
    assert not counts_as_attempt(HostKeyMismatch("hpc", "x"))


def test_a_case_folder_missing_locally_fails_here_and_leaves_the_host_up(hpc):
    h = hpc()
    ctx = ctx_for(h)
    case = registered(ctx, "vanishing")
    t = time.time()
    shutil.rmtree(case.case_path)                                      # our spool, not the HPC
    assert submitter.tick(ctx, t + 200) == 1
    after = get_case(ctx.conn, case.case_id)
    assert (after.status, after.attempts, after.error_type) == (CaseStatus.SUBMITTED, 0, "LocalFailure")
    assert down_hosts(ctx.conn) == {}
    assert all(row["ok"] for row in ctx.conn.execute("SELECT ok FROM host_reach"))


def top_frame(config) -> str:
    """One ``mqic-top`` frame as plain text."""
    conn = connect(config.database_path, readonly=True)
    try:
        view = overview(conn, time.time(), config.unhealthy_after_seconds, configured=config.hosts)
    finally:
        conn.close()
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render(view, config, time.time()))
    return console.export_text()


def with_known_hosts(h, text: str):
    """``h``'s config with a known_hosts file of its own holding ``text``."""
    data = yaml.safe_load(h.config_path.read_text())
    path = h.root / "known_hosts"
    path.write_text(text)
    data["hpc"]["known_hosts_file"] = str(path)
    h.config_path.write_text(yaml.safe_dump(data))
    return parse_config(data, h.config_path), path


def test_a_refused_key_stops_every_command_to_the_host_until_known_hosts_is_fixed(hpc, sshd, tmp_path, capsys):
    h = hpc()
    config, known_hosts = with_known_hosts(h, other_key_line(tmp_path, sshd.endpoint))
    ctx = build_context(config, "submitter")
    case = registered(ctx, "waits")
    t = time.time()
    before = sshd.sessions_started()
    assert submitter.tick(ctx, t + 200) == 0                          # making the slots sure meets the key
    assert host_key_refused(ctx.conn) == {"hpc"}
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.SUBMITTED
    for now in (t + 210, t + 220):
        submitter.tick(ctx, now)
        submitter.stage_tick(ctx, now)
        poller.tick(ctx, now)
        reaper.probe_down_hosts(ctx, now)                              # a handshake only
    assert sshd.sessions_started() == before                           # no command reached the host
    assert host_key_refused(ctx.conn) == {"hpc"}
    assert watch_reachability(ctx.conn, config, t + 230) == 1         # at once, not after 10 minutes
    [notice] = ctx.conn.execute("SELECT kind, payload FROM notices").fetchall()
    assert notice["kind"] == "hpc_host_key" and "HOST KEY CHANGED" in notice["payload"]
    code, out, _ = cli(capsys, config, "status")
    assert code == 0 and out.splitlines()[0].startswith("HOST KEY CHANGED on host hpc: possible interception")
    assert "HOST KEY REFUSED" in out and "UNREACHABLE" not in out
    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "unhealthy: HOST KEY CHANGED on host hpc" in out and "unreachable since" not in out
    frame = top_frame(config)
    first, second = frame.splitlines()[:2]
    assert first.endswith("UNHEALTHY") and second.startswith("HOST KEY CHANGED on host hpc")
    code, out, _ = cli(capsys, config, "doctor")
    [key_line] = [line for line in out.splitlines() if "ssh host key" in line]
    assert key_line.startswith("FAIL") and sshd.host_key_fingerprint() in key_line and "ssh-keygen -R" in key_line
    assert "check the host is up" not in out and known_hosts.read_text() == other_key_line.last  # never written
    assert sshd.sessions_started() == before
    known_hosts.write_text(sshd.endpoint.known_hosts_file.read_text())  # the operator's fix
    assert reaper.probe_down_hosts(ctx, t + 240) == 1
    assert host_key_refused(ctx.conn) == set() and down_hosts(ctx.conn) == {}
    assert submitter.tick(ctx, t + 250) == 1
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING
    assert poll_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED


def test_an_ssh_error_is_quoted_in_whole_lines_never_cut_mid_sentence():
    err = "\n".join(f"line {i}: " + "x" * 60 for i in range(10))
    err += "\nssh: connect to host h port 22: Connection refused\n"
    quoted = last_lines(err)
    assert quoted.endswith("Connection refused") and quoted.startswith("line ") and len(quoted) <= 300
    assert last_lines("y" * 500) == "y" * 500  # one long line is kept whole
