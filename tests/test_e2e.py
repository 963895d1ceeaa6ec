"""End to end: real supervisord runs the real workers against the sandbox HPC."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from sandbox.sshd import free_port
from shared.db import connect
from tests.conftest import wait_until

pytestmark = pytest.mark.system  # every test here starts real processes

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


class Supervisor:
    """supervisord with the project's own supervisord.conf, run from a scratch copy of the layout."""

    def __init__(self, home: Path, config_path: Path):
        self.home = home
        shutil.copy(REPO / "supervisord.conf", home / "supervisord.conf")
        (home / ".venv").symlink_to(VENV)
        for sub in ("run", "logs"):
            (home / sub).mkdir(exist_ok=True)
        self.env = {**os.environ, "MQIC_CONFIG": str(config_path)}

    def start(self) -> None:
        subprocess.run([str(VENV / "bin" / "supervisord"), "-c", str(self.home / "supervisord.conf")],
                       check=True, env=self.env, cwd=self.home, timeout=30)

    def ctl(self, *args: str) -> str:
        result = subprocess.run([str(VENV / "bin" / "supervisorctl"), "-c", str(self.home / "supervisord.conf"),
                                 *args], capture_output=True, text=True, env=self.env, cwd=self.home, timeout=120)
        return result.stdout + result.stderr

    def shutdown(self) -> None:
        self.ctl("shutdown")
        pid_file = self.home / "run" / "supervisord.pid"
        wait_until(lambda: not pid_file.exists(), timeout=60, message="supervisord exit")


@pytest.fixture
def system(hpc, tmp_path):
    h = hpc(groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}, "gpu_c": {"gpu": 2}},
            scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
            main_loop={"interval_seconds": 0.3, "running_case_timeout_hours": 0.002,
                       "backoff_base_seconds": 1, "lease_seconds": 20},
            hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": 15},
            metrics={"port": free_port()})
    sup = Supervisor(tmp_path, h.config_path)
    sup.start()
    yield h, sup
    sup.shutdown()


def drop_cases(watch: Path, expected: dict) -> None:
    for name in expected:
        mode = {"fails": "fail", "hangs": "hang"}.get(name, "ok")
        make_case(watch, name, seconds=0.5, batches=3, mode=mode, deliveries=1, layers_per_delivery=2, atomic=True)


def settled_rows(conn, expected: dict, *, final_timeout: float, slot_timeout: float) -> dict:
    """Wait until every case is final and every slot available; the rows by case name."""
    def count(sql: str) -> int:
        return conn.execute(sql).fetchone()[0]
    wait_until(lambda: count("SELECT COUNT(*) FROM cases WHERE status IN ('completed','failed')") == len(expected),
               timeout=final_timeout, interval=0.5, message="every case final")
    wait_until(lambda: count("SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'") == 0,
               timeout=slot_timeout, message="every slot available")
    return {r["case_name"]: r for r in conn.execute("SELECT * FROM cases")}


EXPECTED = {f"ok_{i:02d}": ("completed", "success", "done") for i in range(9)}
EXPECTED["fails"] = ("failed", "failed", "failed")
EXPECTED["hangs"] = ("failed", "timed_out", "failed")
EXPECTED["pt 'quoted' $(id); 환자"] = ("completed", "success", "done")


def test_cases_flow_from_drop_folder_to_final_state_under_supervisord(system):
    h, sup = system
    watch = h.config.scanner.watch_path
    drop_cases(watch, EXPECTED)
    conn = connect(h.config.database_path)  # migrates if it wins the race with the workers
    wait_until(lambda: conn.execute("SELECT COUNT(*) FROM cases WHERE status='running'").fetchone()[0] >= 2,
               timeout=60, message="cases running")
    assert "mqic:submitter" in sup.ctl("restart", "mqic:submitter")
    rows = settled_rows(conn, EXPECTED, final_timeout=120, slot_timeout=30)
    assert set(rows) == set(EXPECTED)
    for name, (status, outcome, stage) in EXPECTED.items():
        row = rows[name]
        assert (row["status"], row["outcome"], row["spool_stage"]) == (status, outcome, stage), name
        assert Path(row["case_path"]).is_dir() and Path(row["case_path"]).parent.name == stage
    labels = [t["label"] for t in h.status()["tasks"].values()]
    assert sorted(labels) == sorted(f"mqic_case_{r['case_id']}" for r in rows.values())  # one task each
    assert os.listdir(watch) == []
    status = sup.ctl("status")
    for program in ("scanner", "submitter", "poller", "reaper"):
        assert f"mqic:{program}" in status and "RUNNING" in status.split(f"mqic:{program}")[1].split("\n")[0]


@pytest.fixture
def slurm_system(slurm_hpc, tmp_path):
    h = slurm_hpc(scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
                  main_loop={"interval_seconds": 0.3, "running_case_timeout_hours": 0.002,
                             "backoff_base_seconds": 1, "lease_seconds": 20, "kill_grace_seconds": 3},
                  hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": 15},
                  metrics={"port": free_port()})
    sup = Supervisor(tmp_path, h.config_path)
    sup.start()
    yield h, sup
    sup.shutdown()


SLURM_EXPECTED = {f"ok_{i:02d}": ("completed", "success", "done") for i in range(4)}
SLURM_EXPECTED["fails"] = ("failed", "failed", "failed")
SLURM_EXPECTED["hangs"] = ("failed", "timed_out", "failed")
SLURM_EXPECTED["pt 'quoted' $(id); 환자"] = ("completed", "success", "done")
# Every printable ASCII character (but '/'), a tab and '|': no field of squeue shifts (issue 16).
SLURM_EXPECTED["".join(chr(c) for c in range(32, 127) if chr(c) != "/") + "\t|환자"] = ("completed", "success", "done")


def test_cases_flow_through_a_slurm_cluster_under_supervisord(slurm_system):
    """The same workers with ``hpc.backend: slurm``: two slots on the sandbox cluster's two GPUs."""
    h, sup = slurm_system
    watch = h.config.scanner.watch_path
    drop_cases(watch, SLURM_EXPECTED)
    conn = connect(h.config.database_path)
    rows = settled_rows(conn, SLURM_EXPECTED, final_timeout=180, slot_timeout=60)
    for name, (status, outcome, stage) in SLURM_EXPECTED.items():
        row = rows[name]
        assert (row["status"], row["outcome"], row["spool_stage"]) == (status, outcome, stage), name
        runs = conn.execute("SELECT COUNT(*) FROM case_events WHERE case_id = ? AND to_status = 'running'",
                            (row["case_id"],)).fetchone()[0]
        assert (row["attempts"], runs) == (0, 1), name                              # each ran once
    assert rows["fails"]["exit_code"] == 1 and "FATAL ERROR" in rows["fails"]["log_tail"]
    assert all(Path(rows[n]["case_path"], "output").is_dir() for n, v in SLURM_EXPECTED.items() if v[0] == "completed")
    jobs = {job.job_id: job for job in h.jobs()}                 # still listed: their end is under MinJobAge ago
    assert all(job.name.startswith("mqic_case_") and job.comment.startswith("mqic_slot=") for job in jobs.values())
    assert not [job for job in jobs.values() if not job.verdict.ended]
    assert os.listdir(watch) == []
