"""Results delivery: a completed case's fetched result files, copied whole to ``results.deliver_to``.

A step of its own, apart from completion: it reads completed cases not yet
delivered, so a failed delivery never touches a case's status or its spool
folder; it is recorded (``delivery_error``, ``delivery_attempts``), shown, and
tried again after ``results.retry_seconds``, for as long as it takes.

The record: when the poller fetches a case's results it records every file's
size and sha256 (``result_checksums``, ``{name: {"size", "sha256"}}``); delivery
copies exactly those files, first checking the local copy against the record (a
damaged one flags the case for review and is not delivered), and checks every
copy against it too (sizes always, sha256 unless ``results.checksums`` is false).

The share is only touched from a child process with a time limit
(``shared.share``): a share that stops answering or is not mounted is recorded
once (``results.share_state``) and tried again after ``retry_seconds``; nothing
is written underneath an unmounted share (``results.expect_mount`` /
``results.share_marker``). Atomic: the files are copied into
``<deliver_to>/.mqic-partial-<id>-<pid>``, flushed, checked and only then renamed
to ``<deliver_to>/<case name>``; an earlier folder of that name is replaced.
A claim is a short lease (``retry_seconds``) renewed while the copy shows signs of
life, so a delivery cut by a crash is tried again after ``retry_seconds``, and its
temporary folder (its process is gone) is removed then. Cases that completed
before delivery was configured are not delivered (``results.deliver_since``).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from shared.config import Config
from shared.db import transaction
from shared.errors import MqicError
from shared.logs import for_case
from shared.notify import queue_share_notice
from shared.settings import bump, get_setting, since
from shared.share import (ShareInterrupted, ShareProblem, ShareWriteError, note_share, probe_share, run_on_share,
                          share_request, share_state)
from shared.share_child import sha256_of
from shared.states import CaseStatus
from shared.store import Case, case_from_row, flag_for_review, record_case_event
from shared.worker import Context, per_item

SINCE_KEY = "results.deliver_since"
BATCH = 1  # one copy per pass, so a large one delays the rest of the upkeep pass by one copy at most
RENEW_EVERY_SECONDS = 1.0

# INDEXED BY: the partial index holds only undelivered cases; the status index would read every completed one.
DUE_SQL = ("SELECT * FROM cases INDEXED BY cases_undelivered"
           f" WHERE status = {CaseStatus.COMPLETED.sql} AND delivered_at IS NULL AND completed_at >= :since"
           " AND (next_delivery_at IS NULL OR next_delivery_at <= :now) ORDER BY completed_at LIMIT :limit")


class DeliveryError(MqicError):
    """The results could not be delivered this time (the message says why)."""


class LocalCopyDamaged(DeliveryError):
    """The local results differ from what was fetched: never delivered, the case is flagged."""


def deliver_since(conn: sqlite3.Connection, config: Config, now: float) -> float | None:
    """Cases completed from this moment on are delivered; None when delivery is off."""
    return since(conn, SINCE_KEY, config.results.deliver_to is not None, now=now)


def recorded_since(conn: sqlite3.Connection) -> float | None:
    """``deliver_since`` as last stamped by a worker, without writing (for read-only views)."""
    value = get_setting(conn, SINCE_KEY)
    return None if value is None else float(value)


def awaits_delivery(case: Case, config: Config, since_at: float | None) -> bool:
    """True while a completed case's results still have to reach ``deliver_to``."""
    return (config.results.deliver_to is not None and since_at is not None and case.delivered_at is None
            and case.completed_at is not None and case.completed_at >= since_at)


def result_names(folder: Path, patterns: Sequence[str]) -> list[str]:
    """Relative paths of the regular files matching ``patterns`` (a matched folder counts whole)."""
    names: set[str] = set()
    for pattern in patterns:
        for match in folder.glob(pattern):
            candidates = [match] if not match.is_dir() else [p for p in match.rglob("*")]
            names.update(str(p.relative_to(folder)) for p in candidates if p.is_file() and not p.is_symlink())
    return sorted(names)


