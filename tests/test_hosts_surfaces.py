"""The operator surfaces with two hosts: ``mqic status/health/drain/resume/show/doctor``, ``mqic-top``,
the exporter and the notices name every host and seat. Real SQLite files written through the store,
the sandbox sshd and two pueue stand-ins; no mocks."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandbox.sshd import free_port
from shared.backends import model, pueue
from shared.claims import claim_next_case
from shared.config import parse_config
from shared.db import connect, transaction
from shared.lifecycle import move_case
from shared.liveness import beat, note_remote
from shared.notify import collect_events, watch_reachability
from shared.remote import Remote
from shared.seats import seat_specs, sync_slots
from shared.spool import Spool, settle_folder
from shared.states import CaseStatus, SlotStatus
from shared.store import case_label, get_case, register_case
from tests.conftest import cli, hpc_overrides, make_hosts_config, wait_until
from workers.exporter import DbCollector

ROOT = Path(__file__).resolve().parents[1]
HOSTS = [
    {"name": "gpu1", "host": "127.0.0.1", "groups": {"gpu_a": {"gpu": 0, "depth": 2}}},
    {"name": "gpu2", "host": "gpu2.example.org", "port": 2222, "groups": {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}},
]
DOWN = "Unreachable: ssh: connect to host gpu2.example.org port 2222: Connection timed out"




class World:
    """Two hosts' seats and cases, written with the calls the workers use."""

    def __init__(self, config, now: float):
        self.config, self.now = config, now
        self.conn = connect(config.database_path)
        self.spool = Spool(config.spool_path).ensure()
        sync_slots(self.conn, seat_specs(config), now=now - 7200, worker="test")

    def register(self, name: str, at: float):
        folder = self.config.scanner.watch_path / name
        folder.mkdir(parents=True)
        (folder / "plan.in").write_text(f"case {name}\n")
        case = register_case(self.conn, case_name=name, source_path=str(folder), now=at, worker="scanner")
        with self.spool.lock():
            settle_folder(self.conn, self.spool, case.case_id, now=at, worker="scanner")
        return get_case(self.conn, case.case_id)

    def running(self, name: str, at: float, host: str, group: str, task_id: int):
        """A case claimed with a seat of ``host``/``group`` at ``at`` and running there."""
        self.register(name, at - 10)
        claim = claim_next_case(self.conn, worker="submitter:1", now=at, lease_seconds=120, seats=[(host, group)])
        assert claim.case.case_name == name and claim.host == host
        assert move_case(self.conn, self.spool, claim.case, CaseStatus.RUNNING, now=at + 5, worker="test",
                         fields={"task_id": task_id, "claimed_by": None, "lease_until": None})
        return get_case(self.conn, claim.case.case_id)


@pytest.fixture
def world(tmp_path):
    """gpu1 (gpu_a, depth 2): a1 and a2 running, reachable; gpu2 (gpu_a, gpu_b): b1 running on gpu_b,
    unreachable for 10 minutes; w waiting."""
    now = time.time()
    w = World(make_hosts_config(tmp_path, HOSTS), now)
    w.cases = {"a1": w.running("a1", now - 3000, "gpu1", "gpu_a", 7),
               "a2": w.running("a2", now - 1000, "gpu1", "gpu_a", 8),
               "b1": w.running("b1", now - 500, "gpu2", "gpu_b", 3)}
    w.cases["w"] = w.register("w", now - 100)
    note_remote(w.conn, "gpu1", "poller", ok=True, now=now - 5)
    note_remote(w.conn, "gpu2", "poller", ok=False, now=now - 600, error=DOWN)
    note_remote(w.conn, "gpu2", "submitter", ok=False, now=now - 60, error=DOWN)
    for name in ("poller", "scanner", "submitter", "reaper"):
        beat(w.conn, name, now=now)
    yield w
    w.conn.close()


# -- status, top, health, cases ------------------------------------------------------------------------

