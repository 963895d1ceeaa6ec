"""mqic-top and the mqic command line against real SQLite files, spool folders and the sandbox sshd."""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared import queries
from console.cli import main as cli_main
from console.top import Reader, render
from shared import actions
from shared.backends import model, pueue
from shared.claims import claim_next_case
from shared.db import connect, transaction
from shared.lifecycle import move_case
from shared.liveness import beat
from shared.remote import Remote
from shared.seats import seat_specs, sync_slots
from shared.spool import Spool, settle_folder
from shared.states import CaseStatus, Outcome, SlotStatus
from shared.store import case_label, flag_for_review, get_case, register_case
from tests.conftest import base_config_data, cli, get_slot, make_config, wait_until

ROOT = Path(__file__).resolve().parents[1]


# -- a realistic database ---------------------------------------------------------------------------

def seed(config, now: float) -> dict[str, int]:
    """Six cases in every state, built with the same store/lifecycle calls the workers use.

    alpha running on gpu_a (task 11, flagged for review), bravo completed (upload 100 s,
    queue wait 100 s, run 1000 s), charlie failed before running, echo submitting on
    gpu_b, delta and foxtrot submitted. Heartbeats: scanner fresh, poller stale.
    """
    conn = connect(config.database_path)
    spool = Spool(config.spool_path).ensure()
    sync_slots(conn, seat_specs(config), now=now - 7200, worker="test")
    ids: dict[str, int] = {}

    def register(name: str, at: float) -> None:
        folder = config.scanner.watch_path / name
        folder.mkdir(parents=True)
        (folder / "plan.in").write_text(f"case {name}\n")
        case = register_case(conn, case_name=name, source_path=str(folder), now=at, worker="scanner")
        with spool.lock():
            settle_folder(conn, spool, case.case_id, now=at, worker="scanner")
        ids[name] = case.case_id

    def claim(at: float):
        return claim_next_case(conn, worker="submitter:1", now=at, lease_seconds=120).case

    def move(name: str, to: CaseStatus, at: float, slot_to=None, **fields) -> None:
        assert move_case(conn, spool, get_case(conn, ids[name]), to, now=at, worker="test",
                         fields=fields, slot_to=slot_to)

    register("alpha", now - 3100)
    claim(now - 3000)
    move("alpha", CaseStatus.RUNNING, now - 2900, task_id=11, started_at=now - 2800, progress=42.0,
         claimed_by=None, lease_until=None, remote_dir="/remote/1_alpha")
    register("bravo", now - 2600)
    claim(now - 2500)
    move("bravo", CaseStatus.RUNNING, now - 2400, task_id=12, started_at=now - 2300, claimed_by=None,
         lease_until=None)
    move("bravo", CaseStatus.COMPLETED, now - 1300, slot_to=SlotStatus.AVAILABLE, outcome="success",
         exit_code=0, progress=100.0, completed_at=now - 1300)
    register("charlie", now - 1250)
    claim(now - 1200)
    move("charlie", CaseStatus.FAILED, now - 1150, slot_to=SlotStatus.AVAILABLE, outcome="submit_error",
         error_type="RemoteError", error_message="pueue add: exit 1", completed_at=now - 1150,
         claimed_by=None, lease_until=None)
    register("echo", now - 900)
    claim(now - 100)
    register("delta", now - 50)
    register("foxtrot", now - 40)
    flag_for_review(conn, get_case(conn, ids["alpha"]), "no progress for 61 min in running",
                    now=now - 10, worker="reaper")
    beat(conn, "scanner", now=now)
    beat(conn, "poller", now=now - 1000)
    conn.close()
    return ids


@pytest.fixture
def world(tmp_path):
    config = make_config(tmp_path)
    ids = seed(config, time.time())
    return config, ids




