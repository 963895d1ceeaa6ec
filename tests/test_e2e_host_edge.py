"""Through the real system (supervisord, the workers, sandbox sshds): only an answer the host
failed to give marks it down, and a replaced host key is its own state (issue 16)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from sandbox.casegen import make_case
from sandbox.sshd import free_port
from shared.db import connect
from tests.conftest import cli, wait_until
from tests.test_e2e import Supervisor, settled_rows
from tests.test_e2e_hosts import assert_all_completed_once, count, drop, hosts_system  # noqa: F401 (a fixture)

RESTARTS = 4
SLOW_PUEUE = "#!/bin/sh\nsleep 0.6\nexec {pueue} \"$@\"\n"  # every remote call lasts a while


def ssh_children(pid: int) -> list[int]:
    """The ssh processes that ``pid`` started and that still run (its calls in flight)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and comm == "ssh":
            found.append(int(stat.parent.name))
    return found


def worker_pid(sup: Supervisor, program: str) -> int:
    def running_pid() -> int | None:
        text = sup.ctl("pid", f"mqic:{program}").strip()
        return int(text) if text.isdigit() and text != "0" else None
    return wait_until(running_pid, timeout=30, message=f"{program} running")


def record_downs(conn) -> None:
    """Test instrumentation: remember every moment host_reach says a host is down."""
    conn.executescript("""
        CREATE TABLE IF NOT EXISTS test_downs (host TEXT, error TEXT, at REAL);
        CREATE TRIGGER IF NOT EXISTS test_down_insert AFTER INSERT ON host_reach WHEN NEW.ok = 0
        BEGIN INSERT INTO test_downs VALUES (NEW.host, NEW.error, NEW.checked_at); END;
        CREATE TRIGGER IF NOT EXISTS test_down_update AFTER UPDATE ON host_reach WHEN NEW.ok = 0
        BEGIN INSERT INTO test_downs VALUES (NEW.host, NEW.error, NEW.checked_at); END;
    """)


def test_restarting_workers_mid_call_never_marks_the_host_down_nor_fails_a_case(hpc, tmp_path):
    h = hpc(groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}},
            scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
            main_loop={"interval_seconds": 0.3, "backoff_base_seconds": 1, "lease_seconds": 20},
            hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": 15}, metrics={"port": free_port()})
    slow = h.root / "slow-pueue"
    slow.write_text(SLOW_PUEUE.format(pueue=h.bin["pueue"]))
    slow.chmod(0o755)
    data = yaml.safe_load(h.config_path.read_text())
    data["hpc"]["pueue_command"] = str(slow)
    h.config_path.write_text(yaml.safe_dump(data))
    conn = connect(h.config.database_path)
    record_downs(conn)
    sup = Supervisor(tmp_path, h.config_path)
    sup.start()
    try:
        names = []
        for round_ in range(RESTARTS):
            for i in range(2):  # new work each round, so the submitter has calls to make
                names.append(f"case_{round_}_{i}")
                make_case(h.config.scanner.watch_path, names[-1], seconds=2, batches=3, deliveries=1,
                          layers_per_delivery=2, atomic=True)
            for program in ("submitter", "poller"):  # the submitter has calls to make right after a drop
                pid = worker_pid(sup, program)
                wait_until(lambda: ssh_children(pid), timeout=30, interval=0.01,
                           message=f"{program} with an ssh call in flight (round {round_})")
                assert "started" in sup.ctl("restart", f"mqic:{program}")
        rows = settled_rows(conn, dict.fromkeys(names), final_timeout=180, slot_timeout=60)
        downs = conn.execute("SELECT host, error FROM test_downs").fetchall()
        assert [tuple(d) for d in downs] == []                     # never marked down, not even for a moment
        assert count(conn, "SELECT COUNT(*) FROM host_reach WHERE ok = 0 OR down_since IS NOT NULL") == 0
        for name, row in rows.items():
            assert (row["status"], row["attempts"]) == ("completed", 0), name
    finally:
        sup.shutdown()


