"""End to end on two hosts at once: real supervisord runs the real workers against two sandbox
hosts, each with its own sshd (two pueue stand-ins, or a pueue stand-in and a real Slurm)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from sandbox.slurm import SandboxSlurm
from sandbox.sshd import free_port
from shared.backends import pueue_parse, slurm, slurm_parse
from shared.db import connect
from tests.conftest import skip_unless_slurm_can_run, wait_until
from tests.test_e2e import Supervisor, settled_rows

pytestmark = pytest.mark.system  # every test here starts real processes

FAST = {"scanner": {"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
        "main_loop": {"interval_seconds": 0.3, "running_case_timeout_hours": 1, "backoff_base_seconds": 1,
                      "lease_seconds": 20},
        "hpc": {"connect_timeout_seconds": 3, "command_timeout_seconds": 15}}
OUTAGE_SECONDS = 20


@pytest.fixture
def hosts_system(two_hosts, tmp_path):
    """Builder: two sandbox hosts (``two_hosts`` settings) and supervisord running every worker."""
    started = []

    def start(second: str = "pueue", **settings):
        h = two_hosts(second, **FAST, metrics={"port": free_port()}, **settings)
        home = tmp_path / f"home{len(started)}"
        home.mkdir()
        started.append(Supervisor(home, h.config_path))
        started[-1].start()
        return h, started[-1], connect(h.config.database_path)  # migrates if it wins the race with the workers

    yield start
    for sup in started:
        sup.shutdown()


def drop(watch: Path, count: int, seconds: float) -> list[str]:
    names = [f"case_{i:02d}" for i in range(count)]
    for name in names:
        make_case(watch, name, seconds=seconds, batches=4, deliveries=1, layers_per_delivery=2, atomic=True)
    return names


def count(conn, sql: str, *args) -> int:
    return conn.execute(sql, args).fetchone()[0]


def history(conn, case_id: int) -> list[str]:
    """A case's events, to say what happened when an assertion fails."""
    return [f"{e['from_status']}->{e['to_status']} {e['worker']}: {e['detail']}"
            for e in conn.execute("SELECT * FROM case_events WHERE case_id = ? ORDER BY event_id", (case_id,))]


def assert_all_completed_once(conn, rows: dict, names: list[str]) -> None:
    assert set(rows) == set(names)
    for name, row in rows.items():
        assert (row["status"], row["outcome"], row["spool_stage"]) == ("completed", "success", "done"), \
            (name, history(conn, row["case_id"]))
        assert Path(row["case_path"], "output").is_dir(), name
        runs = count(conn, "SELECT COUNT(*) FROM case_events WHERE case_id = ? AND to_status = 'running'",
                     row["case_id"])
        assert (row["attempts"], runs) == (0, 1), (name, history(conn, row["case_id"]))  # each ran once


def assert_one_task_per_case_on_its_host(h, rows: dict) -> None:
    """Each pueue host holds exactly one task per case it ran, and none of another host's cases."""
    for host in h.config.hosts:
        if host.backend != "pueue":
            continue
        labels = sorted(task["label"] for task in h.tasks(host.name))
        assert labels == sorted(f"mqic_case_{r['case_id']}" for r in rows.values() if r["host"] == host.name), \
            host.name


def test_cases_run_on_two_pueue_hosts_at_once(hosts_system):
    """gpu1 has one GPU with depth 2 (a case queued behind the running one), gpu2 has two GPUs."""
    h, sup, conn = hosts_system(groups={"gpu_a": {"gpu": 0, "depth": 2}},
                                second_groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}})
    names = drop(h.config.scanner.watch_path, 8, seconds=6)  # long beside an upload, so a case can queue
    rows = settled_rows(conn, dict.fromkeys(names), final_timeout=150, slot_timeout=30)
    assert_all_completed_once(conn, rows, names)
    assert {row["host"] for row in rows.values()} == {"gpu1", "gpu2"}
    seats = conn.execute("SELECT host, pueue_group, seat, status FROM gpu_resources ORDER BY host, pueue_group, seat")
    assert [tuple(r) for r in seats] == [("gpu1", "gpu_a", 0, "available"), ("gpu1", "gpu_a", 1, "available"),
                                         ("gpu2", "gpu_a", 0, "available"), ("gpu2", "gpu_b", 0, "available")]
    assert_one_task_per_case_on_its_host(h, rows)
    # depth 2 on gpu1: a case waited in pueue's queue behind a running one, and pueue ran them one at a time
    assert count(conn, "SELECT COUNT(*) FROM slot_events WHERE host = 'gpu1' AND seat = 1"
                       " AND to_status = 'assigned'") >= 1
    gpu1 = sorted(pueue_parse.parse_status(h.host("gpu1").pueue_cli("status", "--json").stdout).tasks.values(),
                  key=lambda task: task.start)
    assert all(earlier.end <= later.start for earlier, later in zip(gpu1, gpu1[1:]))
    assert any(later.enqueued_at < earlier.end for earlier, later in zip(gpu1, gpu1[1:]))