def top_once(config, columns: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "console.top", "--once", "--config", str(config.source)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- mqic-top ---------------------------------------------------------------------------------------

@pytest.mark.system
def test_top_once_shows_totals_slots_cases_flags_and_heartbeats(world):
    config, _ = world
    result = top_once(config, 80)
    assert result.returncode == 0, result.stderr
    frame = result.stdout
    for status, count in (("submitted", 2), ("submitting", 1), ("running", 1), ("completed", 1), ("failed", 1)):
        assert re.search(rf"\b{status} {count}\b", frame), (status, frame)
    assert "gpu_a" in frame and "gpu_b" in frame and "assigned" in frame
    assert re.search(r"hpc\s+gpu_a\s+0\s+0\s+assigned\s+1 alpha\s+11\s+\d+m", frame)  # the case, task and age
    assert "host hpc (pueue, root@127.0.0.1): no contact recorded yet; seats 2/2 in use, 1" in frame
    assert re.search(r"1\s+alpha\s+running\s+hpc\s", frame)  # a case names its host
    for name in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot"):
        assert name in frame
    assert "42%" in frame
    assert "no progress for 61 min in running" in frame
    assert re.search(r"poller .*STALE", frame) and re.search(r"scanner .*alive", frame)
    assert "UNHEALTHY" in frame and "last DB change" in frame
    assert "KST" in frame  # times in the configured zone (Asia/Seoul)


@pytest.mark.system
def test_top_once_fits_a_narrow_terminal(world):
    config, _ = world
    result = top_once(config, 60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 60
    assert "gpu_a" in result.stdout and "alpha" in result.stdout and "STALE" in result.stdout


@pytest.mark.system
def test_top_says_when_the_database_is_missing(tmp_path):
    config = make_config(tmp_path)
    result = top_once(config, 80)
    assert result.returncode == 1
    frame = " ".join(result.stdout.split())
    assert "not found" in frame and "retrying" in frame


def test_top_survives_a_locked_database_and_recovers(world):
    config, _ = world
    reader = Reader(config)
    first, message = reader.read(time.time())
    assert message is None and first.totals["running"] == 1
    reader.close()  # an exclusive lock waits for every open connection; the reader reopens on its own
    locker = connect(config.database_path)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        view, message = reader.read(time.time())
        assert "locked" in message and view is first  # the last good data stays on screen
        frame = _text(render(view, config, time.time(), message))
        assert "database unavailable" in frame and "gpu_a" in frame
    finally:
        locker.execute("COMMIT")
        locker.close()
    view, message = reader.read(time.time())
    assert message is None and view is not first
    reader.close()


def _text(renderable) -> str:
    from rich.console import Console
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


# -- reading commands -------------------------------------------------------------------------------

def test_status_and_cases_text_and_json(world, capsys):
    config, ids = world
    code, out, _ = cli(capsys, config, "status")
    assert code == 0 and "gpu_a" in out and "submitted 2" in out and "poller" in out
    code, out, _ = cli(capsys, config, "status", "--json")
    status = json.loads(out)
    assert code == 0 and status["totals"]["running"] == 1 and status["health"]["healthy"] is False
    assert [s["group"] for s in status["slots"]] == ["gpu_a", "gpu_b"]
    assert status["slots"][0]["case_name"] == "alpha"

    code, out, _ = cli(capsys, config, "cases", "--json")
    listed = json.loads(out)
    assert code == 0 and [c["case_name"] for c in listed][:2] == ["foxtrot", "delta"]
    assert len(listed) == 6
    code, out, _ = cli(capsys, config, "cases", "--status", "failed", "--json")
    assert [c["case_name"] for c in json.loads(out)] == ["charlie"]
    code, out, _ = cli(capsys, config, "cases", "--limit", "2")
    assert code == 0 and "foxtrot" in out and "delta" in out and "alpha" not in out
    code, out, _ = cli(capsys, config, "cases")
    assert "REVIEW: no progress" in out
    code, _, err = cli(capsys, config, "cases", "--status", "bogus")
    assert code == 2 and "invalid choice" in err


@pytest.mark.system
def test_show_prints_row_events_and_says_when_the_hpc_is_unreachable(world, capsys):
    config, ids = world  # the base config's HPC (127.0.0.1:22, no key) is unreachable
    code, out, err = cli(capsys, config, "show", str(ids["alpha"]))
    assert code == 0, err
    assert "alpha" in out and "submitted -> submitting" in out and "flagged for review" in out
    assert "remote: host hpc unreachable" in out and "local data shown above" in out
    assert re.search(r"^\s+host: hpc$", out, re.MULTILINE)  # the host its folder and task are on
    code, out, _ = cli(capsys, config, "show", str(ids["alpha"]), "--json")
    shown = json.loads(out)
    assert shown["case"]["status"] == "running" and shown["case"]["pueue_task_id"] == 11
    assert [e["to_status"] for e in shown["events"]] == ["submitted", "submitting", "running", "running"]
    assert "unreachable" in shown["remote"]["error"]
    code, out, _ = cli(capsys, config, "show", str(ids["delta"]), "--json")
    assert json.loads(out)["remote"] is None  # no task yet: the HPC is not asked


def test_unknown_case_is_one_line_and_exit_1(world, capsys):
    config, _ = world
    for command in ("show", "retry", "cancel", "ack"):
        code, out, err = cli(capsys, config, command, "999")
        assert code == 1 and out == ""
        assert one_error_line(err) == "mqic: case 999 not found"


@pytest.mark.system
def test_bad_config_exits_2_with_one_line_per_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base_config_data(tmp_path), "hpc": {"host": "h"}}))
    for args in (["status"], ["cases", "--json"], ["health"]):
        try:
            code = cli_main(["--config", str(bad), *args])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == [  # every problem, one line each
            f"mqic: config error: hpc.{key}: missing, this key is required"
            for key in ("user", "identity_file", "known_hosts_file", "remote_base_dir")]
    result = subprocess.run([sys.executable, "-m", "console.cli", "--config", str(bad), "doctor"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and [line.split(" -> fix:")[0] for line in result.stdout.splitlines()] == [
        f"FAIL config: hpc.{key}: missing, this key is required"
        for key in ("user", "identity_file", "known_hosts_file", "remote_base_dir")]


def test_database_missing_is_one_line_and_exit_1(tmp_path, capsys):
    config = make_config(tmp_path)
    code, _, err = cli(capsys, config, "cases")
    assert code == 1 and "not found" in one_error_line(err)


# -- changing commands ------------------------------------------------------------------------------

@pytest.mark.system
def test_retry_is_refused_while_the_hpc_cannot_tell_about_the_old_task(world, capsys):
    config, ids = world
    code, _, err = cli(capsys, config, "retry", str(ids["charlie"]))
    assert code == 1 and "host hpc could not tell what its tasks are" in one_error_line(err)
    conn = connect(config.database_path, readonly=True)
    assert get_case(conn, ids["charlie"]).status is CaseStatus.FAILED
    conn.close()


def test_retry_moves_a_failed_case_and_its_folder_back_to_the_queue(world, capsys, monkeypatch):
    config, ids = world
    monkeypatch.setattr(actions.Operator, "snapshot", lambda self, host: model.Snapshot({}, {}))  # no HPC here
    code, out, err = cli(capsys, config, "retry", str(ids["charlie"]))
    assert code == 0, err
    conn = connect(config.database_path)
    case = get_case(conn, ids["charlie"])
    assert case.status is CaseStatus.SUBMITTED and case.attempts == 0 and case.next_attempt_at is None
    assert case.outcome is None and case.error_type is None and case.error_message is None
    queued = config.spool_path / "queued" / case.folder_name
    assert case.case_path == str(queued) and queued.is_dir() and (queued / "plan.in").exists()
    assert not (config.spool_path / "failed" / case.folder_name).exists()
    history = queries.events_of(conn, case.case_id)
    assert history[-1]["from_status"] == "failed" and history[-1]["worker"].startswith("mqic-cli")
    conn.close()
    code, _, err = cli(capsys, config, "retry", str(ids["alpha"]))
    assert code == 1 and "is running: only failed cases can be retried" in one_error_line(err)


def test_retry_by_outcome_and_all_failed(world, capsys, monkeypatch):
    config, ids = world
    monkeypatch.setattr(actions.Operator, "snapshot", lambda self, host: model.Snapshot({}, {}))  # no HPC here
    conn = connect(config.database_path)
    conn.execute("UPDATE cases SET outcome = 'failed' WHERE case_id = ?", (ids["charlie"],))
    conn.close()
    code, out, _ = cli(capsys, config, "retry", "--outcome", "killed")
    assert code == 0 and "no failed case matches" in out
    code, out, err = cli(capsys, config, "retry", "--all-failed")
    assert code == 0 and f"case {ids['charlie']}: failed (failed) -> submitted" in out, err
    code, _, err = cli(capsys, config, "retry", str(ids["charlie"]), "--all-failed")
    assert code == 1 and "give one case id, or --all-failed" in err


@pytest.mark.system
def test_cancel_submitted_running_and_refusals(world, capsys):
    config, ids = world
    code, out, err = cli(capsys, config, "cancel", str(ids["delta"]))
    assert code == 0, err
    conn = connect(config.database_path, readonly=True)
    delta = get_case(conn, ids["delta"])
    assert delta.status is CaseStatus.FAILED and delta.outcome == Outcome.CANCELLED.value
    assert Path(delta.case_path).parent == config.spool_path / "failed" and Path(delta.case_path).is_dir()

    code, out, err = cli(capsys, config, "cancel", str(ids["echo"]))
    assert code == 1 and "in flight" in one_error_line(err)
    code, out, err = cli(capsys, config, "cancel", str(ids["bravo"]))
    assert code == 1 and "already completed" in one_error_line(err)

    code, out, err = cli(capsys, config, "cancel", str(ids["alpha"]))  # the HPC cannot be reached
    assert code == 0 and "running -> failed (cancelled)" in out
    assert "could not stop its task now" in out and "the reaper stops it" in out
    alpha = get_case(conn, ids["alpha"])
    assert alpha.status is CaseStatus.FAILED and alpha.outcome == "cancelled"
    slot = get_slot(conn, "gpu_a")
    assert slot.status is SlotStatus.ZOMBIE and slot.assigned_case_id == ids["alpha"]
    conn.close()
    code, _, err = cli(capsys, config, "retry", str(ids["alpha"]))  # its task may still run
    assert code == 1 and "zombie" in one_error_line(err)


def test_ack_clears_the_review_flag_once(world, capsys):
    config, ids = world
    code, out, _ = cli(capsys, config, "ack", str(ids["alpha"]))
    assert code == 0 and "review flag cleared" in out
    conn = connect(config.database_path, readonly=True)
    assert get_case(conn, ids["alpha"]).needs_review is False
    conn.close()
    code, _, err = cli(capsys, config, "ack", str(ids["alpha"]))
    assert code == 1 and "no review flag" in one_error_line(err)


# -- health ------------------------------------------------------------------------------------------

def test_health_exit_codes(tmp_path, capsys):
    config = make_config(tmp_path)
    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "not found" in out
    now = time.time()
    seed(config, now)
    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "worker poller heartbeat" in out
    conn = connect(config.database_path)
    beat(conn, "poller", now=time.time())
    code, out, _ = cli(capsys, config, "health", "--json")
    assert code == 0 and json.loads(out) == {"healthy": True, "reasons": [], "drained": False, "notes": [], "hosts": [
        {"host": "hpc", "backend": "pueue", "reachable": None, "down_since": None, "problem": None, "drained": False,
         "seats": 2,
         "in_use": 2, "running": 1}]}

    strict = make_config(tmp_path, health={"unhealthy_after_seconds": 5})
    with transaction(conn):  # nothing changed for 60 s while cases are active
        conn.execute("UPDATE cases SET status_updated_at = status_updated_at - 60")
        conn.execute("UPDATE case_events SET at = at - 60")
    beat(conn, "scanner", now=time.time())
    beat(conn, "poller", now=time.time())
    conn.close()
    code, out, _ = cli(capsys, strict, "health")
    assert code == 1 and "no database change for" in out and "cases are active" in out


# -- backup -------------------------------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from shared.db import connect
from shared.store import register_case
conn = connect(sys.argv[1])
stop = Path(sys.argv[2])
n = 0
while not stop.exists():
    register_case(conn, case_name=f"w{n}", source_path=f"/nowhere/w{n}", now=time.time(), worker="writer")
    n += 1
"""


def count(path: Path, sql: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


@pytest.mark.system
def test_backup_is_consistent_while_a_writer_inserts(world, capsys, tmp_path):
    config, _ = world
    stop = tmp_path / "stop-writer"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(config.database_path), str(stop)], cwd=ROOT)
    try:
        wait_until(lambda: count(config.database_path, "SELECT COUNT(*) FROM cases") > 50, timeout=20,
                   message="writer inserting")
        code, out, err = cli(capsys, config, "backup", "--dest", str(tmp_path / "bk"))
        before = count(config.database_path, "SELECT COUNT(*) FROM cases")
        wait_until(lambda: count(config.database_path, "SELECT COUNT(*) FROM cases") > before + 20,
                   timeout=20, message="writer still inserting after the backup")
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert code == 0, err
    copy = Path(out.strip())
    assert re.fullmatch(r"backup_\d{8}\.db", copy.name) and copy.parent == tmp_path / "bk"
    assert count(copy, "PRAGMA integrity_check") == "ok"
    cases = count(copy, "SELECT COUNT(*) FROM cases")
    assert 50 < cases <= count(config.database_path, "SELECT COUNT(*) FROM cases")
    # one snapshot: every copied case has its registration event and nothing else is half there
    assert count(copy, "SELECT COUNT(*) FROM case_events WHERE from_status IS NULL") == cases
    assert not list((tmp_path / "bk").glob("*.partial")) and not Path(f"{copy}-wal").exists()


def test_backup_names_and_retention(world, capsys):
    config, _ = world
    folder = config.root_dir / "backups"
    folder.mkdir()
    for old in ("backup_20200101.db", "backup_20200102.db", "backup_20200103_120000.db", "notes.txt"):
        (folder / old).write_text("old")
    code, out, err = cli(capsys, config, "backup", "--keep", "2")
    first = Path(out.strip())
    assert code == 0 and re.fullmatch(r"backup_\d{8}\.db", first.name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["backup_20200103_120000.db", first.name, "notes.txt"])
    assert "removed old backup" in err
    code, out, _ = cli(capsys, config, "backup", "--keep", "2")
    second = Path(out.strip())
    assert re.fullmatch(r"backup_\d{8}_\d{6}(_\d+)?\.db", second.name)
    assert sorted(p.name for p in folder.iterdir()) == sorted([first.name, second.name, "notes.txt"])
    code, _, err = cli(capsys, config, "backup", "--keep", "0")
    assert code == 1 and "--keep" in one_error_line(err)


# -- doctor, show and cancel against the sandbox -----------------------------------------------------

def test_doctor_without_pueue_names_the_failing_check_and_its_fix(remote_config, capsys):
    code, out, _ = cli(capsys, remote_config, "doctor")
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert code == 1
    assert lines["OK   config"] and lines["OK   identity_file"] and lines["OK   known_hosts"]
    assert "answers" in lines["OK   ssh"]
    assert "-> fix: install pueue on the HPC" in lines["FAIL pueue"]
    assert "FAIL pueue groups" in lines
    assert "is writable" in lines["OK   remote base dir"]


def test_doctor_flags_an_open_key_and_a_missing_host_entry(tmp_path, sshd, capsys):
    key = tmp_path / "open_key"
    shutil.copy(sshd.endpoint.identity_file, key)
    key.chmod(0o644)
    (tmp_path / "known_hosts").write_text("")
    control = Path(f"/tmp/mqic-t-doctor-{os.getpid()}")
    config = make_config(tmp_path, hpc={"identity_file": str(key), "known_hosts_file": str(tmp_path / "known_hosts"),
                                        "port": sshd.endpoint.port, "connect_timeout_seconds": 3,
                                        "control_dir": str(control)})
    try:
        code, out, _ = cli(capsys, config, "doctor")
    finally:
        shutil.rmtree(control, ignore_errors=True)
    assert code == 1
    assert f"FAIL identity_file: {key} has mode 644" in out and f"fix: chmod 600 {key}" in out
    assert f"FAIL known_hosts: no entry for [127.0.0.1]:{sshd.endpoint.port}" in out and "ssh-keyscan" in out
    assert "FAIL ssh host key:" in out and "no key for it in known_hosts" in out and "FAIL pueue: skipped" in out


@pytest.mark.system
def test_sandbox_up_doctor_show_cancel_down(tmp_path, capsys):
    root = tmp_path / "sbx"
    code, out, err = cli_sandbox(capsys, "up", root)
    try:
        assert code == 0, err
        config_path = root / "config.yaml"
        assert f"config: {config_path.resolve()}" in out and "export MQIC_CONFIG=" in out
        assert "supervisord -c supervisord.conf" in out
        from shared.config import load_config
        config = load_config(config_path)
        code, out, _ = cli(capsys, config, "doctor")
        assert "OK   ssh" in out and "OK   pueue: version 4.0.4" in out and "OK   remote base dir" in out
        assert code == 1 and "FAIL pueue groups: missing on the HPC: gpu_a, gpu_b" in out
        assert "pueue group add gpu_a -p 1" in out
        remote, cmd = Remote(config.hosts[0].hpc), list(config.hosts[0].hpc.pueue_command)
        pueue.ensure_groups(remote, cmd, {"gpu_a": 1, "gpu_b": 1})
        code, out, _ = cli(capsys, config, "doctor")
        assert code == 0, out
        assert all(line.startswith("OK") for line in out.strip().splitlines())

        case_id = running_case_with_task(config, remote, cmd)
        code, out, _ = cli(capsys, config, "show", str(case_id), "--json")
        shown = json.loads(out)
        assert code == 0 and shown["remote"]["state"] == "running"
        assert shown["remote"]["label"] == case_label(case_id)
        assert shown["remote"]["verdict"] == {"action": "wait", "outcome": None, "uses_attempt": False,
                                              "why": "progress read from its log"}
        code, out, err = cli(capsys, config, "cancel", str(case_id))
        assert code == 0 and "sigterm" in out, err
        task_id = shown["remote"]["task_id"]
        wait_until(lambda: pueue.statuses(remote, cmd).tasks[task_id].state is model.TaskState.KILLED,
                   timeout=15, message="task killed")
        code, out, _ = cli(capsys, config, "show", str(case_id))  # our own signal: nothing left to decide
        assert "verdict: wait: killed by our own signal" in out and "(the case is failed;" in out
        remote.close()
    finally:
        code, out, _ = cli_sandbox(capsys, "down", root)
        shutil.rmtree(yaml.safe_load((root / "config.yaml").read_text())["hpc"]["control_dir"], ignore_errors=True)
    assert code == 0 and "sandbox stopped" in out


def cli_sandbox(capsys, action: str, root: Path) -> tuple[int, str, str]:
    code = cli_main(["sandbox", action, "--root", str(root)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def running_case_with_task(config, remote: Remote, cmd: list[str]) -> int:
    """A running case whose pueue task really runs (a long sleep) in group gpu_a."""
    conn = connect(config.database_path)
    spool = Spool(config.spool_path).ensure()
    sync_slots(conn, seat_specs(config), now=time.time(), worker="test")
    folder = config.scanner.watch_path / "sleeper"
    folder.mkdir(parents=True)
    case = register_case(conn, case_name="sleeper", source_path=str(folder), now=time.time(), worker="test")
    with spool.lock():
        settle_folder(conn, spool, case.case_id, now=time.time(), worker="test")
    claim = claim_next_case(conn, worker="test", now=time.time(), lease_seconds=60, seats=[("hpc", "gpu_a")])
    workdir = remote.base_dir()
    task_id = pueue.submit(remote, cmd, group="gpu_a", label=case_label(case.case_id), workdir=workdir,
                           command="sleep 60")
    assert move_case(conn, spool, claim.case, CaseStatus.RUNNING, now=time.time(), worker="test",
                     fields={"task_id": task_id, "claimed_by": None, "lease_until": None})
    wait_until(lambda: pueue.statuses(remote, cmd).tasks[task_id].state is model.TaskState.RUNNING,
               timeout=15, message="task running")
    conn.close()
    return case.case_id


# -- 100,000 cases -------------------------------------------------------------------------------------

def seed_many(config, n: int) -> None:
    """``n`` cases (mostly completed) with their events, in one transaction."""
    conn = connect(config.database_path)
    now = time.time() - 2 * n
    sync_slots(conn, seat_specs(config), now=now, worker="test")
    statuses = ["completed"] * 90 + ["failed"] * 4 + ["submitted"] * 4 + ["running"] * 2
    stage = {"completed": "done", "failed": "failed", "submitted": "queued", "running": "active"}
    rows, events = [], []
    for i in range(1, n + 1):
        status, t = statuses[i % 100], now + 2 * i
        started = t + 20 if status in ("completed", "running") else None
        done = {"completed": started and started + 1000, "failed": t + 1}.get(status)
        rows.append((i, f"case{i}", f"/spool/{stage[status]}/{i}_case{i}", f"/in/case{i}", stage[status], status,
                     t, done or t, started, done, int(i % 997 == 0), "stuck" if i % 997 == 0 else None))
        events.append((i, None, "submitted", t))
        if status in ("completed", "running"):
            events += [(i, "submitted", "submitting", t + 5), (i, "submitting", "running", t + 15)]
        if status in ("completed", "failed"):
            events.append((i, "running" if status == "completed" else "submitted", status, done))
    with transaction(conn):
        conn.executemany(
            "INSERT INTO cases (case_id, case_name, case_path, source_path, spool_stage, status, submitted_at,"
            " status_updated_at, started_at, completed_at, needs_review, review_reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO case_events (case_id, from_status, to_status, at, worker)"
                         " VALUES (?, ?, ?, ?, 'seed')", events)
    beat(conn, "poller", now=time.time())
    conn.close()


def plan(conn: sqlite3.Connection, sql: str, params: tuple = ()) -> list[str]:
    return [row["detail"] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def assert_no_full_scan(conn: sqlite3.Connection, sql: str, params: tuple = (), *, ordered_walk: str = "",
                        sorts_few: bool = False) -> None:
    """No table or event log is read whole: every step searches an index (or walks the
    primary key of ``ordered_walk`` in order with a LIMIT/early stop). Nothing is sorted,
    unless ``sorts_few``: the index already cut the rows down to a handful."""
    details = plan(conn, sql, params)
    for detail in details:
        assert sorts_few or "USE TEMP B-TREE" not in detail, (sql, details)
        match = re.match(r"SCAN (\w+)", detail)
        if match and "INDEX" not in detail:
            assert match.group(1) in (ordered_walk, "g", "gpu_resources", "workers"), (sql, details)


@pytest.mark.system
def test_100k_cases_frame_and_listing_use_indexes(tmp_path, capsys):
    config = make_config(tmp_path)
    started = time.perf_counter()
    seed_many(config, 100_000)
    timings = [f"seeded 100,000 cases in {time.perf_counter() - started:.2f}s"]

    started = time.perf_counter()
    result = top_once(config, 100)
    timings.append(f"mqic-top --once (a process, imports included): {time.perf_counter() - started:.2f}s")
    assert result.returncode == 0, result.stderr
    assert re.search(r"completed 90000\b", result.stdout) and "case100000" in result.stdout

    started = time.perf_counter()
    code, out, _ = cli(capsys, config, "cases", "--limit", "50")
    timings.append(f"mqic cases --limit 50 (in process): {time.perf_counter() - started:.3f}s")
    assert code == 0 and len(out.strip().splitlines()) == 51 and "case100000" in out

    conn = connect(config.database_path, readonly=True)
    started = time.perf_counter()
    samples = queries.phase_samples(conn, 0, queries.newest_event_id(conn))
    timings.append(f"exporter's first pass over every event: {time.perf_counter() - started:.2f}s,"
                   f" {len(samples)} samples")
    with capsys.disabled():
        print("\n" + "\n".join(timings))
    assert_no_full_scan(conn, queries.TOTAL_SQL, ("completed",))
    assert_no_full_scan(conn, queries.RECENT_SQL, (10,))
    assert_no_full_scan(conn, queries.NEWEST_SQL, (50,), ordered_walk="cases")
    assert_no_full_scan(conn, queries.NEWEST_WITH_STATUS_SQL, ("failed", 50))
    assert_no_full_scan(conn, queries.FLAGGED_SQL, (20,), sorts_few=True)  # partial index: flagged only
    assert "USING INDEX cases_for_review" in " ".join(plan(conn, queries.FLAGGED_SQL, (20,)))
    assert_no_full_scan(conn, queries.SLOTS_SQL)
    assert_no_full_scan(conn, queries.SEATS_BY_HOST_SQL)
    assert_no_full_scan(conn, queries.REACH_SQL, ordered_walk="host_reach")  # one row per host
    assert_no_full_scan(conn, queries.RUNNING_BY_HOST_SQL, sorts_few=True)  # the running cases only
    assert "USING INDEX cases_by_status" in " ".join(plan(conn, queries.RUNNING_BY_HOST_SQL))
    assert_no_full_scan(conn, "SELECT MAX(status_updated_at) FROM cases")
    assert_no_full_scan(conn, "SELECT at FROM case_events ORDER BY event_id DESC LIMIT 1", ordered_walk="case_events")
    assert_no_full_scan(conn, queries.PHASE_EVENTS_SQL, (100, 200))
    assert_no_full_scan(conn, queries.MOVES_SQL, (100, 200, "failed"))
    assert_no_full_scan(conn, queries.SLOT_EVENTS_NEWEST_FIRST_SQL, ordered_walk="slot_events")  # stops at the window
    assert_no_full_scan(conn, "SELECT * FROM case_events WHERE case_id = ? ORDER BY event_id", (5,))
    assert "USING INDEX cases_by_status" in " ".join(plan(conn, queries.NEWEST_WITH_STATUS_SQL, ("failed", 50)))
    conn.close()
