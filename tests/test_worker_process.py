"""Worker processes: heartbeats, JSON logs on stdout, and a clean exit 0 on SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from shared.db import connect
from tests.conftest import wait_until

pytestmark = pytest.mark.system  # every test here starts real processes


@pytest.mark.parametrize("program", ["scanner", "submitter", "poller", "reaper"])
def test_worker_beats_logs_json_and_stops_cleanly_on_sigterm(hpc, program):
    h = hpc()
    proc = subprocess.Popen([sys.executable, "-m", f"workers.{program}", "--config", str(h.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: h.config.database_path.exists() and connect(h.config.database_path).execute(
            "SELECT COUNT(*) FROM workers WHERE name = ?", (program,)).fetchone()[0], timeout=20,
            message=f"{program} heartbeat")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    started = next(e for e in lines if e["message"].startswith(f"{program} started"))
    assert started["logger"] == f"mqic.{program}" and started["timestamp"].endswith("+09:00")
    assert lines[-1]["message"] == f"{program} stopped"


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("scanner: {watch_path: x, quiescence_period_seconds: soon}\n")
    result = subprocess.run([sys.executable, "-m", "workers.poller", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [  # every problem of the file, one per line
        "mqic-poller: config error: scanner.quiescence_period_seconds: got 'soon', expected a number",
        *[f"mqic-poller: config error: hpc.{key}: missing, this key is required"
          for key in ("host", "user", "identity_file", "known_hosts_file", "remote_base_dir")]]
