"""Structured logs: JSON lines on stdout with every field, a readable rotating file, one time zone."""
from __future__ import annotations

import json
import logging
import re

import pytest

from shared.errors import Unreachable
from shared.logs import for_case, setup_logging
from tests.conftest import make_config

REQUIRED = ("timestamp", "level", "message", "logger", "module", "funcName", "lineno",
            "case_id", "operation", "error_type")


@pytest.fixture(autouse=True)
def detached_handlers():
    """setup_logging binds the captured stdout; unbind it so later tests log nowhere stale."""
    yield
    root = logging.getLogger("mqic")
    for handler in root.handlers:
        handler.close()
    root.handlers.clear()


def emit_upload_failure(log: logging.Logger) -> None:
    log.warning("upload of case %d failed: %s", 7, "no route", extra=for_case(7, "upload", Unreachable("x")))


def test_json_line_on_stdout_has_every_field_in_the_configured_zone(tmp_path, capsys):
    config = make_config(tmp_path, logging={"timezone": "Asia/Seoul"})
    log = setup_logging(config.logging, "submitter")
    emit_upload_failure(log)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert set(REQUIRED) <= set(entry)
    assert entry["level"] == "WARNING" and entry["logger"] == "mqic.submitter"
    assert entry["message"] == "upload of case 7 failed: no route"
    assert entry["module"] == "test_logs" and entry["funcName"] == "emit_upload_failure"
    assert isinstance(entry["lineno"], int) and entry["lineno"] > 0
    assert (entry["case_id"], entry["operation"], entry["error_type"]) == (7, "upload", "Unreachable")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+09:00", entry["timestamp"])


def test_the_file_gets_a_readable_line_with_the_same_context(tmp_path, capsys):
    config = make_config(tmp_path)
    emit_upload_failure(setup_logging(config.logging, "submitter"))
    capsys.readouterr()
    text = config.logging.file.read_text(encoding="utf-8")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+09:00 WARNING mqic\.submitter"
        r" \[case_id=7 operation=upload error_type=Unreachable\] upload of case 7 failed: no route\n", text)


def test_another_zone_and_an_exception_are_carried(tmp_path, capsys):
    config = make_config(tmp_path, logging={"timezone": "UTC"})
    log = setup_logging(config.logging, "poller")
    try:
        raise Unreachable("host down")
    except Unreachable as exc:
        log.exception("poll failed", extra=for_case(None, "poll", exc))
    entry = json.loads(capsys.readouterr().out)
    assert entry["timestamp"].endswith("+00:00")
    assert "case_id" not in entry and entry["operation"] == "poll"
    assert "Unreachable: host down" in entry["exception"]
    assert "Traceback" in config.logging.file.read_text(encoding="utf-8")


def test_readable_stdout_when_json_is_off_and_the_file_rotates(tmp_path, capsys):
    config = make_config(tmp_path, logging={"json_stdout": False, "max_bytes": 1024, "backup_count": 2})
    log = setup_logging(config.logging, "reaper")
    for n in range(40):
        log.info("line %d of a rotating log", n, extra=for_case(n, "rotate"))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 40 and "INFO    mqic.reaper [case_id=39 operation=rotate] line 39" in out[-1]
    logs = sorted(config.logging.file.parent.glob("test.log*"))
    assert [p.name for p in logs] == ["test.log", "test.log.1", "test.log.2"]
    assert all(p.stat().st_size <= 1024 + 100 for p in logs)  # a file may pass max_bytes by one line
    assert "line 39 of a rotating log" in logs[0].read_text(encoding="utf-8")


def test_records_below_the_level_are_dropped(tmp_path, capsys):
    config = make_config(tmp_path, logging={"level": "WARNING"})
    log = setup_logging(config.logging, "scanner")
    log.info("not shown", extra=for_case(1, "scan"))
    log.error("shown", extra=for_case(1, "scan"))
    assert [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()] == ["shown"]
