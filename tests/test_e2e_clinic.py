"""End to end, day-to-day features: real supervisord runs the real workers against the sandbox HPC
(sshd + pueue stand-in); the operator's commands run as processes, as an operator would run them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from sandbox.procs import processes_with
from sandbox.sshd import free_port
from shared.db import connect
from shared.delivery import sha256_of
from tests.conftest import wait_until
from tests.test_e2e import REPO, Supervisor
from tests.test_exporter import scrape

pytestmark = pytest.mark.system  # every test here starts real processes

SECOND = 1 / 86400  # retention is configured in days


def start(make_hpc, tmp_path, groups=None, **sections):
    """The sandbox HPC plus supervisord running every program with a fast, test-sized config."""
    port = free_port()
    overrides = {"scanner": {"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 1},
                 "main_loop": {"interval_seconds": 0.3, "backoff_base_seconds": 1, "lease_seconds": 20},
                 "hpc": {"connect_timeout_seconds": 3, "command_timeout_seconds": 15}, "metrics": {"port": port}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    h = make_hpc(groups=groups or {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}, **overrides)
    sup = Supervisor(tmp_path, h.config_path)
    sup.start()
    return h, sup, port


def drop(h, name, *, seconds=0.3, mode="ok", marker=None):
    make_case(h.config.scanner.watch_path, name, seconds=seconds, batches=3, mode=mode, deliveries=2,
              layers_per_delivery=3, marker=marker, atomic=True)


def mqic(h, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "console.cli", "--config", str(h.config_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


class Db:
    def __init__(self, h):
        self.conn = connect(h.config.database_path)

    def value(self, sql: str, params: tuple = ()):
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def case(self, name: str):
        return self.conn.execute("SELECT * FROM cases WHERE case_name = ?", (name,)).fetchone()

    def statuses(self) -> dict[str, str]:
        return {r["case_name"]: r["status"] for r in self.conn.execute("SELECT case_name, status FROM cases")}

    def claim_order(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT c.case_name FROM case_events e JOIN cases c USING (case_id)"
            " WHERE e.from_status = 'submitted' AND e.to_status = 'submitting' ORDER BY e.event_id")]

    def all_final(self, count: int) -> bool:
        return self.value("SELECT COUNT(*) FROM cases WHERE status IN ('completed', 'failed')") == count


@pytest.fixture
def stop_all():
    running = []
    yield running.append
    for sup in running:
        sup.shutdown()


# -- urgent first ------------------------------------------------------------------------------------

def test_an_urgent_case_overtakes_a_queue_of_normal_ones(hpc, tmp_path, stop_all):
    h, sup, _ = start(hpc, tmp_path, groups={"gpu_a": {"gpu": 0}}, scanner={"urgent_name_pattern": "^STAT_"})
    stop_all(sup)
    db = Db(h)
    drop(h, "n1", seconds=5)
    wait_until(lambda: db.statuses().get("n1") == "running", timeout=30, message="n1 running")
    for name in ("n2", "n3", "n4"):
        drop(h, name)
    wait_until(lambda: len(db.statuses()) == 4, timeout=20, message="the normal queue registered")
    drop(h, "STAT_u1")                 # urgent by its name
    drop(h, "u2", marker="_URGENT")    # urgent by its marker file
    wait_until(lambda: len(db.statuses()) == 6, timeout=20, message="the urgent cases registered")
    result = mqic(h, "priority", str(db.case("n4")["case_id"]), "urgent")  # urgent by the operator
    assert result.returncode == 0 and "priority urgent (was normal)" in result.stdout, result.stderr
    assert db.statuses()["n1"] == "running", "n1 ended before the queue was set up; the test proves nothing"
    listing = mqic(h, "cases").stdout
    assert sum(" urgent " in line for line in listing.splitlines()) == 3

    wait_until(lambda: db.all_final(6), timeout=90, interval=0.3, message="every case final")
    assert set(db.statuses().values()) == {"completed"}
    # n1 held the only GPU; then the urgent ones, oldest first (n4 was registered before the others)
    assert db.claim_order() == ["n1", "n4", "STAT_u1", "u2", "n2", "n3"]


# -- drain and resume ---------------------------------------------------------------------------------

def test_a_drained_system_claims_nothing_even_after_a_restart_and_resumes(hpc, tmp_path, stop_all):
    h, sup, port = start(hpc, tmp_path)
    stop_all(sup)
    db = Db(h)
    drop(h, "in flight", seconds=3)
    wait_until(lambda: db.statuses().get("in flight") == "running", timeout=30, message="a case running")
    result = mqic(h, "drain", "--reason", "GPU driver update")
    assert result.returncode == 0 and "drained since" in result.stdout, result.stderr
    for name in ("w1", "w2", "w3"):
        drop(h, name)
    wait_until(lambda: len(db.statuses()) == 4, timeout=20, message="the waiting cases registered")
    wait_until(lambda: db.statuses()["in flight"] == "completed", timeout=30, message="the running case finished")

    def passes_of_the_submitter(count: int) -> None:
        first = db.value("SELECT heartbeat FROM workers WHERE name = 'submitter'")
        wait_until(lambda: db.value("SELECT heartbeat FROM workers WHERE name = 'submitter'") > first + count * 0.3,
                   timeout=30, message="submitter passes")

    def claimed_nothing() -> None:
        assert db.claim_order() == ["in flight"]
        assert db.value("SELECT COUNT(*) FROM cases WHERE staged_at IS NOT NULL OR status != 'submitted'") == 1
        assert len(h.status()["tasks"]) == 1

    passes_of_the_submitter(5)
    claimed_nothing()
    status = mqic(h, "status")
    assert "DRAINED hpc since" in status.stdout and "GPU driver update" in status.stdout
    health = mqic(h, "health")
    assert health.returncode == 0 and "drained since" in health.stdout, health.stdout
    assert scrape(port)[("mqi_drained", (("host", "hpc"),))] == 1

    sup.shutdown()                      # the whole workstation restarts
    restarted = time.time()
    sup.start()
    wait_until(lambda: db.value("SELECT COUNT(*) FROM workers WHERE name = 'submitter' AND heartbeat > ?",
                                (restarted,)) == 1, timeout=30, message="submitter back")
    passes_of_the_submitter(5)
    claimed_nothing()                   # the drain is in the database, not in a process

    result = mqic(h, "resume")
    assert result.returncode == 0 and "resumed" in result.stdout, result.stderr
    wait_until(lambda: db.all_final(4), timeout=60, interval=0.3, message="every case final")
    assert set(db.statuses().values()) == {"completed"}
    wait_until(lambda: answers(port), timeout=30, message="exporter back")
    assert scrape(port)[("mqi_drained", (("host", "hpc"),))] == 0


def answers(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


# -- results delivery and retention ------------------------------------------------------------------

class DeliveryWatcher(threading.Thread):
    """Looks into deliver_to every few milliseconds, remembering every folder content it ever saw."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.seen, self.stop = folder, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            for entry in list(self.folder.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue  # temporary names (a reader ignores them) and the file in the way
                try:
                    self.seen.append((entry.name, content(entry)))
                except OSError:
                    pass  # replaced while we looked


