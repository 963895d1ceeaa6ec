"""Notices: someone hears when a case completes, fails or needs review, or a host is down.

Decoupled from the places that change a case: a step reads ``case_events`` after
a cursor kept in ``settings`` and turns the wanted ones into rows of ``notices``
(an outbox), in the same transaction that moves the cursor, so every event is
considered once whatever crashes. A host counts as unreachable once the workers'
calls to it have failed (``host_reach``, down since ``down_since``) for
``notify.unreachable_after_minutes``; one notice per host and outage, and one when it
is back. A host whose key ssh refused (``problem`` ``host_key``) is reported at once.
The outage already reported is kept per host in ``settings``.

Sending never blocks the worker: ``notify.command`` (a list of arguments, no
shell) is started as a child process with the notice's JSON on its standard
input, in its own process group, and the next passes only look whether it has
ended. Notices go one at a time, oldest first, so they arrive in order. One that outlives ``notify.timeout_seconds`` is killed (with its group);
a failure is logged and retried after ``notify.retry_seconds``, up to
``notify.max_attempts``. A notice is claimed with a lease, so a worker that dies
while sending leaves it to be sent again (at least once).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from shared.config import Config
from shared.db import transaction
from shared.durations import in_words
from shared.liveness import HOST_KEY
from shared.logs import for_case
from shared.settings import bump, delete_setting, get_setting, put_setting, since
from shared.worker import Context

CURSOR_KEY = "notify.cursor"
SINCE_KEY = "notify.since"
REPORTED_PREFIX = "notify.down_reported."  # + host name: the down_since of the outage reported
_CHILDREN: set[subprocess.Popen] = set()  # killed when the process exits, so none outlives its worker
MAX_PARALLEL = 1  # one at a time, oldest first: notices arrive in the order things happened
EVENT_BATCH = 500
LEASE_MARGIN_SECONDS = 30.0
FLAG_PREFIX = "flagged for review: "

EVENTS_SQL = (
    "SELECT e.event_id, e.case_id, e.from_status, e.to_status, e.at, e.detail, c.case_name, c.priority,"
    " c.status, c.outcome, c.exit_code, c.error_message, c.pueue_group, c.host"
    " FROM case_events e JOIN cases c ON c.case_id = e.case_id WHERE e.event_id > ? ORDER BY e.event_id LIMIT ?")
CLAIM_SQL = (
    "UPDATE notices SET claimed_by = :w, lease_until = :lease, attempts = attempts + 1"
    " WHERE notice_id = (SELECT notice_id FROM notices WHERE sent_at IS NULL AND gave_up_at IS NULL"
    "   AND next_attempt_at <= :now AND (claimed_by IS NULL OR lease_until < :now)"
    "   ORDER BY next_attempt_at, notice_id LIMIT 1) RETURNING *")


@dataclass
class Sending:
    """A notifier child of this process (a per-process observation; the lease is the truth)."""
    notice_id: int
    case_id: int | None
    process: subprocess.Popen
    deadline: float  # time.monotonic()
    stderr: IO[bytes]


# -- events into notices ----------------------------------------------------------------------------

def kind_of(row: sqlite3.Row) -> str | None:
    """``completed``, ``failed``, ``flagged`` or None for an event nobody is told about."""
    if row["to_status"] == "completed" and row["from_status"] == "running":
        return "completed"
    if row["to_status"] == "failed" and row["from_status"] != "failed":
        return "failed"
    if row["from_status"] == row["to_status"] and row["detail"].startswith(FLAG_PREFIX):
        return "flagged"
    return None


def one_line(text: str) -> str:
    """A summary safe for a mail subject or a chat line: no newlines or control characters, bounded."""
    return " ".join(text.split())[:1000]


def iso(stamp: float, config: Config) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).astimezone(config.tz).isoformat(timespec="seconds")


def case_payload(kind: str, row: sqlite3.Row, config: Config) -> dict[str, Any]:
    """The JSON a notifier gets for a case event; ``text`` is a one-line summary (chat webhooks show it)."""
    name, case_id = row["case_name"], row["case_id"]
    urgent = " (urgent)" if row["priority"] == "urgent" else ""
    text = {"completed": f"MQIC: case {case_id} {name!r}{urgent} completed",
            "failed": f"MQIC: case {case_id} {name!r}{urgent} FAILED ({row['outcome']}): {row['error_message'] or ''}",
            "flagged": f"MQIC: case {case_id} {name!r}{urgent} needs review: {row['detail'][len(FLAG_PREFIX):]}"}[kind]
    return {"event": f"case_{kind}", "text": one_line(text).rstrip(":"), "case_id": case_id, "case_name": name,
            "priority": row["priority"], "status": row["status"], "outcome": row["outcome"],
            "exit_code": row["exit_code"], "error": row["error_message"], "detail": row["detail"],
            "group": row["pueue_group"], "host": row["host"], "at": iso(row["at"], config),
            "event_id": row["event_id"]}


def add_notice(conn: sqlite3.Connection, kind: str, payload: dict[str, Any], *, case_id: int | None,
               now: float) -> None:
    conn.execute("INSERT INTO notices (kind, case_id, payload, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
                 (kind, case_id, json.dumps(payload, ensure_ascii=False), now, now))


def collect_events(conn: sqlite3.Connection, config: Config, since_at: float, now: float) -> int:
    """Turn the case events after the cursor into notices and move the cursor, in one transaction."""
    if not conn.execute("SELECT EXISTS(SELECT 1 FROM case_events WHERE event_id > ?)",
                        (int(get_setting(conn, CURSOR_KEY, 0)),)).fetchone()[0]:
        return 0  # nothing new: no write lock taken
    with transaction(conn):
        cursor = int(get_setting(conn, CURSOR_KEY, 0))
        rows = conn.execute(EVENTS_SQL, (cursor, EVENT_BATCH)).fetchall()
        if not rows:
            return 0
        added = 0
        for row in rows:
            kind = kind_of(row)
            if kind in config.notify.events and row["at"] >= since_at:
                add_notice(conn, kind, case_payload(kind, row, config), case_id=row["case_id"], now=now)
                added += 1
        put_setting(conn, CURSOR_KEY, rows[-1]["event_id"], now=now)
        return added


REACH_SQL = "SELECT host, ok, checked_at, checked_by, error, down_since, problem FROM host_reach ORDER BY host"
REPORTED_SQL = "SELECT key, value FROM settings WHERE key >= ? AND key < ?"


def reported_outages(conn: sqlite3.Connection) -> dict[str, float]:
    """The outage reported per host (its ``down_since``), from ``settings``."""
    rows = conn.execute(REPORTED_SQL, (REPORTED_PREFIX, REPORTED_PREFIX[:-1] + chr(ord(".") + 1)))
    return {key[len(REPORTED_PREFIX):]: float(value) for key, value in rows}


def reach_changes(conn: sqlite3.Connection, config: Config, now: float) -> list[tuple[str, sqlite3.Row, float | None]]:
    """``(change, host_reach row, reported down_since)`` per host whose state calls for a notice:
    ``report`` (down for ``unreachable_after_minutes``, not reported yet) or ``back`` (answers
    again after a reported outage)."""
    reported = reported_outages(conn)
    changes = []
    for row in conn.execute(REACH_SQL).fetchall():
        known = reported.get(row["host"])
        if row["ok"] and known is not None:
            changes.append(("back", row, known))
        elif not row["ok"] and row["down_since"] is not None and known != row["down_since"] \
                and (row["problem"] == HOST_KEY or ("unreachable" in config.notify.events and  # a key: at once
                     (now - row["down_since"]) / 60 >= config.notify.unreachable_after_minutes)):
            changes.append(("report", row, known))
    return changes


def watch_reachability(conn: sqlite3.Connection, config: Config, now: float) -> int:
    """One notice per host that stays unreachable past the limit, one when it answers again."""
    if not reach_changes(conn, config, now):
        return 0  # the usual case: a read, no write lock
    added = 0
    with transaction(conn):
        for change, row, reported in reach_changes(conn, config, now):
            key = REPORTED_PREFIX + row["host"]
            if change == "report":
                put_setting(conn, key, row["down_since"], now=now)
                what = f"UNREACHABLE for {in_words(now - row['down_since'])}"
            else:
                delete_setting(conn, key)
                what = f"reachable again after {in_words(now - reported)}"
            added += _host_notice(conn, config, change, what, row, now)
    return added


def _host_notice(conn: sqlite3.Connection, config: Config, change: str, what: str, row: sqlite3.Row,
                 now: float) -> int:
    kind = "unreachable" if change == "report" else "reachable"
    if change == "report" and row["problem"] == HOST_KEY:
        kind, what = "host_key", "HOST KEY CHANGED: possible interception; nothing is sent there until it is verified"
    host = config.host(row["host"])
    where = f"host {row['host']}" + (f" ({host.hpc.host})" if host is not None and host.hpc.host != row["host"] else "")
    error = row["error"] if kind != "reachable" else None
    payload = {"event": f"hpc_{kind}", "text": one_line(f"MQIC: {where} {what}" + (f": {error}" if error else "")),
               "host": row["host"], "address": None if host is None else host.hpc.host, "error": error,
               "at": iso(now, config), "last_contact": iso(row["checked_at"], config), "worker": row["checked_by"]}
    add_notice(conn, f"hpc_{kind}", payload, case_id=None, now=now)
    return 1


def queue_share_notice(conn: sqlite3.Connection, config: Config, change: str, problem: Exception | None,
                       now: float) -> int:
    """One notice when the results share stops answering or is found unmounted (``down``), one when
    it is back; called by delivery in the transaction that records the change."""
    if "share" not in config.notify.events or not config.notify.command:
        return 0
    kind = "share_down" if change == "down" else "share_back"
    share = str(config.results.deliver_to)
    text = (f"MQIC: results share {share} {getattr(problem, 'kind', 'unusable')}: {problem}; deliveries wait"
            if change == "down" else f"MQIC: results share {share} answers again; deliveries resume")
    payload = {"event": kind, "text": one_line(text), "share": share, "error": None if problem is None else str(problem),
               "at": iso(now, config)}
    add_notice(conn, kind, payload, case_id=None, now=now)
    return 1


# -- sending ------------------------------------------------------------------------------------------

def claim_notice(conn: sqlite3.Connection, worker: str, now: float, lease_seconds: float) -> sqlite3.Row | None:
    if not conn.execute("SELECT EXISTS(SELECT 1 FROM notices WHERE sent_at IS NULL AND gave_up_at IS NULL"
                        " AND next_attempt_at <= ?)", (now,)).fetchone()[0]:
        return None
    with transaction(conn):
        return conn.execute(CLAIM_SQL, {"w": worker, "now": now, "lease": now + lease_seconds}).fetchone()


def child_env(payload: dict[str, Any]) -> dict[str, str]:
    """The worker's environment plus ``MQIC_EVENT``, ``MQIC_SUMMARY``, ``MQIC_CASE_ID``, ``MQIC_CASE_NAME``."""
    extra = {"MQIC_EVENT": payload["event"], "MQIC_SUMMARY": payload["text"],
             "MQIC_CASE_ID": str(payload.get("case_id") or ""), "MQIC_CASE_NAME": payload.get("case_name") or ""}
    return {**os.environ, **extra}


