"""GPU telemetry with the real parts: the poller's telemetry tick over the real sshd against the nvidia-smi
stand-in (fed by the fake simulation), then the whole system under supervisord."""
from __future__ import annotations

import re
import subprocess
from dataclasses import replace
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from sandbox.sshd import free_port
from shared import gpus
from shared.db import connect
from shared.states import CaseStatus
from shared.store import get_case
from tests.conftest import wait_until
from tests.test_e2e import Supervisor
from tests.test_workers import ctx_for, submitted
from workers import poller

ROOT = Path(__file__).resolve().parents[1]


def tick_until(ctx, condition, *, timeout: float, message: str, step: float = 100.0):
    """Call the telemetry tick with an injected clock that always moves past the interval."""
    clock = {"t": 2_000_000_000.0}

    def once():
        clock["t"] += step
        gpus.tick(ctx, clock["t"])
        return condition()
    return wait_until(once, timeout=timeout, interval=0.2, message=message)


def view(ctx, index: int) -> gpus.GpuView | None:
    return next((v for v in gpus.gpu_views(ctx.conn, "hpc") if v.index == index), None)


def test_one_probe_per_host_per_interval_shows_the_running_case_on_its_gpu(hpc):
    h = hpc(gpus={"interval_seconds": 10})
    ctx = ctx_for(h, "poller-gpus")
    case = submitted(ctx, "busy", seconds=30, batches=30)
    gpu = 0 if get_case(ctx.conn, case.case_id).slot == "gpu_a" else 1
    tick_until(ctx, lambda: (v := view(ctx, gpu)) is not None and v.case_ids == [case.case_id],
               timeout=30, message="our case seen on its GPU")
    busy = view(ctx, gpu)
    assert busy.utilization >= 90 and busy.memory_used_mb > 2000 and busy.foreign_processes == 0
    assert view(ctx, 1 - gpu).utilization == 0 and busy.host_time == pytest.approx(time.time(), abs=30)
    t = 3_000_000_000.0
    assert [gpus.tick(ctx, t + dt) for dt in (0, 1, 9.9, 10)] == [1, 0, 0, 1]  # one call per interval
    h.pueue("kill", "-a")


def test_an_idle_gpu_under_a_running_case_is_flagged_for_review_not_failed(hpc):
    h = hpc(gpus={"interval_seconds": 1, "idle_minutes": 0.05, "idle_percent": 5})
    ctx = ctx_for(h, "poller-gpus")
    case = submitted(ctx, "hangs", seconds=2, batches=4, mode="hang")

    def flagged_after_a_poll():  # the poller records when the task started (on the HPC's clock)
        poller.tick(ctx, time.time())
        return get_case(ctx.conn, case.case_id).needs_review
    tick_until(ctx, flagged_after_a_poll, timeout=40, message="idle case flagged")
    flagged = get_case(ctx.conn, case.case_id)
    assert flagged.status is CaseStatus.RUNNING and flagged.review_reason.startswith("GPU idle while running")
    h.pueue("kill", "-a")


def test_garbage_or_a_hung_nvidia_smi_changes_nothing(hpc):
    h = hpc(gpus={"interval_seconds": 1}, hpc={"command_timeout_seconds": 6})
    ctx = ctx_for(h, "poller-gpus")
    assert gpus.tick(ctx, 100.0) == 1
    before = gpus.gpu_views(ctx.conn)
    h.gpus("hang", "3")  # each call may take 2 s on the HPC (command_timeout / 3)
    assert gpus.tick(ctx, 200.0) == 0 and gpus.gpu_views(ctx.conn) == before
    h.gpus("hang", "0")
    garbage = h.root / "bin" / "garbage-smi"
    garbage.write_text("#!/bin/sh\necho '<html>502 Bad Gateway</html>'\n")
    garbage.chmod(0o755)
    ctx.config = replace(ctx.config, gpus=replace(ctx.config.gpus, command=(str(garbage),)))
    assert gpus.tick(ctx, 300.0) == 0 and gpus.gpu_views(ctx.conn) == before


# -- the whole system ----------------------------------------------------------------------------

@pytest.fixture
def gpu_system(hpc, tmp_path):
    started = []

    def start(**gpus_settings):
        h = hpc(groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}, "gpu_c": {"gpu": 2}},
                scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
                main_loop={"interval_seconds": 0.3, "running_case_timeout_hours": 1, "backoff_base_seconds": 1,
                           "lease_seconds": 20},
                hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": 15},
                metrics={"port": free_port()}, gpus={"interval_seconds": 1, **gpus_settings})
        board = h.root / "gpus" / "board.json"
        board.unlink()
        h.gpus("init", "3")
        home = tmp_path / f"home{len(started)}"
        home.mkdir()
        sup = Supervisor(home, h.config_path)
        started.append(sup)
        sup.start()
        return h, sup, connect(h.config.database_path)

    yield start
    for sup in started:
        sup.shutdown()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def gpu_metric(text: str, name: str, gpu: int) -> float | None:
    match = re.search(rf'^{name}\{{gpu="{gpu}",host="hpc"\}} (\S+)$', text, re.M)
    return None if match is None else float(match.group(1))