def test_one_host_down_does_not_stop_the_other(hosts_system):
    """gpu2's sshd stops for OUTAGE_SECONDS mid-run: its running cases wait for it, gpu1 keeps taking
    cases, nothing fails, nothing runs twice, and everything completes once gpu2 is back."""
    h, sup, conn = hosts_system(groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}},
                                second_groups={"gpu_a": {"gpu": 0, "depth": 2}})
    names = drop(h.config.scanner.watch_path, 12, seconds=4)
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM cases WHERE host = 'gpu2' AND status = 'running'") >= 1,
               timeout=60, message="a case running on gpu2")
    h.host("gpu2").sshd.stop()  # the listener and every session, the ControlMaster's too
    down_at = time.time()
    on_gpu2 = [r[0] for r in conn.execute("SELECT case_id FROM cases WHERE host = 'gpu2' AND status = 'running'")]
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM host_reach WHERE host = 'gpu2' AND ok = 0") == 1,
               timeout=30, message="gpu2 seen unreachable")
    noticed = conn.execute("SELECT down_since FROM host_reach WHERE host = 'gpu2'").fetchone()[0]

    def started_on(host: str, since: float) -> int:
        return count(conn, "SELECT COUNT(*) FROM case_events WHERE to_status = 'running' AND at > ?"
                           " AND detail LIKE ?", since, f"% in {host}/%")
    wait_until(lambda: started_on("gpu1", noticed) >= 2, timeout=down_at + OUTAGE_SECONDS - time.time(),
               message="gpu1 taking cases while gpu2 is down")
    time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.time()))  # the outage lasts its full length
    assert count(conn, "SELECT COUNT(*) FROM cases WHERE status = 'failed'") == 0
    assert count(conn, "SELECT COUNT(*) FROM case_events WHERE at > ? AND detail LIKE 'claimed with slot gpu2/%'",
                 noticed) == 0                                       # no new claim for the host that is down
    assert [r[0] for r in conn.execute(f"SELECT status FROM cases WHERE case_id IN ({','.join('?' * len(on_gpu2))})",
                                       on_gpu2)] == ["running"] * len(on_gpu2)    # they wait for it
    h.host("gpu2").sshd.start()
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM host_reach WHERE host = 'gpu2' AND ok = 1") == 1,
               timeout=30, message="gpu2 seen reachable again")
    rows = settled_rows(conn, dict.fromkeys(names), final_timeout=150, slot_timeout=30)
    assert_all_completed_once(conn, rows, names)
    assert all(row["host"] == "gpu2" for row in rows.values() if row["case_id"] in on_gpu2)
    assert {row["host"] for row in rows.values()} == {"gpu1", "gpu2"}
    assert count(conn, "SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'") == 0
    assert_one_task_per_case_on_its_host(h, rows)


def test_cases_run_on_a_pueue_host_and_a_slurm_cluster_at_once(hosts_system):
    h, sup, conn = hosts_system("slurm", groups={"gpu_a": {"gpu": 0}},
                                partitions={"gpu_a": {"partition": "gpu", "gres": "gpu:1", "depth": 2},
                                            "gpu_b": {"partition": "gpu", "gres": "gpu:1"}})
    names = drop(h.config.scanner.watch_path, 8, seconds=2)
    rows = settled_rows(conn, dict.fromkeys(names), final_timeout=180, slot_timeout=60)
    assert_all_completed_once(conn, rows, names)
    assert {row["host"] for row in rows.values()} == {"gpu1", "cluster"}
    assert count(conn, "SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'") == 0
    assert_one_task_per_case_on_its_host(h, rows)
    cluster = SandboxSlurm.from_state(h.host("cluster").folder / "slurm")
    argv, fmt = slurm.squeue_call()
    result = cluster.run(argv)
    jobs = slurm_parse.parse_marked_squeue(result.stdout, fmt)  # those ended under MinJobAge ago
    assert {job.name for job in jobs} <= {f"mqic_case_{r['case_id']}" for r in rows.values() if r["host"] == "cluster"}
    assert not [job for job in jobs if not job.verdict.ended]


def test_a_sandbox_cluster_deep_in_a_long_folder_runs_its_jobs(tmp_path):
    """The second host's cluster sits deep (``<root>/hosts/cluster/slurm``); slurmstepd's sockets
    must still fit a Unix socket path (107 bytes), or every job fails to launch and is cancelled."""
    skip_unless_slurm_can_run()
    with SandboxSlurm(tmp_path / ("deep" * 15) / "hosts" / "cluster" / "slurm", kill_wait=3) as cluster:
        submit = ["sbatch", "--parsable", "--no-requeue", f"--chdir={tmp_path}", "--wrap", "true"]
        job = cluster.run(submit).stdout.strip()

        def state() -> str:
            return cluster.run(["squeue", "--noheader", "--states=all", "--format=%T", "--jobs", job]).stdout.strip()
        wait_until(lambda: state() not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), timeout=30,
                   message=f"job {job} ended")
        assert state() == "COMPLETED"