# -- the record of the fetched results ----------------------------------------------------------------

def file_record(folder: Path, names: Sequence[str]) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"size", "sha256"}}`` of ``names`` under ``folder``."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)} for name in names}


def fetched_record(folder: Path) -> dict[str, dict[str, int | str]]:
    """The ``file_record`` of every regular file under ``folder`` (just fetched)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return file_record(folder, [str(p.relative_to(folder)) for p in files])


def recorded_results(case: Case) -> dict[str, tuple[int | None, str | None]] | None:
    """``{name: (size, sha256)}`` recorded for the case, or None when nothing was recorded.

    Cases completed before fetch-time records were kept may hold the sha256 sums that their
    delivery recorded (``{name: sha256}``): their size is then unknown (None).
    """
    if not case.result_checksums:
        return None
    record = {}
    for name, value in json.loads(case.result_checksums).items():
        record[name] = (None, value) if isinstance(value, str) else (value.get("size"), value.get("sha256"))
    return record


def local_copy_problem(folder: Path, record: dict[str, tuple[int | None, str | None]]) -> str | None:
    """None when every recorded file is in ``folder`` with its recorded size and sha256; else what differs."""
    for name, (size, digest) in sorted(record.items()):
        path = folder / name
        if not path.is_file():
            return f"its local result file {name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"its local result file {name} has {path.stat().st_size} bytes, {size} were fetched"
        if digest is not None and sha256_of(path) != digest:
            return f"its local result file {name} differs from the checksum recorded when it was fetched"
    return None


def due_cases(conn: sqlite3.Connection, since_at: float, now: float, limit: int = BATCH) -> list[Case]:
    return [case_from_row(r) for r in conn.execute(DUE_SQL, {"since": since_at, "now": now, "limit": limit})]


# -- claiming: a short lease, renewed while the copy is alive ----------------------------------------

def claim_delivery(conn: sqlite3.Connection, case: Case, now: float, lease_seconds: float) -> float | None:
    """Take the case's delivery until the returned moment (compare-and-set on ``next_delivery_at``)."""
    until = now + lease_seconds
    with transaction(conn):
        cursor = conn.execute(
            f"UPDATE cases SET next_delivery_at = ? WHERE case_id = ? AND status = {CaseStatus.COMPLETED.sql}"
            " AND delivered_at IS NULL AND next_delivery_at IS ?", (until, case.case_id, case.next_delivery_at))
        return until if cursor.rowcount == 1 else None


class Lease:
    """Our claim on one delivery, pushed forward while the copying child is alive.

    It moves by the real time elapsed since the claim (``ctx.clock``), on the claim's own
    time base (the tick's ``now``), so an injected clock stays consistent.
    """

    def __init__(self, ctx: Context, case_id: int, until: float):
        self.ctx, self.case_id, self.until, self.first = ctx, case_id, until, until
        self.started = self.renewed = ctx.clock()

    def renew(self) -> None:
        now = self.ctx.clock()
        if now - self.renewed < RENEW_EVERY_SECONDS:
            return
        until = self.first + (now - self.started)
        with transaction(self.ctx.conn):
            cursor = self.ctx.conn.execute("UPDATE cases SET next_delivery_at = ? WHERE case_id = ?"
                                           " AND delivered_at IS NULL AND next_delivery_at = ?",
                                           (until, self.case_id, self.until))
        if cursor.rowcount == 1:
            self.until, self.renewed = until, now


# -- copying --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivered:
    target: Path
    files: int
    record: dict[str, dict[str, int | str]]  # what the copies were checked against
    replaced: bool
    recorded_now: bool  # no fetch-time record: the sums were taken from the local copy now


