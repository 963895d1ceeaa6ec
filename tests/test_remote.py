"""The remote layer against a real sshd: quoting, typed failures, uploads, downloads, reuse."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from sandbox.sshd import SandboxSshd
from shared.errors import BadOutput, HostKeyMismatch, LocalFailure, RemoteError, Unreachable
from shared.remote import Remote, UnsafeMember, UploadCase, UploadResult, VerifyFailed, folder_manifest
from tests.conftest import hpc_overrides, make_config

HOSTILE = ["plain", "with space", "quote'single", 'quote"double', "dollar $(touch pwned) ${HOME}",
           "semi;colon", "back`tick`", "유니코드 케이스", "-leading-dash", "new\nline", "star*glob?"]


def make_case(folder, files=3):
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"layer_{i}.ptn").write_bytes(os.urandom(1000 + i))
    (folder / "sub dir").mkdir()
    (folder / "sub dir" / "PlanInfo.txt").write_text("DICOM_BEAM_NUMBER,1\n")
    return folder


def test_run_returns_stdout_and_quotes_every_word(remote_config):
    remote = Remote(remote_config.hosts[0].hpc)
    for word in HOSTILE:
        assert remote.run(["printf", "%s", word]) == word
    assert not os.path.exists("pwned")


def test_remote_command_failure_is_remote_error(remote_config):
    remote = Remote(remote_config.hosts[0].hpc)
    with pytest.raises(RemoteError) as caught:
        remote.run(["sh", "-c", "echo nope >&2; exit 3"])
    assert caught.value.exit_code == 3 and "nope" in caught.value.stderr


def test_tilde_base_dir_is_expanded_remotely(tmp_path, sshd):
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path, tmp_path / "cm",
                                                     remote_base_dir="~/mqic-test-base"))
    remote = Remote(config.hosts[0].hpc)
    assert remote.base_dir() == os.path.expanduser("~/mqic-test-base")
    os.rmdir(os.path.expanduser("~/mqic-test-base"))
    remote.close()


@pytest.mark.parametrize("transfer", ["scp", "tar", "rsync"])
def test_upload_lands_complete_under_final_name(tmp_path, sshd, transfer):
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", tmp_path / "cm",
                                                     transfer=transfer))
    remote = Remote(config.hosts[0].hpc)
    local = make_case(tmp_path / "local" / "case")
    for case_id, name in enumerate(HOSTILE):
        result = remote.upload(local, f"{case_id}_{name}", case_id=case_id)
        assert result.remote_dir == f"{tmp_path}/remote/{case_id}_{name}"
        assert folder_manifest(tmp_path / "remote" / f"{case_id}_{name}") == folder_manifest(local)
        assert (tmp_path / "remote" / f"{case_id}_{name}" / "sub dir" / "PlanInfo.txt").exists()
    assert not [p for p in os.listdir(tmp_path / "remote") if p.startswith(".mqic-upload")]
    remote.close()


def test_upload_replaces_a_leftover_partial_attempt(remote_config, tmp_path):
    remote = Remote(remote_config.hosts[0].hpc)
    local = make_case(tmp_path / "local" / "c")
    base = tmp_path / "remote"
    base.mkdir()
    (base / ".mqic-upload-7-deadbeef").mkdir()  # a crashed attempt
    (base / "7_c").mkdir()
    (base / "7_c" / "stale").write_text("old")
    remote.upload(local, "7_c", case_id=7)
    assert not (base / ".mqic-upload-7-deadbeef").exists()
    assert not (base / "7_c" / "stale").exists()


def test_verify_catches_a_mismatch(remote_config, tmp_path):
    remote = Remote(remote_config.hosts[0].hpc)
    local = make_case(tmp_path / "local" / "c")
    with pytest.raises(VerifyFailed, match="upload mismatch"):
        remote.finalize_upload(str(local), str(tmp_path / "final"), 999, 1)
    assert not (tmp_path / "final").exists()


def test_unwritable_remote_dir_is_remote_error(tmp_path, sshd):
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, "/proc/mqic-nope", tmp_path / "cm"))
    with pytest.raises(RemoteError):
        Remote(config.hosts[0].hpc).upload(make_case(tmp_path / "c"), "1_c", case_id=1)


def test_download_results_fetches_globs_and_stays_inside(remote_config, tmp_path):
    remote = Remote(remote_config.hosts[0].hpc)
    rdir = tmp_path / "remote" / "5_case"
    (rdir / "output").mkdir(parents=True)
    (rdir / "output" / "dose.raw").write_bytes(b"\0" * 100)
    (rdir / "Dose.mhd").write_text("hdr")
    (rdir / "other.txt").write_text("no")
    dest = tmp_path / "local"
    dest.mkdir()
    names = remote.download_results(str(rdir), ["output/*.raw", "*.mhd", "missing*"], dest)
    assert sorted(names) == ["Dose.mhd", "output/dose.raw"]
    assert (dest / "output" / "dose.raw").stat().st_size == 100 and not (dest / "other.txt").exists()


def results_folder(base, name, files):
    folder = base / name
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return folder


def test_download_many_fetches_several_folders_in_one_stream_and_leaves_out_what_it_cannot(remote_config, tmp_path):
    """Issue 19: the results of the cases one pass completes come in one call, not one each."""
    remote = Remote(remote_config.hosts[0].hpc)
    base = tmp_path / "remote"
    odd = results_folder(base, "6_it's a \"case\" $(x) & more", {"output/dose.raw": b"\1" * 10, "Dose.mhd": b"h"})
    plain = results_folder(base, "5_case", {"output/dose.raw": b"\0" * 100, "other.txt": b"no"})
    empty = results_folder(base, "7_none", {"other.txt": b"no"})
    wanted = [(str(plain), tmp_path / "l5"), (str(base / "8_gone"), tmp_path / "l8"), (str(odd), tmp_path / "l6"),
              (str(empty), tmp_path / "l7")]
    streams = []
    stream = remote._download_stream
    remote._download_stream = lambda *args: streams.append(args[0]) or stream(*args)

    fetched = remote.download_many(wanted, ["output/*.raw", "*.mhd"])

    assert streams == [str(base)]                                            # one remote command for all
    assert {index: sorted(names) for index, names in fetched.items()} == {
        0: ["output/dose.raw"], 2: ["Dose.mhd", "output/dose.raw"]}          # the missing and the empty left out
    assert (tmp_path / "l5" / "output" / "dose.raw").read_bytes() == b"\0" * 100
    assert (tmp_path / "l6" / "Dose.mhd").read_bytes() == b"h" and not (tmp_path / "l5" / "other.txt").exists()


def test_download_many_is_all_or_nothing_when_one_folder_holds_a_link(remote_config, tmp_path):
    remote = Remote(remote_config.hosts[0].hpc)
    base = tmp_path / "remote"
    good = results_folder(base, "5_good", {"output/dose.raw": b"\0" * 10})
    bad = results_folder(base, "6_bad", {"output/dose.raw": b"\0" * 10})
    (bad / "output" / "etc").symlink_to("/etc")
    wanted = [(str(good), tmp_path / "l5"), (str(bad), tmp_path / "l6")]

    assert remote.download_many(wanted, ["output/*"]) == {}
    assert not (tmp_path / "l5").exists() and not (tmp_path / "l6").exists()  # each is fetched alone later
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("l")] == []


def plant_escaping_symlink(out):
    """output/escape -> ../../victim, and a file through it: the HPC side resolves it to a
    folder next to the case; extracted blindly it would write next to the local folder."""
    (out.parent.parent / "victim").mkdir()
    (out.parent.parent / "victim" / "planted").write_text("pwned")
    (out / "escape").symlink_to("../../victim")
    return ["output/*", "output/escape/planted"]


def plant_absolute_symlink(out):
    (out / "etc").symlink_to("/etc")
    return ["output/*"]


def plant_fifo(out):
    os.mkfifo(out / "pipe")
    return ["output/*"]


def plant_hardlink(out):
    os.link(out / "dose.raw", out / "dose2.raw")
    return ["output/*"]


@pytest.mark.parametrize("plant, refused, why", [
    (plant_escaping_symlink, "output/escape", "symbolic link to '../../victim'"),
    (plant_absolute_symlink, "output/etc", "symbolic link to '/etc'"),
    (plant_fifo, "output/pipe", "fifo"),
    (plant_hardlink, None, "hard link"),
], ids=["symlink-escaping", "symlink-etc", "fifo", "hardlink"])
def test_download_refuses_a_hostile_results_folder_and_writes_nothing_outside(remote_config, tmp_path,
                                                                              plant, refused, why):
    remote = Remote(remote_config.hosts[0].hpc)
    rdir = tmp_path / "remote" / "cases" / "5_case"
    (rdir / "output").mkdir(parents=True)
    (rdir / "output" / "dose.raw").write_bytes(b"\0" * 100)
    patterns = plant(rdir / "output")
    local = tmp_path / "local" / "cases"
    dest = local / "5_case"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeMember) as caught:
        remote.download_results(str(rdir), patterns, dest)
    assert isinstance(caught.value, BadOutput) and why in str(caught.value)
    if refused:
        assert caught.value.member == refused
    assert {str(p.relative_to(local.parent)) for p in local.parent.rglob("*")} <= \
        {"cases", "cases/5_case", "cases/5_case/output", "cases/5_case/output/dose.raw",
         "cases/5_case/output/dose2.raw"}  # a hard link's first name is a plain file
    assert not (tmp_path / "local" / "victim").exists()
    assert remote.run(["echo", "still fine"]) == "still fine\n"  # the stream was torn down cleanly


def test_unreachable_when_sshd_is_down(tmp_path, sshd):
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "r", tmp_path / "cm"))
    remote = Remote(config.hosts[0].hpc)
    assert remote.run(["true"]) == ""
    sshd.stop(kill_sessions=True)
    try:
        with pytest.raises(Unreachable):
            remote.run(["true"])
        with pytest.raises(Unreachable):
            remote.upload(make_case(tmp_path / "c"), "1_c", case_id=1)
    finally:
        sshd.start()
    assert remote.run(["echo", "back"]) == "back\n"  # heals by itself on the same port
    remote.close()


def test_unknown_host_key_is_refused_not_accepted(tmp_path, sshd):
    other = tmp_path / "known_hosts"
    other.write_text(f"[127.0.0.1]:{sshd.endpoint.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIEqNVu7jyOBmT6zcxLjSkuGhDA8j2W95GsOyXHMVsZkm\n")
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "r", tmp_path / "cm",
                                                     known_hosts_file=str(other)))
    with pytest.raises(HostKeyMismatch, match="host key changed: possible interception"):  # not an outage
        Remote(config.hosts[0].hpc).run(["true"])


def test_missing_key_file_is_refused(tmp_path, sshd):
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "r", tmp_path / "cm",
                                                     identity_file=str(tmp_path / "no-such-key")))
    with pytest.raises(Unreachable, match="Permission denied"):
        Remote(config.hosts[0].hpc).run(["true"])


def test_repeated_commands_reuse_one_connection(remote_config, sshd):
    remote = Remote(remote_config.hosts[0].hpc)
    remote.run(["true"])  # starts the master
    log = sshd.endpoint.identity_file.parent / "sshd.log"
    accepted_before = log.read_text().count("Accepted publickey")
    started = time.monotonic()
    for _ in range(10):
        remote.run(["true"])
    per_call = (time.monotonic() - started) / 10
    accepted_after = log.read_text().count("Accepted publickey")
    print(f"\n10 multiplexed commands: {per_call * 1000:.0f} ms each, new ssh logins: "
          f"{accepted_after - accepted_before}")
    assert accepted_after == accepted_before


@pytest.mark.parametrize("transfer", ["scp", "tar"])
def test_connection_dropped_mid_copy_leaves_no_complete_looking_case(tmp_path, sshd, transfer):
    """Also: scp losing its connection mid-copy is an outage, not taken for a missing SFTP server."""
    import threading
    from tests.conftest import wait_until
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", tmp_path / "cm",
                                                     transfer=transfer))
    remote = Remote(config.hosts[0].hpc)
    local = make_case(tmp_path / "local" / "big")
    with open(local / "big.ptn", "wb") as handle:
        handle.truncate(400 * 1024 * 1024)  # sparse locally, 400 MB on the wire
    outcome = {}

    def copy():
        try:
            remote.upload(local, "1_big", case_id=1)
            outcome["result"] = "finished"
        except Exception as exc:  # noqa: BLE001 - the test inspects the type
            outcome["result"] = exc

    worker = threading.Thread(target=copy)
    worker.start()
    base = tmp_path / "remote"
    wait_until(lambda: base.exists() and any(p.startswith(".mqic-upload-1-") for p in os.listdir(base)),
               timeout=20, interval=0.01, message="upload under way")
    sshd.stop(kill_sessions=True)
    worker.join(60)
    sshd.start()
    assert isinstance(outcome["result"], Unreachable), outcome
    assert not (base / "1_big").exists()               # never looks complete
    (local / "big.ptn").unlink()
    remote.upload(local, "1_big", case_id=1)            # the retry cleans the leftover and lands
    assert [p for p in os.listdir(base) if p.startswith(".mqic-upload")] == []
    assert folder_manifest(base / "1_big") == folder_manifest(local)
    remote.close()


@pytest.mark.parametrize("stderr", [
    "tar: This does not look like a tar archive\ntar: Exiting with failure status due to previous errors",
    "tar: Unexpected EOF in archive\ntar: Error is not recoverable: exiting now",
])
def test_a_cut_tar_stream_is_connection_trouble_not_a_failure_of_the_case(stderr):
    """Found by the chaos run: a tar upload whose local side died failed the case for good."""
    from shared.errors import Unreachable
    from shared.remote import transfer_failure
    assert isinstance(transfer_failure("tar upload", 2, stderr), Unreachable)


def test_a_host_busy_opening_its_connection_does_not_hold_up_another_at_the_same_address(tmp_path, sshd):
    """Bug: the ControlMaster lock was named after the address alone, so two hosts on one address
    (other ports: port forwards, the sandbox) waited for each other's connect."""
    import socket
    import threading
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()                              # accepts, never says a word: ssh waits for its banner
    control = tmp_path / "ctl"
    live = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", control)).hosts[0].hpc
    hung = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", control,
                                                   port=silent.getsockname()[1], connect_timeout_seconds=10)).hosts[0].hpc
    connecting = threading.Thread(target=lambda: pytest.raises(Unreachable, Remote(hung).run, ["true"], timeout=30))
    connecting.start()
    try:
        time.sleep(1)                            # the hung host holds its connect now
        started = time.monotonic()
        assert Remote(live).run(["echo", "ok"], timeout=30) == "ok\n"
        assert time.monotonic() - started < 5    # not the other host's 10 s connect timeout
    finally:
        connecting.join()
        silent.close()
        Remote(live).close()