def test_status_lists_both_hosts_with_their_reach_and_seats_and_every_seat(world, capsys):
    code, out, err = cli(capsys, world.config, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    hosts = {h["name"]: h for h in status["hosts"]}
    assert list(hosts) == ["gpu1", "gpu2"]
    gpu1, gpu2 = hosts["gpu1"], hosts["gpu2"]
    assert (gpu1["backend"], gpu1["address"], gpu1["seats"], gpu1["in_use"], gpu1["running"]) == \
        ("pueue", "root@127.0.0.1", 2, 2, 2)
    assert (gpu2["backend"], gpu2["address"], gpu2["seats"], gpu2["in_use"], gpu2["running"]) == \
        ("pueue", "root@gpu2.example.org:2222", 2, 1, 1)
    assert gpu1["remote"]["reachable"] is True and gpu1["drain"] is None
    assert gpu2["remote"]["reachable"] is False and gpu2["remote"]["down_since"] == world.now - 600
    assert gpu2["remote"]["error"] == DOWN and gpu2["remote"]["checked_by"] == "submitter"
    seats = [(s["host"], s["group"], s["seat"], s["status"], s["case_name"]) for s in status["slots"]]
    assert seats == [("gpu1", "gpu_a", 0, "assigned", "a1"), ("gpu1", "gpu_a", 1, "assigned", "a2"),
                     ("gpu2", "gpu_a", 0, "available", None), ("gpu2", "gpu_b", 0, "assigned", "b1")]

    code, out, _ = cli(capsys, world.config, "status")
    text = " ".join(out.split())
    assert code == 0
    assert re.search(r"host gpu1 \(pueue, root@127\.0\.0\.1\): reachable at [\d:\- ]+; seats 2/2 in use, 2 running", text)
    assert re.search(r"host gpu2 \(pueue, root@gpu2\.example\.org:2222\): UNREACHABLE since [\d:\- ]+ \(10m0\ds\):"
                     rf" {re.escape(DOWN)}; seats 1/2 in use, 1 running", text), text
    for row in (r"gpu1 gpu_a 0 0 assigned 1 a1 7", r"gpu1 gpu_a 1 0 assigned 2 a2 8", r"gpu2 gpu_a 0 0 available -",
                r"gpu2 gpu_b 0 1 assigned 3 b1 3"):
        assert re.search(row, text), (row, out)


@pytest.mark.system
def test_top_shows_a_line_per_host_every_seat_and_where_each_case_is(world):
    env = {**os.environ, "COLUMNS": "120"}
    result = subprocess.run([sys.executable, "-m", "console.top", "--once", "--config", str(world.config.source)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    frame = result.stdout
    assert "host gpu1 (pueue, root@127.0.0.1): reachable at" in frame
    assert "host gpu2 (pueue, root@gpu2.example.org:2222): UNREACHABLE since" in frame
    assert re.search(r"gpu1\s+gpu_a\s+1\s+0\s+assigned\s+2 a2\s+8\s", frame)
    assert re.search(r"gpu2\s+gpu_a\s+0\s+0\s+available\s+-", frame)
    assert re.search(r"b1\s+running\s+gpu2\s", frame) and re.search(r"w\s+submitted\s+-\s", frame)


def test_health_and_cases_name_the_hosts(world, capsys):
    code, out, _ = cli(capsys, world.config, "health", "--json")
    health = json.loads(out)
    assert code == 0 and health["healthy"] is True and health["drained"] is False
    assert [(h["host"], h["reachable"], h["seats"], h["in_use"]) for h in health["hosts"]] == \
        [("gpu1", True, 2, 2), ("gpu2", False, 2, 1)]
    assert len(health["notes"]) == 1 and health["notes"][0].startswith("host gpu2 unreachable since")
    code, out, _ = cli(capsys, world.config, "health")
    assert code == 0 and out.startswith("healthy (host gpu2 unreachable since")
    code, out, _ = cli(capsys, world.config, "cases")
    lines = out.splitlines()
    assert "HOST" in lines[0]
    assert re.search(r"running\s+normal\s+0%\s+gpu2\s+gpu_b\s+3\s", next(line for line in lines if "b1" in line))


def test_waiting_cases_count_as_stuck_unless_every_host_is_drained(world):
    from shared import queries
    from shared.maintenance import drain

    def reasons() -> tuple[str, ...]:
        known = queries.hosts(world.conn, world.config.hosts)
        totals = dict.fromkeys(queries.STATUSES, 0) | {"submitted": 1}
        alive = [queries.WorkerView("submitter", 1, "ws", 0, world.now, True)]
        return queries.judge_health(totals, alive, world.now - 1000, world.now, 300, queries.upkeep(world.conn),
                                    known).reasons

    drain(world.conn, "gpu2", now=world.now, by="op")
    assert reasons() and "1 cases are active" in reasons()[0]    # gpu1 takes claims: the waiting case should move
    drain(world.conn, "gpu1", now=world.now, by="op")
    assert reasons() == ()                                        # nothing may be claimed: waiting is expected


# -- metrics ----------------------------------------------------------------------------------------------

def samples(config) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in DbCollector(config).collect() for s in f.samples}


def test_metrics_carry_the_host_label(world):
    m = samples(world.config)
    assert m[("mqi_active_jobs", (("host", "gpu1"),))] == 2 and m[("mqi_active_jobs", (("host", "gpu2"),))] == 1
    assert m[("mqi_remote_unreachable", (("host", "gpu1"),))] == 0
    assert m[("mqi_remote_unreachable", (("host", "gpu2"),))] == 1
    assert m[("mqi_drained", (("host", "gpu1"),))] == 0 and m[("mqi_drained", (("host", "gpu2"),))] == 0

    def seats(host, group, status):
        return m[("mqi_slots", (("group", group), ("host", host), ("status", status)))]

    assert (seats("gpu1", "gpu_a", "assigned"), seats("gpu1", "gpu_a", "available")) == (2, 0)
    assert (seats("gpu2", "gpu_a", "available"), seats("gpu2", "gpu_b", "assigned"), seats("gpu2", "gpu_b", "zombie")) \
        == (1, 1, 0)

    def busy(host, group):
        return m[("mqi_slot_assigned_percent", (("group", group), ("host", host)))]

    # gpu1/gpu_a: seat 0 assigned for 3000 s, seat 1 for the last 1000 s of them: the GPU was busy 3000 s, not 4000
    assert busy("gpu1", "gpu_a") == pytest.approx(3000 / 36, abs=0.5)
    assert busy("gpu2", "gpu_b") == pytest.approx(500 / 36, abs=0.5) and busy("gpu2", "gpu_a") == 0


# -- drain one host -----------------------------------------------------------------------------------------

def test_drain_and_resume_one_host_by_name(world, capsys):
    config = world.config
    note_remote(world.conn, "gpu2", "reaper", ok=True, now=time.time())  # gpu2 answers again: only the drain counts
    code, _, err = cli(capsys, config, "drain")
    assert code == 1 and err.strip() == "mqic: UnknownHost: name the host: there are several (gpu1, gpu2)"
    code, _, err = cli(capsys, config, "drain", "gpu3")
    assert code == 1 and "host 'gpu3' is not configured (hosts: gpu1, gpu2)" in err
    code, _, err = cli(capsys, config, "drain", "gpu1", "--host", "gpu2")
    assert code == 1 and "two hosts given" in err

    code, out, err = cli(capsys, config, "drain", "gpu2", "--reason", "driver update")
    assert code == 0, err
    assert out.startswith("gpu2: drained since") and "1 cases in flight there finish" in out
    assert "1 waiting cases go to the other hosts or wait" in out and "`mqic resume gpu2`" in out
    assert claim_next_case(world.conn, worker="t", now=time.time(), lease_seconds=60) is None  # gpu1 is full

    code, out, _ = cli(capsys, config, "status")
    assert "DRAINED gpu2 since" in out and "(driver update)" in out and "DRAINED gpu1" not in out
    code, out, _ = cli(capsys, config, "health", "--json")
    health = json.loads(out)
    assert code == 0 and health["drained"] is True
    assert [(h["host"], h["drained"]) for h in health["hosts"]] == [("gpu1", False), ("gpu2", True)]
    assert any(n.startswith("host gpu2 drained since") and "(driver update)" in n for n in health["notes"])
    m = samples(config)
    assert m[("mqi_drained", (("host", "gpu2"),))] == 1 and m[("mqi_drained", (("host", "gpu1"),))] == 0

    code, out, _ = cli(capsys, config, "resume", "--host", "gpu2")
    assert code == 0 and out.startswith("gpu2: resumed (drained since")
    claim = claim_next_case(world.conn, worker="t", now=time.time(), lease_seconds=60)
    assert claim.case.case_name == "w" and (claim.host, claim.group) == ("gpu2", "gpu_a")
    code, out, _ = cli(capsys, config, "resume", "gpu2")
    assert code == 0 and out.strip() == "gpu2: was not drained; nothing to resume"


# -- notices --------------------------------------------------------------------------------------------

def notices(conn) -> list[dict]:
    return [json.loads(r[0]) for r in conn.execute("SELECT payload FROM notices ORDER BY notice_id")]


def test_the_unreachable_notice_is_per_host_and_names_it(tmp_path):
    T0 = 1_700_000_000.0
    config = make_hosts_config(tmp_path, HOSTS, notify={"command": ["true"], "unreachable_after_minutes": 10})
    conn = connect(config.database_path)
    note_remote(conn, "gpu1", "poller", ok=False, now=T0, error="Unreachable: gpu1 timed out")
    note_remote(conn, "gpu2", "poller", ok=True, now=T0)
    note_remote(conn, "gpu2", "poller", ok=False, now=T0 + 5 * 60, error=DOWN)
    assert watch_reachability(conn, config, T0 + 9 * 60) == 0
    assert watch_reachability(conn, config, T0 + 10 * 60) == 1          # gpu1: down 10 min; gpu2: 5 min
    assert watch_reachability(conn, config, T0 + 11 * 60) == 0          # once per outage
    assert watch_reachability(conn, config, T0 + 15 * 60) == 1          # now gpu2
    note_remote(conn, "gpu1", "reaper", ok=True, now=T0 + 20 * 60)
    assert watch_reachability(conn, config, T0 + 20 * 60) == 1          # gpu1 is back; gpu2 is not
    assert watch_reachability(conn, config, T0 + 30 * 60) == 0
    first, second, back = notices(conn)
    assert (first["event"], first["host"], first["address"]) == ("hpc_unreachable", "gpu1", "127.0.0.1")
    assert first["text"] == "MQIC: host gpu1 (127.0.0.1) UNREACHABLE for 10 min: Unreachable: gpu1 timed out"
    assert (second["event"], second["host"], second["error"]) == ("hpc_unreachable", "gpu2", DOWN)
    assert second["text"].startswith("MQIC: host gpu2 (gpu2.example.org) UNREACHABLE for 10 min")
    assert (back["event"], back["host"], back["worker"]) == ("hpc_reachable", "gpu1", "reaper")
    assert back["text"] == "MQIC: host gpu1 (127.0.0.1) reachable again after 20 min"
    conn.close()


def test_a_case_notice_names_the_host_the_case_ran_on(tmp_path):
    now = time.time()
    w = World(make_hosts_config(tmp_path, HOSTS, notify={"command": ["true"]}), now)
    case = w.running("b1", now - 100, "gpu2", "gpu_b", 3)
    assert move_case(w.conn, w.spool, case, CaseStatus.COMPLETED, now=now, worker="test", slot_to=SlotStatus.AVAILABLE,
                     fields={"outcome": "success", "exit_code": 0, "completed_at": now})
    assert collect_events(w.conn, w.config, 0, now) == 1
    [completed] = notices(w.conn)
    assert (completed["event"], completed["case_name"], completed["host"], completed["group"]) == \
        ("case_completed", "b1", "gpu2", "gpu_b")
    w.conn.close()


# -- doctor and show against real hosts ------------------------------------------------------------------

def test_doctor_checks_every_host_and_names_it_in_each_line(tmp_path, sshd, capsys):
    if not sshd.is_running():
        sshd.start()
    control = Path(f"/tmp/mqic-t-hosts-{os.getpid()}")
    config = make_hosts_config(tmp_path, [{"name": "near", "groups": ["gpu_a"]},
                                          {"name": "far", "port": free_port(),  # nobody listens there
                                           "groups": ["gpu_a"]}],
                               hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", control))
    try:
        code, out, _ = cli(capsys, config, "doctor")
    finally:
        for host in config.hosts:
            Remote(host.hpc).close()
        shutil.rmtree(control, ignore_errors=True)
    lines = out.strip().splitlines()
    assert code == 1
    per_host = ("identity_file", "known_hosts", "control dir", "ssh", "pueue", "pueue groups", "remote base dir",
                "transfer")
    for host in ("near", "far"):
        named = [line for line in lines if line.endswith(f"(host {host})") or f"(host {host}) -> fix:" in line]
        assert [line.split(":", 1)[0][5:] for line in named] == list(per_host), (host, out)
    assert re.search(r"^OK   ssh: \S+@127\.0\.0\.1:\d+ answers \(host near\)$", out, re.MULTILINE)
    assert "is writable (host near)" in out
    assert "-> fix: install pueue on the HPC and start it (pueued -d); pueue_command of host near is pueue" in out
    assert re.search(r"^FAIL ssh: .*\(host far\) -> fix: check the host is up", out, re.MULTILINE)
    assert "FAIL pueue: skipped: ssh is not reachable (host far)" in out
    assert [line for line in lines if "(host" not in line][0].startswith("OK   config:")
    assert any(line.startswith("OK   database:") and "(host" not in line for line in lines)


def two_pueue_hosts(hpc, tmp_path):
    """Hosts ``a`` and ``b``: the sandbox sshd with a pueue stand-in each, in one ``hosts:`` config."""
    made = [hpc(), hpc()]
    first = yaml.safe_load(made[0].config_path.read_text())
    entries = [{**yaml.safe_load(h.config_path.read_text())["hpc"], "name": name, "groups": {"gpu_a": {"gpu": 0}}}
               for name, h in zip("ab", made)]
    del first["pueue"]["groups"]
    source = tmp_path / "two.yaml"
    data = {**first, "hosts": entries}
    source.write_text(yaml.safe_dump(data))
    return made, parse_config(data, source)


def test_show_asks_the_case_host_and_doctor_passes_on_both(hpc, tmp_path, capsys):
    (h_a, h_b), config = two_pueue_hosts(hpc, tmp_path)
    for host in config.hosts:
        pueue.ensure_groups(Remote(host.hpc), list(host.hpc.pueue_command), {"gpu_a": 1})
    code, out, _ = cli(capsys, config, "doctor")
    assert code == 0, out
    for host in ("a", "b"):
        assert f"OK   pueue groups: gpu_a (host {host})" in out and "OK   ssh: " in out
        assert re.search(rf"^OK   transfer: tar upload of 2 files verified and removed again \(host {host}\)$", out,
                         re.MULTILINE)

    b = config.host("b")
    remote_b, cmd_b = Remote(b.hpc), list(b.hpc.pueue_command)
    w = World(config, time.time())
    case = w.register("on_b", time.time())
    claim = claim_next_case(w.conn, worker="t", now=time.time(), lease_seconds=60, seats=[("b", "gpu_a")])
    task_id = pueue.submit(remote_b, cmd_b, group="gpu_a", label=case_label(case.case_id),
                           workdir=remote_b.base_dir(), command="sleep 60")
    assert move_case(w.conn, w.spool, claim.case, CaseStatus.RUNNING, now=time.time(), worker="test",
                     fields={"task_id": task_id, "claimed_by": None, "lease_until": None})
    wait_until(lambda: pueue.statuses(remote_b, cmd_b).tasks[task_id].state is model.TaskState.RUNNING,
               timeout=15, message="task running on b")
    assert h_a.status()["tasks"] == {}            # host a has no task: asked there, show would find none

    code, out, err = cli(capsys, config, "show", str(case.case_id), "--json")
    shown = json.loads(out)
    assert code == 0, err
    assert shown["case"]["host"] == "b"
    assert (shown["remote"]["host"], shown["remote"]["task_id"], shown["remote"]["state"]) == ("b", task_id, "running")
    code, out, _ = cli(capsys, config, "show", str(case.case_id))
    assert f"remote: task {task_id} running in group gpu_a on host b" in out

    h_b.pueue("kill", str(task_id))
    with transaction(w.conn):
        w.conn.execute("UPDATE cases SET host = 'retired' WHERE case_id = ?", (case.case_id,))
    code, out, _ = cli(capsys, config, "show", str(case.case_id), "--json")
    assert json.loads(out)["remote"]["error"].startswith("host 'retired' of the case is not configured")
    w.conn.close()