def expected_files(config: Config, case: Case) -> tuple[dict[str, dict[str, int | str]], bool]:
    """What to deliver and check the copies against: the fetch-time record, after checking the
    local copy against it; for a case without one, the local files matching ``result_files``."""
    source = Path(case.case_path)
    if case.local_removed_at is not None or case.spool_stage != "done" or not source.is_dir():
        raise DeliveryError(f"the case's local folder {source} is missing")
    record = recorded_results(case)
    if record is not None and all(size is not None for size, _ in record.values()):
        problem = local_copy_problem(source, record)
        if problem:
            raise LocalCopyDamaged(problem)
        return {name: {"size": size, "sha256": digest} for name, (size, digest) in record.items()}, False
    host = config.host(case.host)
    patterns = host.hpc.result_files if host else ()
    names = result_names(source, patterns)
    if not names:
        raise DeliveryError(f"no result files ({', '.join(patterns) or 'host ' + str(case.host) + ' not configured'})"
                            f" in {source}")
    return file_record(source, names), True


def deliver_files(ctx: Context, case: Case, lease: Lease | None = None) -> Delivered:
    """Copy the case's results into ``deliver_to`` through the share child. Raises DeliveryError,
    ShareProblem, ShareWriteError, ShareInterrupted or OSError."""
    config = ctx.config
    record, recorded_now = expected_files(config, case)
    check = {name: (entry["size"], entry["sha256"] if config.results.checksums else None)
             for name, entry in record.items()}
    request = {**share_request(config), "case_id": case.case_id, "case_name": case.case_name,
               "source": case.case_path, "expected": check}
    answer = run_on_share("deliver", request, timeout=config.results.share_timeout_seconds, stop=ctx.stop,
                          on_alive=lease.renew if lease else None)
    return Delivered(target=Path(answer["target"]), files=len(record), record=record,
                     replaced=answer["replaced"], recorded_now=recorded_now)


def record_delivered(conn: sqlite3.Connection, case: Case, done: Delivered, *, now: float, worker: str) -> bool:
    detail = (f"results delivered to {done.target} ({done.files} files, checked against "
              f"{'the sums taken now (no record from the fetch)' if done.recorded_now else 'the fetch record'}"
              f"{'; replaced an earlier folder of that name' if done.replaced else ''})")
    record = json.dumps(done.record, sort_keys=True) if done.recorded_now else case.result_checksums
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET delivered_at = ?, delivered_to = ?, result_checksums = ?, delivery_error = NULL,"
            " next_delivery_at = NULL, delivery_attempts = delivery_attempts + 1"
            f" WHERE case_id = ? AND status = {CaseStatus.COMPLETED.sql} AND delivered_at IS NULL",
            (now, str(done.target), record, case.case_id))
        if cursor.rowcount != 1:
            return False
        record_case_event(conn, case.case_id, CaseStatus.COMPLETED, CaseStatus.COMPLETED, now=now, worker=worker,
                          detail=detail)
        bump(conn, "results_delivered", now=now)
        return True


def record_failure(conn: sqlite3.Connection, case: Case, error: Exception, retry_seconds: float, *,
                   now: float, worker: str) -> None:
    """Keep the error and the next attempt; the first failure of a streak also goes in the history."""
    message = f"{type(error).__name__}: {error}"[:1000]
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET delivery_error = ?, next_delivery_at = ?, delivery_attempts = delivery_attempts + 1"
            f" WHERE case_id = ? AND status = {CaseStatus.COMPLETED.sql} AND delivered_at IS NULL",
            (message, now + retry_seconds, case.case_id))
        if cursor.rowcount == 1 and case.delivery_error is None:
            record_case_event(conn, case.case_id, CaseStatus.COMPLETED, CaseStatus.COMPLETED, now=now,
                              worker=worker, detail=f"results delivery failed, retried every "
                                                    f"{retry_seconds:g} s: {message}")
        bump(conn, "delivery_failures", now=now)


