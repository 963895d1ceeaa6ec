"""Results delivery: a completed case's fetched result files, copied whole to ``results.deliver_to``.

A step of its own, apart from completion: it reads completed cases not yet
delivered, so a failed delivery never touches a case's status or its spool
folder; it is recorded (``delivery_error``, ``delivery_attempts``), shown, and
tried again after ``results.retry_seconds``, for as long as it takes.

Atomic: the files (those matching ``hpc.result_files`` in the case's
``spool/done`` folder) are copied into ``<deliver_to>/.mqic-partial-<id>-<pid>``,
flushed to disk, checked (sha256 when ``results.checksums``, else sizes) and only
then renamed to ``<deliver_to>/<case name>``. A reader of ``deliver_to`` sees the
complete folder or nothing. An earlier folder of the same name is replaced
(renamed aside first, then removed). Cases that completed before delivery was
configured are not delivered (``results.deliver_since`` in ``settings``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from shared.config import Config
from shared.db import transaction
from shared.errors import MqicError
from shared.logs import for_case
from shared.settings import bump, get_setting, since
from shared.states import CaseStatus
from shared.store import Case, case_from_row, record_case_event
from shared.worker import Context, per_item

PARTIAL_PREFIX = ".mqic-partial-"
REPLACED_PREFIX = ".mqic-replaced-"
SINCE_KEY = "results.deliver_since"
LEASE_SECONDS = 600.0  # a delivery in hand is not started again by another process before this
BATCH = 1  # one copy per pass, so a large one delays the rest of the worker's pass by one copy at most
CHUNK = 1 << 20

# INDEXED BY: the partial index holds only undelivered cases; the status index would read every completed one.
DUE_SQL = ("SELECT * FROM cases INDEXED BY cases_undelivered"
           " WHERE status = 'completed' AND delivered_at IS NULL AND completed_at >= :since"
           " AND (next_delivery_at IS NULL OR next_delivery_at <= :now) ORDER BY completed_at LIMIT :limit")


class DeliveryError(MqicError):
    """The results could not be delivered this time (the message says why)."""


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: Path, names: Sequence[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of ``names`` under ``folder``."""
    return {name: sha256_of(folder / name) for name in names}


def due_cases(conn: sqlite3.Connection, since_at: float, now: float, limit: int = BATCH) -> list[Case]:
    return [case_from_row(r) for r in conn.execute(DUE_SQL, {"since": since_at, "now": now, "limit": limit})]


def claim_delivery(conn: sqlite3.Connection, case: Case, now: float) -> bool:
    """Take the case's delivery for ``LEASE_SECONDS`` (compare-and-set on ``next_delivery_at``)."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET next_delivery_at = ? WHERE case_id = ? AND status = 'completed'"
            " AND delivered_at IS NULL AND next_delivery_at IS ?", (now + LEASE_SECONDS, case.case_id,
                                                                    case.next_delivery_at))
        return cursor.rowcount == 1


def copy_whole(source: Path, names: Sequence[str], target: Path, partial: Path,
               sums: dict[str, str] | None) -> bool:
    """Copy ``names`` into ``partial``, check them, rename to ``target``; True when it replaced a folder."""
    for name in names:
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, partial / name)  # contents only: shares often refuse chmod
        with open(partial / name, "rb") as handle:
            os.fsync(handle.fileno())
    for name in names:
        copied = partial / name
        if sums is not None and sha256_of(copied) != sums[name]:
            raise DeliveryError(f"checksum of the copy of {name} differs from the fetched file")
        if copied.stat().st_size != (source / name).stat().st_size:
            raise DeliveryError(f"size of the copy of {name} differs from the fetched file")
    return rename_into_place(partial, target)


def rename_into_place(partial: Path, target: Path) -> bool:
    """Rename ``partial`` to ``target``; an earlier folder there is renamed aside, then removed."""
    if not target.exists() and not target.is_symlink():
        os.rename(partial, target)
        return False
    if target.is_symlink() or not target.is_dir():
        raise DeliveryError(f"{target} exists and is not a folder; remove it to let the delivery through")
    aside = target.with_name(f"{REPLACED_PREFIX}{partial.name[len(PARTIAL_PREFIX):]}")
    os.rename(target, aside)
    os.rename(partial, target)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def remove_partials(deliver_to: Path, case_id: int) -> None:
    """Temporary copies of this case left by an interrupted delivery."""
    for leftover in deliver_to.glob(f"{PARTIAL_PREFIX}{case_id}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass(frozen=True)
class Delivered:
    target: Path
    files: int
    sums: dict[str, str]  # empty when results.checksums is off
    replaced: bool


def deliver_files(config: Config, case: Case) -> Delivered:
    """Copy the case's results into ``deliver_to``. Raises DeliveryError or OSError."""
    deliver_to = config.results.deliver_to
    source = Path(case.case_path)
    if not deliver_to.is_dir():
        raise DeliveryError(f"results.deliver_to {deliver_to} is not a folder (is the share mounted?)")
    if case.local_removed_at is not None or case.spool_stage != "done" or not source.is_dir():
        raise DeliveryError(f"the case's local folder {source} is missing")
    host = config.host(case.host)
    patterns = host.hpc.result_files if host else ()
    names = result_names(source, patterns)
    if not names:
        raise DeliveryError(f"no result files ({', '.join(patterns) or 'host ' + str(case.host) + ' not configured'})"
                            f" in {source}")
    sums = checksums(source, names) if config.results.checksums else None
    remove_partials(deliver_to, case.case_id)
    partial = deliver_to / f"{PARTIAL_PREFIX}{case.case_id}-{os.getpid()}"
    target = deliver_to / case.case_name
    try:
        replaced = copy_whole(source, names, target, partial, sums)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return Delivered(target=target, files=len(names), sums=sums or {}, replaced=replaced)


