"""The Prometheus exporter as a real process over a seeded database: every value equals the database."""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from console.cli import main as cli_main
from sandbox.sshd import free_port
from shared import actions
from shared.backends import model
from shared.db import connect
from shared.liveness import note_remote
from tests.conftest import make_config, wait_until
from tests.test_console import seed
from workers.exporter import BUCKETS, DbCollector

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "mqic-dashboard.json"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def answers(port: int) -> bool:
    try:
        scrape(port)
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture
def exporter(tmp_path):
    config = make_config(tmp_path)
    ids = seed(config, time.time())
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "workers.exporter", "--config", str(config.source),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: answers(port) or process.poll() is not None, timeout=20, message="exporter up")
        assert process.poll() is None, process.communicate()
        yield config, ids, port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def db_value(config, sql: str, params: tuple = ()) -> float:
    conn = connect(config.database_path, readonly=True)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


@pytest.mark.system
def test_metrics_equal_the_database(exporter):
    config, ids, port, process = exporter
    m = scrape(port)
    assert m[("mqi_database_up", ())] == 1
    assert m[("mqi_cases_received_total", ())] == db_value(config, "SELECT COUNT(*) FROM cases") == 6
    assert m[("mqi_cases_completed_total", ())] == db_value(
        config, "SELECT COUNT(*) FROM cases WHERE status = 'completed'") == 1
    assert m[("mqi_cases_failed_total", ())] == db_value(
        config, "SELECT COUNT(*) FROM case_events WHERE to_status = 'failed' AND from_status != 'failed'") == 1
    assert m[("mqi_active_jobs", (("host", "hpc"),))] == db_value(
        config, "SELECT COUNT(*) FROM cases WHERE status = 'running' AND host = 'hpc'") == 1
    for status in ("submitted", "submitting", "running", "completed", "failed"):
        assert m[("mqi_cases_by_status", (("status", status),))] == db_value(
            config, "SELECT COUNT(*) FROM cases WHERE status = ?", (status,))

    # seed(): uploads of alpha and bravo took 100 s each; bravo waited 100 s and ran 1000 s
    def hist(phase: str, le: str) -> float:
        return m[("mqi_task_execution_duration_seconds_bucket", (("le", le), ("phase", phase)))]

    def total(phase: str, kind: str) -> float:
        return m[(f"mqi_task_execution_duration_seconds_{kind}", (("phase", phase),))]

    assert (total("upload", "count"), total("upload", "sum")) == (2, 200)
    assert (total("queue_wait", "count"), total("queue_wait", "sum")) == (1, 100)
    assert (total("run", "count"), total("run", "sum")) == (1, 1000)
    assert hist("upload", "60.0") == 0 and hist("upload", "120.0") == 2 and hist("upload", "+Inf") == 2
    assert hist("run", "600.0") == 0 and hist("run", "1200.0") == 1
    assert len([k for k in m if k[0].endswith("_bucket") and ("phase", "run") in k[1]]) == len(BUCKETS) + 1

    # gpu_a assigned for the last 3000 s, gpu_b for 1200 + 50 + 100 s of the hour (plus seconds since seeding)
    assert m[("mqi_slot_assigned_percent", (("group", "gpu_a"), ("host", "hpc")))] == pytest.approx(3000 / 36, abs=0.5)
    assert m[("mqi_slot_assigned_percent", (("group", "gpu_b"), ("host", "hpc")))] == pytest.approx(1350 / 36, abs=0.5)
    for group in ("gpu_a", "gpu_b"):
        assert m[("mqi_slots", (("group", group), ("host", "hpc"), ("status", "assigned")))] == 1
        assert m[("mqi_slots", (("group", group), ("host", "hpc"), ("status", "available")))] == 0
    assert m[("mqi_worker_up", (("worker", "scanner"),))] == 1
    assert m[("mqi_worker_up", (("worker", "poller"),))] == 0
    newest = max(db_value(config, "SELECT MAX(status_updated_at) FROM cases"),
                 db_value(config, "SELECT MAX(at) FROM case_events"))
    assert m[("mqi_last_db_update_age_seconds", ())] == pytest.approx(time.time() - newest, abs=5)
    assert m[("mqi_remote_unreachable", (("host", "hpc"),))] == 0  # no worker recorded a failed contact
    assert m[("mqi_drained", (("host", "hpc"),))] == 0

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


@pytest.mark.system
def test_failed_counter_only_grows_when_a_case_is_retried(exporter, capsys, monkeypatch):
    config, ids, port, _ = exporter
    monkeypatch.setattr(actions.Operator, "snapshot", lambda self, host: model.Snapshot({}, {}))  # no HPC here
    assert scrape(port)[("mqi_cases_failed_total", ())] == 1
    assert cli_main(["--config", str(config.source), "retry", str(ids["charlie"])]) == 0
    m = scrape(port)
    assert m[("mqi_cases_failed_total", ())] == 1
    assert m[("mqi_cases_by_status", (("status", "failed"),))] == 0
    assert cli_main(["--config", str(config.source), "cancel", str(ids["charlie"])]) == 0
    m = scrape(port)
    assert m[("mqi_cases_failed_total", ())] == 2
    assert m[("mqi_cases_by_status", (("status", "failed"),))] == 1
    capsys.readouterr()


@pytest.mark.system
def test_remote_unreachable_follows_what_the_workers_recorded(exporter):
    """host_reach: the newest call of any worker to the host wins."""
    config, _, port, _ = exporter
    conn = connect(config.database_path)
    note_remote(conn, "hpc", "poller", ok=True, now=time.time())
    assert scrape(port)[("mqi_remote_unreachable", (("host", "hpc"),))] == 0
    note_remote(conn, "hpc", "scanner", ok=False, now=time.time(), error="Unreachable")
    assert scrape(port)[("mqi_remote_unreachable", (("host", "hpc"),))] == 1
    conn.close()


def test_a_missing_database_reports_down_instead_of_failing_the_scrape(tmp_path):
    families = list(DbCollector(make_config(tmp_path)).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("mqi_database_up", 0)]


def test_a_replaced_database_is_counted_again_from_the_start(tmp_path):
    config = make_config(tmp_path)
    seed(config, time.time())
    collector = DbCollector(config)
    first = {f.name: f for f in collector.collect()}
    collector.tally.cursor = 10 ** 9  # as if the file were restored from an older backup
    again = {f.name: f for f in collector.collect()}
    assert again["mqi_cases_failed"].samples[0].value == first["mqi_cases_failed"].samples[0].value == 1
    runs = [s.value for s in again["mqi_task_execution_duration_seconds"].samples if s.name.endswith("_sum")]
    assert runs == [200, 100, 1000]


def test_the_grafana_dashboard_only_uses_exported_metrics(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    config = make_config(tmp_path)
    seed(config, time.time())
    from tests.test_gpus import seed_gpus
    seed_gpus(config)
    exported = {s.name for f in DbCollector(config).collect() for s in f.samples}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and dashboard["title"]
    used = {name for expr in exprs for name in re.findall(r"\bmqi_[a-z_]+", expr)}
    assert used and used <= exported, used - exported
    assert {"mqi_remote_unreachable", "mqi_worker_up", "mqi_slot_assigned_percent",
            "mqi_task_execution_duration_seconds_bucket"} <= used
    assert not any(math.isnan(s.value) for f in DbCollector(config).collect() for s in f.samples)