def start(ctx: Context, notice: sqlite3.Row) -> Sending:
    """Start the notifier for ``notice`` without waiting for it (its own process group)."""
    payload = json.loads(notice["payload"])
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(list(ctx.config.notify.command), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=stderr, env=child_env(payload), process_group=0, close_fds=True)
    _CHILDREN.add(process)
    try:
        process.stdin.write(notice["payload"].encode("utf-8") + b"\n")  # small: fits the pipe, never blocks
        process.stdin.close()
    except OSError:
        pass  # the notifier exited without reading; its exit code tells
    return Sending(notice["notice_id"], notice["case_id"], process,
                   time.monotonic() + ctx.config.notify.timeout_seconds, stderr)


def kill_group(process: subprocess.Popen) -> None:
    """Kill a notifier and everything it started (it leads its own process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    _CHILDREN.discard(process)


@atexit.register
def _kill_children() -> None:
    for process in list(_CHILDREN):
        kill_group(process)


def outcome(sending: Sending, config: Config, stopping: bool) -> tuple[bool, str | None] | None:
    """None while it runs; else (sent?, error)."""
    code = sending.process.poll()
    if code is None:
        if time.monotonic() < sending.deadline and not stopping:
            return None
        kill_group(sending.process)
        return False, f"no answer within {config.notify.timeout_seconds:g} s (killed)"
    _CHILDREN.discard(sending.process)
    if code == 0:
        return True, None
    sending.stderr.seek(0)
    tail = sending.stderr.read()[-500:].decode("utf-8", "replace").strip()
    return False, f"exit code {code}" + (f": {tail}" if tail else "")


def record_outcome(conn: sqlite3.Connection, config: Config, notice_id: int, sent: bool, error: str | None,
                   *, now: float, worker: str) -> bool:
    """Mark the notice sent, or keep the error and retry it (or give up after ``max_attempts``)."""
    with transaction(conn):
        if sent:
            conn.execute("UPDATE notices SET sent_at = ?, last_error = NULL, claimed_by = NULL, lease_until = NULL"
                         " WHERE notice_id = ? AND claimed_by = ?", (now, notice_id, worker))
            bump(conn, "notices_sent", now=now)
            return False
        row = conn.execute(
            "UPDATE notices SET last_error = ?, claimed_by = NULL, lease_until = NULL, next_attempt_at = ?,"
            " gave_up_at = CASE WHEN attempts >= ? THEN ? END WHERE notice_id = ? AND claimed_by = ?"
            " RETURNING gave_up_at", (error, now + config.notify.retry_seconds, config.notify.max_attempts, now,
                                      notice_id, worker)).fetchone()
        bump(conn, "notices_failed", now=now)
        return row is not None and row["gave_up_at"] is not None


def lease_seconds(config: Config) -> float:
    return config.notify.timeout_seconds + LEASE_MARGIN_SECONDS


def renew_lease(conn: sqlite3.Connection, notice_id: int, worker: str, until: float) -> None:
    with transaction(conn):
        conn.execute("UPDATE notices SET lease_until = ? WHERE notice_id = ? AND claimed_by = ?",
                     (until, notice_id, worker))


def finish_sent(ctx: Context, now: float) -> int:
    """Settle the children of this process that ended (or ran out of time); return how many.

    A child still running keeps its notice's lease, so nobody starts it a second time.
    """
    running: dict[int, Sending] = ctx.memory.notices_sending
    settled = 0
    for notice_id, sending in list(running.items()):
        result = outcome(sending, ctx.config, ctx.stop.is_set())
        if result is None:
            renew_lease(ctx.conn, notice_id, ctx.worker_id, now + lease_seconds(ctx.config))
            continue
        sent, error = result
        sending.stderr.close()
        del running[notice_id]
        gave_up = record_outcome(ctx.conn, ctx.config, notice_id, sent, error, now=now, worker=ctx.worker_id)
        settled += 1
        if not sent:
            ctx.log.warning("notice %d: notify.command failed (%s)%s", notice_id, error,
                            "; giving up" if gave_up else "; will retry",
                            extra=for_case(sending.case_id, "notify") | {"error_type": "NotifyFailed"})
    return settled


def start_due(ctx: Context, now: float) -> int:
    """Start notifiers for due notices, up to ``MAX_PARALLEL`` children of this process."""
    running: dict[int, Sending] = ctx.memory.notices_sending
    lease = lease_seconds(ctx.config)
    started = 0
    while len(running) < MAX_PARALLEL:
        notice = claim_notice(ctx.conn, ctx.worker_id, now, lease)
        if notice is None:
            break
        try:
            running[notice["notice_id"]] = start(ctx, notice)
        except OSError as exc:  # the command could not be started at all
            record_outcome(ctx.conn, ctx.config, notice["notice_id"], False,
                           f"cannot start {ctx.config.notify.command[0]}: {exc}", now=now, worker=ctx.worker_id)
            ctx.log.warning("notice %d: cannot start notify.command (%s)", notice["notice_id"], exc,
                            extra=for_case(notice["case_id"], "notify", exc))
            break
        started += 1
    return started


def send_notifications(ctx: Context, now: float) -> int:
    """The notice step of a worker's tick: new events into notices, settle and start notifiers. Never waits."""
    enabled = bool(ctx.config.notify.command)
    since_at = since(ctx.conn, SINCE_KEY, enabled, now=now)
    if since_at is None:
        return 0
    done = collect_events(ctx.conn, ctx.config, since_at, now)
    done += watch_reachability(ctx.conn, ctx.config, now)
    done += finish_sent(ctx, now)
    return done + start_due(ctx, now)
