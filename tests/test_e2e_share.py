"""End to end, the workstation's edge: a results share that hangs (a real sshfs FUSE mount whose
sftp-server is stopped), a share that is not mounted, and a reaper killed in the middle of a delivery.
Real supervisord runs the real workers against the sandbox HPC (sshd + pueue stand-in)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.chaos_share import SshfsShare, sshfs_missing
from sandbox.casegen import make_case
from shared.delivery import sha256_of
from tests.conftest import cli, wait_until
from tests.test_clinic import RECORDER
from tests.test_e2e_clinic import Db, content, drop, mqic, start, stop_all  # noqa: F401  (a fixture)
from tests.test_exporter import scrape

@pytest.fixture
def sshfs_share(sshd, tmp_path):
    missing = sshfs_missing()
    if missing:
        pytest.skip(f"needs a real FUSE share: {missing}")
    if not sshd.is_running():
        sshd.start()
    made = SshfsShare(sshd, tmp_path / "fuse")
    yield made
    made.close()


def share_state(db: Db) -> dict | None:
    value = db.value("SELECT value FROM settings WHERE key = 'results.share_state'")
    return None if value is None else json.loads(value)


def delivered(db: Db) -> set[str]:
    return {r[0] for r in db.conn.execute("SELECT case_name FROM cases WHERE delivered_at IS NOT NULL")}


def delivery_error(db: Db, name: str) -> str:
    row = db.case(name)
    return (row["delivery_error"] if row is not None else None) or ""


def timed(h, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = mqic(h, *args)
    return time.monotonic() - started, result


def operator_answers(h, capsys, case_id: int) -> dict[str, tuple[int, str, float]]:
    """The operator's commands run in this process (imports done): (exit code, output, seconds) each,
    every one within 2 s."""
    from console.top import main as top_main
    answers = {}
    for name, args in (("status", ("status",)), ("health", ("health",)), ("cases", ("cases",)),
                       ("show", ("show", str(case_id)))):
        started = time.monotonic()
        code, out, _ = cli(capsys, h.config, *args)
        answers[name] = (code, out, time.monotonic() - started)
    started = time.monotonic()
    code = top_main(["--once", "--config", str(h.config_path)])
    answers["top"] = (code, capsys.readouterr().out, time.monotonic() - started)
    slow = {name: round(seconds, 2) for name, (_, _, seconds) in answers.items() if seconds >= 2}
    assert not slow, slow
    return answers


def test_a_hung_share_never_holds_up_a_gpu_and_everything_is_delivered_once_it_answers(hpc, tmp_path, sshfs_share,
                                                                                         stop_all, capsys):
    sshfs_share.attach()
    log = tmp_path / "notices.jsonl"
    (tmp_path / "recorder.py").write_text(RECORDER)
    h, sup, port = start(hpc, tmp_path, groups={"gpu_a": {"gpu": 0}}, hpc={"result_files": ["output/*"]},
                         results={"deliver_to": str(sshfs_share.mount), "retry_seconds": 1,
                                  "share_timeout_seconds": 2},
                         notify={"command": [sys.executable, str(tmp_path / "recorder.py"), str(log)],
                                 "events": ["share"]})
    stop_all(sup)
    db = Db(h)
    drop(h, "before")
    wait_until(lambda: delivered(db) == {"before"}, timeout=60, message="delivered while the share answers")

    sshfs_share.hang()
    for name, mode in (("fails_1", "fail"), ("ok_1", "ok"), ("fails_2", "fail"), ("ok_2", "ok")):
        drop(h, name, mode=mode)
    ages = []

    def reaper_age() -> float:
        ages.append(time.time() - db.value("SELECT heartbeat FROM workers WHERE name = 'reaper'"))
        return ages[-1]

    # One GPU: each failed case leaves it a zombie, which only the reaper frees for the next case.
    wait_until(lambda: reaper_age() < 60 and db.all_final(5)
               and db.value("SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'") == 0,
               timeout=120, interval=0.2, message="every case final and the GPU free while the share hangs")
    wait_until(lambda: (share_state(db) or {}).get("kind") == "not answering", timeout=30,
               message="the hung share recorded")
    assert max(ages) < 5, f"the reaper's heartbeat went {max(ages):.1f} s old"
    assert delivered(db) == {"before"}
    answers = operator_answers(h, capsys, db.case("ok_1")["case_id"])
    assert "results share not answering" in answers["status"][1] and answers["status"][0] == 0
    assert answers["health"][0] == 1 and "results share not answering" in answers["health"][1]
    assert answers["show"][0] == 0 and answers["top"][0] == 0 and "results share not answering" in answers["top"][1]
    started = time.monotonic()
    assert scrape(port)[("mqi_share_up", ())] == 0
    scrape_seconds = time.monotonic() - started
    assert scrape_seconds < 2, scrape_seconds
    seconds, status = timed(h, "status")  # a whole process: interpreter start and imports on a loaded machine
    assert seconds < 10 and "results share not answering" in status.stdout, (seconds, status.stderr)
    print(f"share hung: {', '.join(f'{k} {v[2]:.2f} s' for k, v in answers.items())}, scrape {scrape_seconds:.2f} s,"
          f" `mqic status` as a process {seconds:.2f} s, oldest reaper heartbeat {max(ages):.1f} s")

    sshfs_share.answer()
    wait_until(lambda: delivered(db) == {"before", "ok_1", "ok_2"} and share_state(db) is None, timeout=60,
               message="everything delivered once the share answers")
    for name in ("before", "ok_1", "ok_2"):
        record = json.loads(db.case(name)["result_checksums"])
        copy = sshfs_share.server / name
        assert content(copy) == {k: v["size"] for k, v in record.items()}
        assert all(sha256_of(copy / k) == v["sha256"] for k, v in record.items())
    assert not [p for p in sshfs_share.server.iterdir() if p.name.startswith(".mqic-")]
    assert mqic(h, "health").returncode == 0
    assert scrape(port)[("mqi_share_up", ())] == 1
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, timeout=30, message="two notices")
    assert [json.loads(line)["stdin"]["event"] for line in log.read_text().splitlines()] == ["share_down", "share_back"]


def test_an_unmounted_share_is_never_written_underneath_and_mounting_it_lets_delivery_through(
        hpc, tmp_path, sshfs_share, stop_all):
    h, sup, _ = start(hpc, tmp_path, hpc={"result_files": ["output/*"]},
                      results={"deliver_to": str(sshfs_share.mount), "retry_seconds": 1, "share_timeout_seconds": 5})
    stop_all(sup)
    db = Db(h)
    drop(h, "waits")
    wait_until(lambda: "ShareNotMounted" in delivery_error(db, "waits"), timeout=60,
               message="delivery refused: not mounted")
    time.sleep(1.5)  # a few more attempts (retry_seconds 1): still nothing may be written
    assert list(sshfs_share.mount.iterdir()) == [] and db.case("waits")["delivered_at"] is None
    assert (share_state(db) or {}).get("kind") == "not mounted"
    health = mqic(h, "health")
    assert health.returncode == 1 and "results share not mounted" in health.stdout

    sshfs_share.attach()                                       # the operator mounts the share
    wait_until(lambda: delivered(db) == {"waits"}, timeout=60, message="delivered into the share")
    assert (sshfs_share.server / "waits" / "output").is_dir()


def test_a_reaper_killed_mid_delivery_is_followed_by_a_delivery_within_retry_seconds(hpc, tmp_path, sshfs_share,
                                                                                    stop_all):
    sshfs_share.attach()
    retry = 3
    h, sup, _ = start(hpc, tmp_path, hpc={"result_files": ["output/*", "2*"]},
                      results={"deliver_to": str(sshfs_share.mount), "retry_seconds": retry,
                               "share_timeout_seconds": 30})
    stop_all(sup)
    db = Db(h)
    make_case(h.config.scanner.watch_path, "big", seconds=0.3, batches=3, deliveries=2, layers_per_delivery=3,
              ptn_bytes=4_000_000, atomic=True)   # ~24 MB of results: the copy takes a while over sftp

    def partial() -> list[Path]:
        return [p for p in sshfs_share.server.iterdir() if p.name.startswith(".mqic-partial-")]

    wait_until(lambda: partial(), timeout=120, interval=0.002, message="a delivery in the middle of its copy")
    sshfs_share.hang()                         # hold the copy where it is, its temporary folder half full
    reaper = int(sup.ctl("pid", "mqic:reaper").strip())
    os.kill(reaper, signal.SIGKILL)
    killed = time.monotonic()
    assert delivered(db) == set(), "the copy ended before the kill: the test proves nothing"
    sshfs_share.answer()
    wait_until(lambda: delivered(db) == {"big"}, timeout=60, interval=0.1, message="delivered again")
    took = time.monotonic() - killed
    print(f"delivered {took:.1f} s after the reaper was killed (retry_seconds {retry})")
    assert took < retry + 5, took              # the lease is short; the old one was 600 s
    assert partial() == [] and [p.name for p in sshfs_share.server.iterdir()] == ["big"]
    record = json.loads(db.case("big")["result_checksums"])
    assert content(sshfs_share.server / "big") == {k: v["size"] for k, v in record.items()}
