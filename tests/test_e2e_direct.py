"""End to end on a GPU box without a scheduler: real supervisord runs the real workers with
``hpc.backend: direct`` over the real sshd. Cases dropped in the folder run in two GPU slots and
complete with their results fetched; one fails, one hangs and times out, and one is killed by a
hand not ours, so it is run again and completes, as on pueue."""
from __future__ import annotations

import os
import signal

import pytest

from sandbox.sshd import free_port
from shared.db import connect
from tests.conftest import wait_until
from tests.test_e2e import Supervisor, drop_cases, settled_rows

pytestmark = pytest.mark.system  # every test here starts real processes

EXPECTED = {f"ok_{i:02d}": ("completed", "success", "done") for i in range(4)}
EXPECTED["fails"] = ("failed", "failed", "failed")
EXPECTED["hangs"] = ("failed", "timed_out", "failed")
EXPECTED["pt 'quoted' $(id); 환자"] = ("completed", "success", "done")
KILLED = "killed_outside"


@pytest.fixture
def direct_system(direct_hpc, tmp_path):
    h = direct_hpc(groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}},
                   scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
                   main_loop={"interval_seconds": 0.3, "running_case_timeout_hours": 0.003,
                              "backoff_base_seconds": 1, "lease_seconds": 20, "kill_grace_seconds": 3},
                   hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": 15},
                   metrics={"port": free_port()})
    sup = Supervisor(tmp_path, h.config_path)
    sup.start()
    yield h, sup
    sup.shutdown()


def test_cases_flow_through_a_box_without_a_scheduler_under_supervisord(direct_system):
    from sandbox.casegen import make_case

    h, sup = direct_system
    watch = h.config.scanner.watch_path
    drop_cases(watch, EXPECTED)
    make_case(watch, KILLED, seconds=5, batches=5, deliveries=1, layers_per_delivery=2, atomic=True)
    conn = connect(h.config.database_path)

    def started_task():
        row = conn.execute("SELECT pueue_task_id FROM cases WHERE case_name = ? AND status = 'running'",
                           (KILLED,)).fetchone()
        pgid = h.tasks_dir / str(row[0]) / "pgid" if row and row[0] is not None else None
        return pgid if pgid is not None and pgid.is_file() and (pgid.parent / "start").is_file() else None

    pgid = wait_until(started_task, timeout=90, interval=0.2, message="the case to kill running")
    os.killpg(int(pgid.read_text()), signal.SIGTERM)   # a hand not ours, on the task's process group

    expected = {**EXPECTED, KILLED: ("completed", "success", "done")}
    rows = settled_rows(conn, expected, final_timeout=180, slot_timeout=60)
    for name, (status, outcome, stage) in expected.items():
        row = rows[name]
        assert (row["status"], row["outcome"], row["spool_stage"]) == (status, outcome, stage), name
    assert rows["fails"]["exit_code"] == 1 and "FATAL ERROR" in rows["fails"]["log_tail"]
    for name, (status, _, _) in expected.items():
        if status == "completed":
            assert any(os.scandir(os.path.join(rows[name]["case_path"], "output"))), name  # results fetched
    killed = rows[KILLED]
    runs = conn.execute("SELECT COUNT(*) FROM case_events WHERE case_id = ? AND to_status = 'running'",
                        (killed["case_id"],)).fetchone()[0]
    assert (killed["attempts"], runs) == (1, 2)                 # killed once, run again
    details = [r[0] or "" for r in conn.execute("SELECT detail FROM case_events WHERE case_id = ?",
                                                (killed["case_id"],))]
    assert any("killed by a signal we did not send" in d for d in details), details
    records = sorted(p.name for p in h.tasks_dir.iterdir())
    labels = sorted((h.tasks_dir / name / "label").read_text() for name in records)
    assert labels == sorted(f"mqic_case_{r['case_id']}" for r in rows.values())   # one task each: the killed one went
    assert all((h.tasks_dir / name / "end").is_file() for name in records)       # every runner stamped its end
    assert os.listdir(watch) == []
    status = sup.ctl("status")
    for program in ("scanner", "submitter", "poller", "reaper"):
        assert f"mqic:{program}" in status and "RUNNING" in status.split(f"mqic:{program}")[1].split("\n")[0]