def content(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_results_are_delivered_whole_and_clean_up_removes_exactly_what_its_rules_allow(hpc, tmp_path, stop_all):
    tps = tmp_path / "tps"
    tps.mkdir()
    (tps / "blocked").write_text("a file where the results should go: delivery must wait")
    watcher = DeliveryWatcher(tps)
    watcher.start()
    h, sup, port = start(hpc, tmp_path, groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}, "gpu_c": {"gpu": 2}},
                         hpc={"result_files": ["output/*", "2*"]},
                         results={"deliver_to": str(tps), "retry_seconds": 1, "expect_mount": False},
                         retention={"remote_days": 4 * SECOND, "local_days": 8 * SECOND})
    stop_all(sup)
    db = Db(h)
    for name in ("ok_1", "ok_2", "blocked"):
        drop(h, name)
    for name in ("bad_1", "bad_2"):
        drop(h, name, mode="fail")
    wait_until(lambda: db.all_final(5), timeout=60, interval=0.3, message="every case final")
    wait_until(lambda: db.value("SELECT COUNT(*) FROM cases WHERE delivered_at IS NOT NULL") == 2, timeout=30,
               message="two deliveries")
    assert mqic(h, "ack", str(db.case("bad_2")["case_id"])).returncode == 0
    rows = {name: db.case(name) for name in ("ok_1", "ok_2", "blocked", "bad_1", "bad_2")}
    remote = {name: row["remote_dir"] for name, row in rows.items()}
    local = {name: Path(row["case_path"]) for name, row in rows.items()}
    # Clean-up may already be at work (4 s after a case ended; a loaded machine takes longer than that to get
    # here): every remote folder is still there or clean-up removed it and said so, nothing else took one.
    wait_until(lambda: all(os.path.isdir(path) or db.case(name)["remote_removed_at"] is not None
                           for name, path in remote.items()), timeout=10, message="remote folders there or cleaned")

    def removed(column: str) -> set[str]:
        return {r[0] for r in db.conn.execute(f"SELECT case_name FROM cases WHERE {column} IS NOT NULL")}

    wait_until(lambda: removed("local_removed_at") == {"ok_1", "ok_2"}, timeout=30, message="local clean-up")
    wait_until(lambda: removed("remote_removed_at") == {"ok_1", "ok_2", "bad_2"}, timeout=30,
               message="remote clean-up")
    assert {n for n, p in remote.items() if not os.path.exists(p)} == {"ok_1", "ok_2", "bad_2"}
    assert {n for n, p in local.items() if not p.exists()} == {"ok_1", "ok_2"}  # failed folders stay local
    blocked = db.case("blocked")
    assert blocked["status"] == "completed" and blocked["delivery_error"] and blocked["delivered_at"] is None
    assert "exists and is not a folder" in blocked["delivery_error"] and local["blocked"].is_dir()

    plan = mqic(h, "cleanup", "--dry-run").stdout
    assert f"keep         remote case {blocked['case_id']} blocked" in plan and "results not delivered yet" in plan
    assert f"case {rows['bad_1']['case_id']} bad_1" in plan and "not acknowledged" in plan
    listing = mqic(h, "cases").stdout
    assert "DELIVERY FAILING" in listing and listing.count("delivered") >= 2
    health = mqic(h, "health")
    assert health.returncode == 1 and "results delivery failing for 1 cases" in health.stdout
    metrics = scrape(port)
    assert metrics[("mqi_retention_removed_total", (("where", "remote"),))] == 3
    assert metrics[("mqi_retention_removed_total", (("where", "local"),))] == 2
    assert metrics[("mqi_results_delivered_total", ())] == 2
    assert metrics[("mqi_results_delivery_failing", ())] == 1

    (tps / "blocked").unlink()           # the operator clears the way: the retry delivers, then it is cleaned up
    wait_until(lambda: "blocked" in removed("local_removed_at") and "blocked" in removed("remote_removed_at"),
               timeout=30, message="the blocked case delivered and cleaned up")
    watcher.stop.set()
    watcher.join()

    assert db.statuses() == {"ok_1": "completed", "ok_2": "completed", "blocked": "completed",
                             "bad_1": "failed", "bad_2": "failed"}   # rows stay
    assert os.path.isdir(remote["bad_1"])                             # failed, never acknowledged
    assert sorted(p.name for p in tps.iterdir()) == ["blocked", "ok_1", "ok_2"]  # no temporary left
    for name in ("ok_1", "ok_2", "blocked"):
        row = db.case(name)
        sums = json.loads(row["result_checksums"])
        delivered = tps / name
        assert set(sums) == set(content(delivered)) and any(k.startswith("output/") for k in sums)
        assert len(sums) > 10 and all(k.startswith(("output/", "2")) for k in sums)
        assert all(sha256_of(delivered / k) == v["sha256"] and (delivered / k).stat().st_size == v["size"]
                   for k, v in sums.items())
    final = {name: content(tps / name) for name in ("ok_1", "ok_2", "blocked")}
    assert {name for name, _ in watcher.seen} == set(final)
    assert all(seen == final[name] for name, seen in watcher.seen), "a partial delivery was seen"