# -- upload_many: k cases in one stream, verified and renamed in one call (issue 19) -----------------

def many_config(tmp_path, sshd, transfer="tar"):
    return make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", tmp_path / "cm",
                                                   transfer=transfer))


def leftovers(base) -> list[str]:
    return sorted(p for p in os.listdir(base) if p.startswith(".mqic-upload"))


@pytest.mark.parametrize("transfer", ["tar", "scp", "rsync"])
def test_upload_many_lands_each_case_whole_and_a_missing_folder_is_its_own_failure(tmp_path, sshd, transfer):
    remote = Remote(many_config(tmp_path, sshd, transfer).hosts[0].hpc)
    base = tmp_path / "remote"
    names = ["1_plain", "2_with space'quote", "3_유니코드 $(touch pwned)"]
    cases = [UploadCase(make_case(tmp_path / "local" / name, files=i + 1), name, i + 1) for i, name in enumerate(names)]
    cases.insert(1, UploadCase(tmp_path / "local" / "not-there", "9_gone", 9))
    remote.base_dir()
    before = sshd.sessions_started()
    outcomes = remote.upload_many(cases)
    assert isinstance(outcomes[1], LocalFailure) and "not-there" in str(outcomes[1])
    for case, outcome in zip(cases[:1] + cases[2:], outcomes[:1] + outcomes[2:]):
        assert outcome == UploadResult(f"{base}/{case.folder_name}", *folder_manifest(case.local_dir))
        assert folder_manifest(base / case.folder_name) == folder_manifest(case.local_dir)
    if transfer == "tar":
        assert sshd.sessions_started() - before == 2   # one stream for the three, one verify-and-rename
    assert leftovers(base) == [] and not (base / "9_gone").exists() and not os.path.exists("pwned")
    remote.close()