def test_real_utilization_in_metrics_and_mqic_top_and_an_idle_case_flagged_not_failed(gpu_system):
    h, sup, conn = gpu_system(idle_minutes=0.1, idle_percent=5)
    watch = h.config.scanner.watch_path
    make_case(watch, "busy", seconds=40, batches=40, deliveries=1, layers_per_delivery=2, atomic=True)
    make_case(watch, "stuck", seconds=2, batches=4, mode="hang", deliveries=1, layers_per_delivery=2, atomic=True)

    def case(name):
        return conn.execute("SELECT * FROM cases WHERE case_name = ?", (name,)).fetchone()
    wait_until(lambda: case("busy") and case("busy")["status"] == "running", timeout=60, message="busy running")
    gpu = int(conn.execute("SELECT gpu FROM gpu_resources WHERE assigned_case_id = ?",
                           (case("busy")["case_id"],)).fetchone()[0])
    port = h.config.metrics.port
    wait_until(lambda: (gpu_metric(scrape(port), "mqi_gpu_utilization_percent", gpu) or 0) >= 90, timeout=60,
               message="real utilization in /metrics")
    text = scrape(port)
    assert gpu_metric(text, "mqi_gpu_memory_used_bytes", gpu) > 2000 * 2 ** 20
    assert gpu_metric(text, "mqi_gpu_temperature_celsius", gpu) > 60
    assert gpu_metric(text, "mqi_gpu_foreign_processes", gpu) == 0
    top = subprocess.run([sys.executable, "-m", "console.top", "--once", "--config", str(h.config_path)],
                         capture_output=True, text=True, timeout=60, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
                         cwd=ROOT)
    assert "GPUs (nvidia-smi)" in top.stdout and re.search(r"9\d%.*case \d+ busy", top.stdout), top.stdout
    wait_until(lambda: case("stuck")["needs_review"] == 1, timeout=60, message="idle case flagged")
    assert case("stuck")["status"] == "running" and "GPU idle while running" in case("stuck")["review_reason"]
    assert case("busy")["needs_review"] == 0
    h.pueue("kill", "-a")


@pytest.mark.parametrize("avoid", [True, False])
def test_foreign_process_and_lost_gpu_keep_new_cases_off_their_gpus(gpu_system, avoid):
    """GPU 0 has someone else's 900 MiB process, GPU 2 is lost, GPU 1 is free: with avoid_foreign every case
    runs on GPU 1; without it GPU 0 takes cases too. The lost GPU never gets one."""
    h, sup, conn = gpu_system(avoid_foreign=avoid, foreign_memory_mb=100)
    h.gpus("foreign", "0", "900")
    h.gpus("lost", "2")

    def settled() -> bool:
        rows = {r["gpu_index"]: r for r in conn.execute("SELECT * FROM gpus WHERE host = 'hpc'")}
        return len(rows) == 3 and rows[0]["foreign_processes"] == 1 and rows[2]["answering"] == 0
    wait_until(settled, timeout=60, message="telemetry saw the foreign process and the lost GPU")
    names = [f"case_{i}" for i in range(4)]
    for name in names:
        make_case(h.config.scanner.watch_path, name, seconds=1.5, batches=3, deliveries=1, layers_per_delivery=2,
                  atomic=True)
    wait_until(lambda: conn.execute("SELECT COUNT(*) FROM cases WHERE status = 'completed'").fetchone()[0] == 4,
               timeout=120, interval=0.5, message="every case completed")
    groups = {r[0] for r in conn.execute("SELECT DISTINCT pueue_group FROM slot_events WHERE to_status = 'assigned'")}
    assert "gpu_c" not in groups
    assert groups == ({"gpu_b"} if avoid else {"gpu_a", "gpu_b"})


def test_poller_once_ends_with_its_telemetry_thread(hpc):
    """``mqic-poller --once`` used to wait for ever on its helper threads (the stop event was never set)."""
    h = hpc(gpus={"interval_seconds": 1})
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "workers.poller", "--once", "--config", str(h.config_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 60


def test_two_sandbox_hosts_each_answer_with_their_own_gpus(two_hosts):
    h = two_hosts("pueue", gpus={"interval_seconds": 1})
    h.host("gpu2").gpus("lost", "1")
    ctx = ctx_for(h, "poller-gpus")
    assert gpus.tick(ctx, 100.0) == 2  # one probe per host
    seen = {(v.host, v.index): v for v in gpus.gpu_views(ctx.conn)}
    assert [key for key, v in sorted(seen.items()) if not v.answering] == [("gpu2", 1)]
    assert seen[("gpu1", 0)].uuid != seen[("gpu2", 0)].uuid