# -- a hanging notifier ---------------------------------------------------------------------------------

def test_a_hanging_notifier_does_not_slow_the_pipeline(hpc, tmp_path, stop_all):
    token = f"mqic-hanging-notifier-{os.getpid()}-{time.time_ns()}"
    h, sup, _ = start(hpc, tmp_path, groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}, "gpu_c": {"gpu": 2}},
                      notify={"command": [sys.executable, "-c", "import time; time.sleep(3600)", token],
                              "timeout_seconds": 8, "max_attempts": 1})
    stop_all(sup)
    db = Db(h)
    started = time.monotonic()
    for index in range(3):
        drop(h, f"fails_{index}", seconds=0.6, mode="fail")
        drop(h, f"ok_{index}", seconds=0.6)
    ages = []

    def reaper_age() -> float:
        age = time.time() - (db.value("SELECT heartbeat FROM workers WHERE name = 'reaper'") or time.time())
        ages.append(age)
        return age

    wait_until(lambda: reaper_age() is not None and db.all_final(6) and
               db.value("SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'") == 0,
               timeout=60, interval=0.2, message="every case final and every GPU free")
    elapsed = time.monotonic() - started
    assert processes_with(token), "the notifier should be hanging right now"
    # Each failure made its GPU a zombie until the reaper saw the task gone. A reaper waiting for the
    # notifier (8 s per notice, one per finished case) would hold those GPUs for many seconds.
    zombie_seconds = [r[0] for r in db.conn.execute(
        "SELECT f.at - z.at FROM slot_events z JOIN slot_events f ON f.pueue_group = z.pueue_group"
        " AND f.from_status = 'zombie' AND f.event_id = (SELECT MIN(event_id) FROM slot_events x"
        "   WHERE x.pueue_group = z.pueue_group AND x.event_id > z.event_id AND x.from_status = 'zombie')"
        " WHERE z.to_status = 'zombie'")]
    print(f"zombie GPU seconds {zombie_seconds}, oldest reaper heartbeat {max(ages):.1f} s, all final in {elapsed:.1f} s")
    assert len(zombie_seconds) == 3 and max(zombie_seconds) < 5, zombie_seconds  # well under the 8 s limit
    assert max(ages) < 5, f"reaper heartbeat went {max(ages):.1f} s old"
    assert elapsed < 30, f"six short cases took {elapsed:.1f} s"
    wait_until(lambda: db.value("SELECT COUNT(*) FROM notices WHERE last_error LIKE 'no answer within 8 s%'") >= 1,
               timeout=30, message="the hanging notifier killed at its time limit")
    assert statuses_ok(db)
    sup.shutdown()
    stop_all_done = wait_until(lambda: not processes_with(token), timeout=10, message="no notifier left behind")
    assert stop_all_done


def statuses_ok(db: Db) -> bool:
    return db.statuses() == {**{f"fails_{i}": "failed" for i in range(3)}, **{f"ok_{i}": "completed" for i in range(3)}}