def notice_recorder(tmp_path: Path) -> tuple[list[str], Path]:
    log = tmp_path / "notices.jsonl"
    script = tmp_path / "recorder.py"
    script.write_text("import sys\nwith open(sys.argv[1], 'a') as out:\n    out.write(sys.stdin.read())\n")
    return [sys.executable, str(script), str(log)], log


def test_a_replaced_host_key_is_shown_as_such_and_nothing_reaches_the_host(hosts_system, tmp_path,  # noqa: F811
                                                                           capsys):
    command, notices = notice_recorder(tmp_path)
    h, sup, conn = hosts_system(groups={"gpu_a": {"gpu": 0}}, second_groups={"gpu_a": {"gpu": 0}},
                                notify={"command": command, "timeout_seconds": 5})
    names = drop(h.config.scanner.watch_path, 6, seconds=3)
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM cases WHERE host = 'gpu2' AND status = 'running'") >= 1,
               timeout=60, message="a case running on gpu2")
    gpu2 = h.host("gpu2").sshd
    fingerprint = gpu2.replace_host_key()                               # every session cut, the master's too
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM host_reach WHERE host = 'gpu2' AND problem = 'host_key'"),
               timeout=30, message="gpu2's key seen refused")
    sessions = gpu2.sessions_started()
    on_gpu2 = [r[0] for r in conn.execute("SELECT case_id FROM cases WHERE host = 'gpu2' AND status = 'running'")]
    others = len(names) - len(on_gpu2)
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM cases WHERE status = 'completed'") >= others,
               timeout=120, message="gpu1 running every other case")
    wait_until(lambda: notices.exists() and "hpc_host_key" in notices.read_text(), timeout=30,
               message="the host key notice")
    assert fingerprint in notices.read_text() and "possible interception" in notices.read_text()
    config = h.config
    code, out, _ = cli(capsys, config, "status")
    assert out.splitlines()[0].startswith("HOST KEY CHANGED on host gpu2: possible interception"), out
    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "HOST KEY CHANGED on host gpu2" in out and "gpu2 unreachable since" not in out
    code, out, _ = cli(capsys, config, "doctor")
    [key_line] = [line for line in out.splitlines() if "ssh host key" in line]
    assert fingerprint in key_line and "ssh-keygen -R" in key_line and "(host gpu2)" in key_line
    assert gpu2.sessions_started() == sessions                          # no command reached gpu2 meanwhile
    assert count(conn, "SELECT COUNT(*) FROM cases WHERE status = 'failed'") == 0
    assert [r[0] for r in conn.execute(f"SELECT status FROM cases WHERE case_id IN ({','.join('?' * len(on_gpu2))})",
                                       on_gpu2)] == ["running"] * len(on_gpu2)
    known = str(config.host("gpu2").hpc.known_hosts_file)               # the operator's fix, after checking
    name = f"[127.0.0.1]:{config.host('gpu2').hpc.port}"
    subprocess.run(["ssh-keygen", "-R", name, "-f", known], check=True, capture_output=True)
    scanned = subprocess.run(["ssh-keyscan", "-p", str(config.host("gpu2").hpc.port), "127.0.0.1"],
                             check=True, capture_output=True, text=True).stdout
    with open(known, "a") as out_file:
        out_file.write(scanned)
    wait_until(lambda: count(conn, "SELECT COUNT(*) FROM host_reach WHERE host = 'gpu2' AND ok = 1") == 1,
               timeout=30, message="gpu2 back by itself")
    rows = settled_rows(conn, dict.fromkeys(names), final_timeout=150, slot_timeout=30)
    assert_all_completed_once(conn, rows, names)
    sent = [json.loads(line)["event"] for line in notices.read_text().splitlines() if line.strip()]
    assert "hpc_host_key" in sent and "hpc_reachable" in sent