class TamperedOnArrival(Remote):
    """The real remote, but one case's copy gains a file on the HPC before it is verified."""

    def __init__(self, hpc, tampered: str):
        super().__init__(hpc)
        self.tampered = tampered

    def _send(self, staged, base, limit):
        failures = super()._send(staged, base, limit)
        temp = next(item.temp for item in staged if item.case.folder_name == self.tampered)
        Path(temp, "stray.bin").write_bytes(b"x" * 10)   # the HPC is this machine
        return failures


def test_a_case_that_fails_its_verify_fails_alone(tmp_path, sshd):
    remote = TamperedOnArrival(many_config(tmp_path, sshd).hosts[0].hpc, "2_b")
    base = tmp_path / "remote"
    cases = [UploadCase(make_case(tmp_path / "local" / name), name, i) for i, name in enumerate(["1_a", "2_b", "3_c"], 1)]
    first, second, third = remote.upload_many(cases)
    assert isinstance(second, VerifyFailed) and "upload mismatch" in str(second) and "want 4 " in str(second)
    assert not (base / "2_b").exists() and [p.startswith(".mqic-upload-2-") for p in leftovers(base)] == [True]
    assert isinstance(first, UploadResult) and isinstance(third, UploadResult)
    assert folder_manifest(base / "1_a") == folder_manifest(cases[0].local_dir)
    assert folder_manifest(base / "3_c") == folder_manifest(cases[2].local_dir)
    assert isinstance(Remote(remote.hpc).upload_many(cases[1:2])[0], UploadResult)   # the next upload lands it
    assert leftovers(base) == []