def note_share_result(ctx: Context, problem: ShareProblem | None, now: float) -> None:
    """Record the share's state; an episode's start and end each queue one notice."""
    with transaction(ctx.conn):
        change = note_share(ctx.conn, problem, now=now)
        if change is not None:
            queue_share_notice(ctx.conn, ctx.config, change, problem, now)
    if change == "down":
        ctx.log.error("results share %s: %s", problem.kind, problem,
                      extra={"operation": "deliver", "error_type": type(problem).__name__})
    elif change == "back":
        ctx.log.info("results share answers again", extra={"operation": "deliver"})


def deliver_case(ctx: Context, case: Case, now: float) -> bool:
    """Deliver one case's results (if this process wins its claim); True when delivered."""
    until = claim_delivery(ctx.conn, case, now, ctx.config.results.retry_seconds)
    if until is None:
        return False
    try:
        done = deliver_files(ctx, case, Lease(ctx, case.case_id, until))
    except ShareInterrupted:
        return False  # stopping: the short lease lets the next worker try soon
    except (DeliveryError, ShareProblem, ShareWriteError, OSError) as exc:
        failed_delivery(ctx, case, exc, now)
        return False
    note_share_result(ctx, None, now)
    delivered = record_delivered(ctx.conn, case, done, now=now, worker=ctx.name)
    ctx.log.info("case %d: %d result files delivered to %s", case.case_id, done.files, done.target,
                 extra=for_case(case.case_id, "deliver"))
    return delivered


def failed_delivery(ctx: Context, case: Case, exc: Exception, now: float) -> None:
    if isinstance(exc, (ShareProblem, ShareWriteError)):  # refused: the share answered
        note_share_result(ctx, exc if isinstance(exc, ShareProblem) else None, now)
    record_failure(ctx.conn, case, exc, ctx.config.results.retry_seconds, now=now, worker=ctx.name)
    if isinstance(exc, LocalCopyDamaged):
        flag_for_review(ctx.conn, case, f"results not delivered: {exc}", now=now, worker=ctx.name)
    ctx.log.warning("case %d: results delivery failed (%s); trying again in %g s", case.case_id, exc,
                    ctx.config.results.retry_seconds, extra=for_case(case.case_id, "deliver", exc))


def share_waits(ctx: Context, now: float) -> bool:
    """True while the share is recorded down and was tried less than ``retry_seconds`` ago."""
    state = share_state(ctx.conn)
    return state is not None and now < state.checked_at + ctx.config.results.retry_seconds


def probe(ctx: Context, now: float) -> None:
    """Nothing due while the share is recorded down: ask it whether it is back."""
    try:
        answer = probe_share(ctx.config, stop=ctx.stop)
    except ShareInterrupted:
        return
    except ShareProblem as exc:
        note_share_result(ctx, exc, now)
        return
    except (ShareWriteError, OSError) as exc:
        ctx.log.warning("results share probe: %s", exc, extra={"operation": "deliver", "error_type": type(exc).__name__})
    else:
        if answer.get("removed"):
            ctx.log.info("results share: removed temporary copies left by dead processes: %s",
                         ", ".join(answer["removed"]), extra={"operation": "deliver"})
    note_share_result(ctx, None, now)


def deliver_pending(ctx: Context, now: float) -> int:
    """The delivery step of the upkeep loop: deliver up to ``BATCH`` due cases; return how many.

    While the share is recorded down it is tried once every ``retry_seconds`` (with a due case,
    or with a probe when none is due), never once per case and pass.
    """
    since_at = deliver_since(ctx.conn, ctx.config, now)
    if since_at is None or share_waits(ctx, now):
        return 0
    cases = due_cases(ctx.conn, since_at, now)
    if not cases and share_state(ctx.conn) is not None:
        probe(ctx, now)
    delivered = 0
    for case in cases:
        with per_item(ctx, case.case_id, "deliver"):
            delivered += deliver_case(ctx, case, now)
    return delivered
