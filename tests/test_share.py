"""The workstation's edge, tick by tick on real files and SQLite: a results share that hangs or is not
mounted, a damaged local copy, a delivery cut by a crash, and how durations read."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import replace
import sys
import time
from pathlib import Path

import pytest

from shared import share
from shared.db import transaction
from shared.delivery import claim_delivery, deliver_pending, due_cases
from shared.durations import in_words
from shared.config import RetentionConfig
from shared.errors import ConfigError
from shared.retention import apply_retention, plan
from shared.settings import get_setting
from shared.share import ShareNotAnswering, share_state
from shared.share_child import PARTIAL_PREFIX
from shared.store import get_case
from tests.conftest import cli, make_config, wait_until
from sandbox.procs import processes_with
from tests.test_clinic import PAST, RESULTS, T0, completed, context, remote_folder

TOKEN = f"mqic-hanging-share-{os.getpid()}"
HANG = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(120)", TOKEN]


def share_config(tmp_path, **results):
    (tmp_path / "tps").mkdir(exist_ok=True)
    return make_config(tmp_path, hpc={"result_files": ["output/*"]},
                       results={"deliver_to": str(tmp_path / "tps"), "retry_seconds": 60, "share_timeout_seconds": 1,
                                **results},
                       notify={"command": [sys.executable, "-c", "pass"]})


def notices(ctx, kind: str) -> list[dict]:
    return [json.loads(r[0]) for r in ctx.conn.execute("SELECT payload FROM notices WHERE kind = ?", (kind,))]


# -- a share that does not answer -----------------------------------------------------------------

@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_a_share_that_does_not_answer_costs_one_time_limit_is_recorded_once_and_retried(tmp_path, monkeypatch,
                                                                                          capsys):
    """The child that touches the share hangs (as in a hung NFS call): the step returns after the
    time limit, the child is killed and never waited for, the state is recorded, shown and notified once."""
    config = share_config(tmp_path, expect_mount=False)
    ctx = context(config)
    deliver_pending(ctx, T0)
    first, second = completed(ctx, "a", T0 + 10), completed(ctx, "b", T0 + 10)
    monkeypatch.setattr(share, "CHILD", HANG)
    started = time.monotonic()
    assert deliver_pending(ctx, T0 + 11) == 0
    assert time.monotonic() - started < 3                       # the 1 s limit, not the 120 s hang
    state = share_state(ctx.conn)
    assert (state.kind, state.since, state.checked_at) == ("not answering", T0 + 11, T0 + 11)
    assert "no sign of life from deliver for 1 s" in state.error
    row = get_case(ctx.conn, first.case_id)
    assert row.delivery_error.startswith("ShareNotAnswering") and row.next_delivery_at == T0 + 71

    started = time.monotonic()
    for second_later in range(1, 30):                          # the other due case is not tried meanwhile
        assert deliver_pending(ctx, T0 + 11 + second_later) == 0
    assert time.monotonic() - started < 1
    assert get_case(ctx.conn, second.case_id).delivery_attempts == 0
    assert len(notices(ctx, "share_down")) == 1

    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "results share not answering for" in out
    code, out, _ = cli(capsys, config, "status")
    assert "results share not answering" in out
    assert json.loads(cli(capsys, config, "status", "--json")[1])["upkeep"]["share"]["kind"] == "not answering"

    assert deliver_pending(ctx, T0 + 72) == 0                   # tried again after retry_seconds: still hung
    assert share_state(ctx.conn).since == T0 + 11 and len(notices(ctx, "share_down")) == 1
    monkeypatch.undo()                                          # the share answers again
    assert deliver_pending(ctx, T0 + 133) == 1
    assert share_state(ctx.conn) is None and len(notices(ctx, "share_back")) == 1
    assert deliver_pending(ctx, T0 + 134) == 1 and get_setting(ctx.conn, share.STATE_KEY) is None
    assert cli(capsys, config, "health")[0] == 0
    wait_until(lambda: share.reap_abandoned() == 0 and processes_with(TOKEN) == [], timeout=5,
               message="the abandoned children gone")


@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_with_nothing_due_a_down_share_is_probed_every_retry_seconds(tmp_path, monkeypatch):
    config = share_config(tmp_path, expect_mount=False)
    ctx = context(config)
    deliver_pending(ctx, T0)
    monkeypatch.setattr(share, "CHILD", HANG)
    case = completed(ctx, "a", T0 + 10)
    deliver_pending(ctx, T0 + 11)
    monkeypatch.undo()
    with transaction(ctx.conn):                                  # delivered by hand meanwhile: nothing due
        ctx.conn.execute("UPDATE cases SET delivered_at = ? WHERE case_id = ?", (T0 + 20, case.case_id))
    assert deliver_pending(ctx, T0 + 30) == 0 and share_state(ctx.conn) is not None  # within retry_seconds
    deliver_pending(ctx, T0 + 72)                                                        # the probe
    assert share_state(ctx.conn) is None and len(notices(ctx, "share_back")) == 1


@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_run_on_share_abandons_a_silent_child_without_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(share, "CHILD", HANG)
    started = time.monotonic()
    with pytest.raises(ShareNotAnswering):
        share.run_on_share("probe", {"deliver_to": str(tmp_path)}, timeout=0.5)
    assert time.monotonic() - started < 2
    wait_until(lambda: share.reap_abandoned() == 0, timeout=5, message="the killed child reaped")  # a hung NFS child would stay listed


# -- a share that is not mounted ------------------------------------------------------------------

@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_an_unmounted_share_is_never_written_underneath(tmp_path, capsys):
    config = share_config(tmp_path)                               # expect_mount is on by default
    ctx = context(config)
    deliver_pending(ctx, T0)
    case = completed(ctx, "a", T0 + 10)
    assert deliver_pending(ctx, T0 + 11) == 0
    assert list(config.results.deliver_to.iterdir()) == []       # nothing written, not even a temporary
    row = get_case(ctx.conn, case.case_id)
    assert row.delivery_error.startswith("ShareNotMounted: share not mounted") and row.delivered_at is None
    assert share_state(ctx.conn).kind == "not mounted"
    code, out, _ = cli(capsys, config, "health")
    assert code == 1 and "results share not mounted" in out
    code, out, _ = cli(capsys, config, "doctor")
    assert "FAIL results.deliver_to: share not mounted" in out


@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_a_share_marker_proves_the_share_and_its_absence_stops_delivery(tmp_path):
    config = share_config(tmp_path, share_marker=".mqic-share")
    ctx = context(config)
    deliver_pending(ctx, T0)
    case = completed(ctx, "a", T0 + 10)
    deliver_pending(ctx, T0 + 11)
    assert "marker file .mqic-share is missing" in get_case(ctx.conn, case.case_id).delivery_error
    assert list(config.results.deliver_to.iterdir()) == []
    (config.results.deliver_to / ".mqic-share").write_text("")
    assert deliver_pending(ctx, T0 + 71) == 1
    assert (config.results.deliver_to / "a" / "output" / "dose.raw").read_bytes() == RESULTS["output/dose.raw"]
    assert share_state(ctx.conn) is None


def test_results_share_keys_are_validated(tmp_path):
    for results, message in (({"share_timeout_seconds": 0}, "results.share_timeout_seconds: got 0, expected a number > 0"),
                             ({"share_marker": "a/b"}, "results.share_marker: got 'a/b', expected a plain file name"),
                             ({"expect_mount": "yes"}, "results.expect_mount: got 'yes', expected true or false")):
        with pytest.raises(ConfigError, match=message):
            make_config(tmp_path, results=results)
    config = make_config(tmp_path)
    assert (config.results.share_timeout_seconds, config.results.expect_mount, config.results.share_marker) == \
        (30, True, None)


# -- a delivery cut by a crash --------------------------------------------------------------------

@pytest.mark.system  # delivery runs in a child process (shared.share)
def test_a_delivery_cut_by_a_crash_is_retried_after_retry_seconds_and_its_partial_removed(tmp_path):
    config = share_config(tmp_path, expect_mount=False, retry_seconds=5)
    ctx = context(config)
    deliver_pending(ctx, T0)
    case = completed(ctx, "a", T0 + 10)
    assert claim_delivery(ctx.conn, case, T0 + 11, config.results.retry_seconds) == T0 + 16  # then the owner dies
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    partial = config.results.deliver_to / f"{PARTIAL_PREFIX}{case.case_id}-{dead}"
    (partial / "output").mkdir(parents=True)
    (partial / "output" / "dose.raw").write_bytes(b"half")
    assert due_cases(ctx.conn, T0, T0 + 15) == []               # its lease still runs
    assert deliver_pending(ctx, T0 + 16) == 1                   # retry_seconds later, not the old 600 s
    assert sorted(p.name for p in config.results.deliver_to.iterdir()) == ["a"]


# -- a damaged local copy -------------------------------------------------------------------------

def test_a_damaged_local_copy_is_not_delivered_and_flags_the_case(tmp_path):
    config = share_config(tmp_path, expect_mount=False)
    ctx = context(config)
    deliver_pending(ctx, T0)
    case = completed(ctx, "a", T0 + 10)
    (Path(case.case_path) / "output" / "dose.raw").write_bytes(b"\x01" * 3999)
    assert deliver_pending(ctx, T0 + 11) == 0
    row = get_case(ctx.conn, case.case_id)
    assert row.needs_review and "dose.raw has 3999 bytes, 4000 were fetched" in row.review_reason
    assert list(config.results.deliver_to.iterdir()) == []


@pytest.fixture
def kept(hpc, tmp_path):
    """A real HPC and remote retention of 10 days, no delivery: the local copy is all there is."""
    h = hpc(retention={"remote_days": 10})
    ctx = context(h.config)
    base = ctx.hosts["hpc"].remote.base_dir()

    def add(name: str, **fields):
        case = completed(ctx, name, PAST, **fields)
        with transaction(ctx.conn):
            ctx.conn.execute("UPDATE cases SET remote_dir = ? WHERE case_id = ?",
                             (remote_folder(ctx, case, base), case.case_id))
        return get_case(ctx.conn, case.case_id)
    return ctx, add


def test_clean_up_keeps_the_hpc_folder_of_a_damaged_or_unproven_local_copy(kept, capsys):
    ctx, add = kept
    whole, deleted, changed = add("whole"), add("deleted"), add("changed")
    old_unrecorded = add("old, no record", result_checksums=None)
    old_delivered = add("old, delivered", result_checksums=json.dumps(
        {name: hashlib.sha256(data).hexdigest() for name, data in RESULTS.items()}))
    (Path(deleted.case_path) / "output" / "dose.raw").unlink()
    (Path(changed.case_path) / "output" / "dose.raw").write_bytes(b"\x02" * 4000)   # same size, other bytes
    assert apply_retention(ctx, time.time()) == 2
    gone = {c.case_name for c in (whole, deleted, changed, old_unrecorded, old_delivered)
            if not os.path.isdir(c.remote_dir)}
    assert gone == {"whole", "old, delivered"}
    assert "dose.raw is missing" in get_case(ctx.conn, deleted.case_id).review_reason
    assert "differs from the checksum recorded when it was fetched" in get_case(ctx.conn, changed.case_id).review_reason
    assert not get_case(ctx.conn, old_unrecorded.case_id).needs_review       # kept, not alarming
    [verdict] = [v for v in plan(ctx.conn, ctx.config, time.time()) if v.case_id == old_unrecorded.case_id]
    assert not verdict.remove and "no record of its fetched results" in verdict.reason


# -- durations in words ---------------------------------------------------------------------------

def test_durations_read_sensibly_at_every_scale():
    assert [in_words(s) for s in (0, 45, 59.6, 600, 3 * 3600, 5400, 36 * 3600, 2.5 * 86400, 40 * 86400)] == \
        ["0 s", "45 s", "60 s", "10 min", "3 h", "1.5 h", "1.5 d", "2.5 d", "40 d"]


def test_retention_with_fractional_days_says_hours_ago(kept, capsys):
    ctx, add = kept
    case = add("recent")
    code, out, _ = cli(capsys, ctx.config, "cleanup", "--dry-run")
    assert "ended 11 d ago" in out and "0.0 d" not in out
    with transaction(ctx.conn):
        ctx.conn.execute("UPDATE cases SET completed_at = ? WHERE case_id = ?", (time.time() - 3 * 3600, case.case_id))
    config = replace(ctx.config, retention=RetentionConfig(remote_days=0.01))
    assert any("ended 3 h ago" in v.reason for v in plan(ctx.conn, config, time.time()))


# -- the record kept at fetch time ----------------------------------------------------------------

def test_the_poller_records_size_and_sha256_of_every_fetched_file_without_delivery(hpc):
    """No ``results.deliver_to`` at all: the record is kept anyway, and matches the local copy."""
    from tests.test_workers import ctx_for, poll_until_final, submitted
    ctx = ctx_for(hpc())
    assert ctx.config.results.deliver_to is None
    case = poll_until_final(ctx, submitted(ctx, "fetched", seconds=0.2).case_id)
    record = json.loads(case.result_checksums)
    folder = Path(case.case_path)
    files = {str(p.relative_to(folder)) for p in (folder / "output").rglob("*") if p.is_file()}
    assert set(record) == files and files
    assert all(record[name] == {"size": (folder / name).stat().st_size,
                                "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
               for name in files)
