"""The worker loop a process runs: its helper threads end before the process says it stopped."""
from __future__ import annotations

import logging
import threading

from shared import worker
from tests.conftest import make_config


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []
        self.process_stopped = threading.Event()

    def emit(self, record):
        self.messages.append(record.getMessage())
        if record.getMessage() == "demo stopped":
            self.process_stopped.set()


def test_the_process_logs_stopped_last_after_its_helper_threads_stopped(tmp_path, monkeypatch):
    """Bug: a helper thread's lines came after "<worker> stopped" (test_worker_process saw it in CI)."""
    config = make_config(tmp_path)
    monkeypatch.setattr(worker, "install_signal_handlers", lambda ctx: None)
    records = Records()

    def slow_helper(ctx, now):
        ctx.stop.wait(5)
        records.process_stopped.wait(0.3)  # a helper still busy when the main loop ends
        return 0

    def prepare(ctx):
        logging.getLogger("mqic").addHandler(records)
        worker.start_helper_loop(ctx, "demo-helper", slow_helper)

    try:
        code = worker.worker_main("demo", "demo", lambda ctx, now: 0, ["--config", str(config.source), "--once"],
                                  prepare=prepare)
    finally:
        logging.getLogger("mqic").handlers.clear()
    assert code == 0
    assert records.messages[-1] == "demo stopped"
    assert "demo-helper stopped" in records.messages