def test_a_cut_stream_renames_nothing_and_the_next_upload_cleans_up(tmp_path, sshd):
    import threading
    from tests.conftest import wait_until
    remote = Remote(many_config(tmp_path, sshd).hosts[0].hpc)
    base = tmp_path / "remote"
    cases = [UploadCase(make_case(tmp_path / "local" / name), name, i) for i, name in enumerate(["1_a", "2_b", "3_c"], 1)]
    with open(cases[1].local_dir / "big.ptn", "wb") as handle:
        handle.truncate(400 * 1024 * 1024)  # sparse here, 400 MB on the wire: the cut comes inside case 2
    remote.base_dir()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("many", remote.upload_many(cases)))
    worker.start()

    def big_arriving():
        found = [p for p in leftovers(base) if p.startswith(".mqic-upload-2-")]
        return found and (base / found[0] / "big.ptn").exists()

    wait_until(big_arriving, timeout=30, interval=0.01, message="case 2 on its way")
    sshd.stop(kill_sessions=True)
    worker.join(60)
    sshd.start()
    assert [type(o) for o in outcome["many"]] == [Unreachable] * 3
    assert [name for name in os.listdir(base) if not name.startswith(".")] == []   # nothing looks complete
    assert len(leftovers(base)) == 3
    (cases[1].local_dir / "big.ptn").unlink()
    assert all(isinstance(o, UploadResult) for o in remote.upload_many(cases))
    assert leftovers(base) == []
    remote.close()


def test_the_verify_answer_is_read_whole_or_not_at_all():
    """Fast: each move's record between the call's markers; a cut answer or forged text leaves it unreported."""
    from shared.remote import parse_finalize
    mark = "~mqic-finalize-00~"
    forged = "~mqic-finalize-11~F1~mqic-finalize-11~~mqic-finalize-11~0~mqic-finalize-11~"
    text = (f"{mark}F0{mark}{mark}0{mark}\n{mark}F1{mark}upload mismatch {forged}\n{mark}4{mark}\n"
            f"{mark}F2{mark}{mark}0{mark}\n")
    assert parse_finalize(text, mark) == {0: (0, ""), 1: (4, f"upload mismatch {forged}\n"), 2: (0, "")}
    for cut in range(len(text)):
        found = parse_finalize(text[:cut], mark)
        assert list(found) == list(range(len(found))) and all(found[i] == parse_finalize(text, mark)[i] for i in found)
    assert parse_finalize(text[:text.rindex(mark)], mark).keys() == {0, 1}