def record_delivered(conn: sqlite3.Connection, case: Case, done: Delivered, *, now: float, worker: str) -> bool:
    detail = (f"results delivered to {done.target} ({done.files} files{', sha256 recorded' if done.sums else ''}"
              f"{'; replaced an earlier folder of that name' if done.replaced else ''})")
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE cases SET delivered_at = ?, delivered_to = ?, result_checksums = ?, delivery_error = NULL,"
            " next_delivery_at = NULL, delivery_attempts = delivery_attempts + 1"
            " WHERE case_id = ? AND status = 'completed' AND delivered_at IS NULL",
            (now, str(done.target), json.dumps(done.sums, sort_keys=True) if done.sums else None, case.case_id))
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
            " WHERE case_id = ? AND status = 'completed' AND delivered_at IS NULL", (message, now + retry_seconds,
                                                                                    case.case_id))
        if cursor.rowcount == 1 and case.delivery_error is None:
            record_case_event(conn, case.case_id, CaseStatus.COMPLETED, CaseStatus.COMPLETED, now=now,
                              worker=worker, detail=f"results delivery failed, retried every "
                                                    f"{retry_seconds:g} s: {message}")
        bump(conn, "delivery_failures", now=now)


def deliver_case(ctx: Context, case: Case, now: float) -> bool:
    """Deliver one case's results (if this process wins its claim); True when delivered."""
    if not claim_delivery(ctx.conn, case, now):
        return False
    try:
        done = deliver_files(ctx.config, case)
    except (DeliveryError, OSError) as exc:
        record_failure(ctx.conn, case, exc, ctx.config.results.retry_seconds, now=now, worker=ctx.name)
        ctx.log.warning("case %d: results delivery failed (%s); trying again in %g s", case.case_id, exc,
                        ctx.config.results.retry_seconds, extra=for_case(case.case_id, "deliver", exc))
        return False
    delivered = record_delivered(ctx.conn, case, done, now=now, worker=ctx.name)
    ctx.log.info("case %d: %d result files delivered to %s", case.case_id, done.files, done.target,
                 extra=for_case(case.case_id, "deliver"))
    return delivered


def deliver_pending(ctx: Context, now: float) -> int:
    """The delivery step of a worker's tick: deliver up to ``BATCH`` due cases; return how many."""
    since_at = deliver_since(ctx.conn, ctx.config, now)
    if since_at is None:
        return 0
    delivered = 0
    for case in due_cases(ctx.conn, since_at, now):
        with per_item(ctx, case.case_id, "deliver"):
            delivered += deliver_case(ctx, case, now)
    return delivered
