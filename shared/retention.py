"""Clean-up with rules: old case folders on the HPC and old results folders in ``spool/done``.

``retention.remote_days``: the remote folder of a case is removed that many days
after it ended, and only when nothing of the case can be lost:

- a completed case: not flagged for review, its results delivered (when delivery
  is configured and the case was due), and its local copy proven: every file
  recorded when the results were fetched is in its ``spool/done`` folder with the
  recorded size and sha256 (or the local folder was already retired by
  ``retention.local_days``). A damaged local copy flags the case for review and the
  HPC folder stays. A case completed before fetch-time records were kept is proven
  only by the sha256 sums its delivery recorded; with no record at all its HPC
  folder is kept (``mqic cleanup --dry-run`` lists it: remove it by hand once checked);
- a failed case: only once an operator acknowledged it (``mqic ack ID``) and no
  zombie GPU slot names it (its task may still run); a retry makes it a waiting
  case again and these rules start over;
- never while the case's host is drained or down, and only a direct child of that host's ``remote_base_dir``
  (checked here and again on the HPC, symlinks resolved).

``retention.local_days``: the ``spool/done`` folder of a completed case is removed
that many days after completion when it is not flagged and its results were
delivered (when due). The database rows stay; ``remote_removed_at`` and
``local_removed_at`` record what went, with an event, and counters feed the metrics.
A case whose folder has vanished without us is flagged for review instead.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shared.config import Config
from shared.db import transaction
from shared.delivery import awaits_delivery, deliver_since, local_copy_problem, recorded_results, recorded_since
from shared.durations import in_words
from shared.errors import MqicError, RemoteError, RemoteFailure, Unreachable
from shared.logs import for_case
from shared.maintenance import is_drained
from shared.settings import bump
from shared.states import CaseStatus, sql_list
from shared.store import Case, case_from_row, flag_for_review, get_case, record_case_event
from shared.worker import Context, note_reach, per_item, reachable_hosts

DAY = 86400.0
BATCH = 20
REMOVING_PREFIX = "removing-"

# $1 base (absolute, resolved), $2 the case folder: removed only if it resolves inside base.
REMOVE_SCRIPT = r"""
base=$1 dir=$2
case $dir in "$base"/?*) ;; *) echo "refused: $dir is not inside $base" >&2; exit 5;; esac
if [ ! -e "$dir" ] && [ ! -L "$dir" ]; then printf 'absent'; exit 0; fi
real=$(cd -P -- "$dir" && pwd -P) || exit 6
case $real in "$base"/?*) ;; *) echo "refused: $dir resolves to $real, outside $base" >&2; exit 5;; esac
rm -rf -- "$dir" && printf 'removed'
"""

ENDED = (f"status IN ({sql_list(CaseStatus.COMPLETED, CaseStatus.FAILED)})"
         " AND remote_removed_at IS NULL AND remote_dir IS NOT NULL")
# INDEXED BY: the partial indexes hold only folders not removed yet (the status index would read them all).
REMOTE_CANDIDATES_SQL = f"SELECT * FROM cases INDEXED BY cases_remote_kept WHERE {ENDED} AND completed_at < :cutoff"
# The rules that SQL can tell, so cases kept for good never hide removable ones behind the LIMIT.
REMOTE_DUE_SQL = (REMOTE_CANDIDATES_SQL
                  + f" AND needs_review = 0 AND (status = {CaseStatus.COMPLETED.sql} OR acknowledged_at IS NOT NULL)"
                  f" AND (status = {CaseStatus.FAILED.sql} OR result_checksums IS NOT NULL OR local_removed_at IS NOT NULL)"
                  f" AND (status = {CaseStatus.FAILED.sql} OR :since IS NULL OR delivered_at IS NOT NULL"
                  " OR completed_at < :since)"
                  " AND NOT EXISTS (SELECT 1 FROM gpu_resources g WHERE g.assigned_case_id = cases.case_id)")
LOCAL_CANDIDATES_SQL = ("SELECT * FROM cases INDEXED BY cases_local_kept"
                        f" WHERE status = {CaseStatus.COMPLETED.sql} AND local_removed_at IS NULL"
                        " AND completed_at < :cutoff")
LOCAL_DUE_SQL = (LOCAL_CANDIDATES_SQL + " AND needs_review = 0"
                 " AND (:since IS NULL OR delivered_at IS NOT NULL OR completed_at < :since)")
ORDER = " ORDER BY completed_at LIMIT :limit"


class RetentionRefused(MqicError):
    """A clean-up that the rules do not allow (the message says why)."""


@dataclass(frozen=True)
class Verdict:
    """What the rules say of one folder: remove it, or keep it and why."""
    case_id: int
    case_name: str
    where: str  # remote | local
    path: str
    remove: bool
    reason: str
    done: str = ""  # after a real clean-up: removed, absent, or the error

    def line(self) -> str:
        verb = ("would remove" if not self.done else self.done) if self.remove else "keep"
        return f"{verb:<12} {self.where:<6} case {self.case_id} {self.case_name}: {self.path} ({self.reason})"


# -- the rules ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    remove: bool
    reason: str
    alarming: bool = False  # something is wrong with the case: flag it for review


def _keep(reason: str, alarming: bool = False) -> Judgement:
    return Judgement(False, reason, alarming)


def _cutoff(now: float, days: float | None) -> float | None:
    return None if days is None else now - days * DAY


def _age(case: Case, now: float) -> str:
    return f"ended {in_words(now - (case.completed_at or now))} ago"


NO_RECORD = ("no record of its fetched results (it completed before MQIC kept one), so its local copy cannot be "
             "proven; check it and remove the HPC folder by hand")


def local_results_intact(case: Case) -> str | None:
    """None when the case's local copy is proven against the record of its fetched results; else why not."""
    if case.local_removed_at is not None:
        return None  # retired by local retention, which checked delivery first
    folder = Path(case.case_path)
    if case.spool_stage != "done" or not folder.is_dir():
        return f"its local results folder {folder} is missing"
    record = recorded_results(case)
    return NO_RECORD if record is None else local_copy_problem(folder, record)


def _undelivered(case: Case) -> Judgement:
    return _keep("results not delivered yet" + (f" ({case.delivery_error})" if case.delivery_error else ""))


def judge_remote(conn: sqlite3.Connection, config: Config, case: Case, since_at: float | None,
                 now: float) -> Judgement:
    """What the rules say of the remote folder of an ended case past ``remote_days``."""
    if case.needs_review:
        return _keep(f"flagged for review: {case.review_reason}")
    if case.status is CaseStatus.FAILED:
        if case.acknowledged_at is None:
            return _keep(f"failed, not acknowledged (`mqic ack {case.case_id}` allows its clean-up)")
        zombie = conn.execute("SELECT 1 FROM gpu_resources WHERE assigned_case_id = ?", (case.case_id,)).fetchone()
        if zombie is not None:
            return _keep("failed, and a GPU slot still names it (its task may still run)")
        return Judgement(True, f"failed and acknowledged, {_age(case, now)}")
    if awaits_delivery(case, config, since_at):
        return _undelivered(case)
    problem = local_results_intact(case)
    if problem:
        return _keep(problem, alarming=problem is not NO_RECORD)
    return Judgement(True, f"completed, results safe locally, {_age(case, now)}")


def judge_local(config: Config, case: Case, since_at: float | None, now: float) -> Judgement:
    """What the rules say of the ``spool/done`` folder of a completed case past ``local_days``."""
    if case.needs_review:
        return _keep(f"flagged for review: {case.review_reason}")
    if awaits_delivery(case, config, since_at):
        return _undelivered(case)
    folder = Path(case.case_path)
    if case.spool_stage != "done" or not folder.is_dir():
        return _keep(f"its local results folder {folder} is missing", alarming=True)
    if folder.parent != config.spool_path / "done":
        return _keep(f"its folder {folder} is not in {config.spool_path / 'done'}", alarming=True)
    return Judgement(True, f"completed, {_age(case, now)}")


def _rows(conn: sqlite3.Connection, sql: str, **params) -> list[Case]:
    return [case_from_row(r) for r in conn.execute(sql + ORDER, params)]


def plan(conn: sqlite3.Connection, config: Config, now: float, *, limit: int = 1000) -> list[Verdict]:
    """Every folder past its retention age, with what the rules say of it (nothing is changed)."""
    since_at = recorded_since(conn) if config.results.deliver_to is not None else None
    verdicts = []
    remote_cutoff, local_cutoff = _cutoff(now, config.retention.remote_days), _cutoff(now, config.retention.local_days)
    if remote_cutoff is not None:
        for case in _rows(conn, REMOTE_CANDIDATES_SQL, cutoff=remote_cutoff, limit=limit):
            judged = judge_remote(conn, config, case, since_at, now)
            verdicts.append(Verdict(case.case_id, case.case_name, "remote", case.remote_dir, judged.remove,
                                    judged.reason))
    if local_cutoff is not None:
        for case in _rows(conn, LOCAL_CANDIDATES_SQL, cutoff=local_cutoff, limit=limit):
            judged = judge_local(config, case, since_at, now)
            verdicts.append(Verdict(case.case_id, case.case_name, "local", case.case_path, judged.remove,
                                    judged.reason))
    return verdicts


# -- removing -------------------------------------------------------------------------------------

def inside_base(base: str, remote_dir: str) -> bool:
    """True for a direct child of ``base`` (both absolute; no ``..``)."""
    path = PurePosixPath(remote_dir)
    return path.is_absolute() and ".." not in path.parts and path.parent == PurePosixPath(base)


def why(exc: Exception) -> str:
    """What went wrong, in one line: a remote command's own error output when it has one."""
    text = exc.stderr if isinstance(exc, RemoteError) and exc.stderr.strip() else str(exc)
    return " ".join(text.split())


def remove_remote_folder(ctx: Context, case: Case) -> str:
    """Remove the case's folder on its host; returns ``removed`` or ``absent``. Raises RemoteFailure."""
    host = ctx.host(case.host)
    if host is None:
        raise RetentionRefused(f"the case's host {case.host!r} is not configured")
    base = host.remote.base_dir()
    if not inside_base(base, case.remote_dir):
        raise RetentionRefused(f"{case.remote_dir} is not a folder directly inside the remote_base_dir of "
                               f"host {host.name} ({base})")
    out = host.remote.run_script(REMOVE_SCRIPT, base, case.remote_dir, timeout=host.timeout)
    return "absent" if out.endswith("absent") else "removed"


def host_left_alone(ctx: Context, case: Case) -> bool:
    """A drained host is under maintenance, a host last seen unreachable cannot answer: leave both alone."""
    return is_drained(ctx.conn, case.host or "") or case.host not in {h.name for h in reachable_hosts(ctx)}


def mark_remote_removed(ctx: Context, case: Case, how: str, reason: str, now: float) -> bool:
    with transaction(ctx.conn):
        cursor = ctx.conn.execute("UPDATE cases SET remote_removed_at = ? WHERE case_id = ? AND status = ?"
                                  " AND remote_removed_at IS NULL", (now, case.case_id, case.status.value))
        if cursor.rowcount == 1:
            detail = f"remote folder {case.remote_dir} {'removed' if how == 'removed' else 'was already gone'}" \
                     f" by retention ({reason})"
            record_case_event(ctx.conn, case.case_id, case.status, case.status, now=now, worker=ctx.name, detail=detail)
            bump(ctx.conn, "retention_remote_removed", now=now)
            return True
    current = get_case(ctx.conn, case.case_id)
    if current is not None and current.status is not case.status:  # retried while we removed it
        flag_for_review(ctx.conn, current, f"retention removed its remote folder {case.remote_dir} while it "
                                           f"moved to {current.status.value}", now=now, worker=ctx.name)
    return False


def remove_local_folder(ctx: Context, case: Case, reason: str, now: float) -> bool:
    """Rename the ``spool/done`` folder out of the way and record it in one transaction, then delete it."""
    folder = Path(case.case_path)
    if folder.parent != ctx.spool.stage_dir("done"):
        raise RetentionRefused(f"{folder} is not inside {ctx.spool.stage_dir('done')}")
    trash = ctx.spool.staging_dir(f"{REMOVING_PREFIX}{case.case_id}")
    with ctx.spool.lock(), transaction(ctx.conn):
        cursor = ctx.conn.execute("UPDATE cases SET local_removed_at = ? WHERE case_id = ?"
                                  f" AND status = {CaseStatus.COMPLETED.sql} AND local_removed_at IS NULL",
                                  (now, case.case_id))
        if cursor.rowcount != 1:
            return False
        record_case_event(ctx.conn, case.case_id, case.status, case.status, now=now, worker=ctx.name,
                          detail=f"local folder {folder} removed by retention ({reason})")
        bump(ctx.conn, "retention_local_removed", now=now)
        os.rename(folder, trash)  # a failure rolls the mark back
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _kept(ctx: Context, case: Case, judged: Judgement, now: float) -> None:
    """A case the strict query let through but the rules keep: flag it when something is wrong."""
    if judged.alarming and flag_for_review(ctx.conn, case, f"retention: {judged.reason}", now=now, worker=ctx.name):
        ctx.log.warning("case %d flagged for review: %s", case.case_id, judged.reason,
                        extra=for_case(case.case_id, "retention") | {"error_type": "ResultsMissing"})


def apply_local(ctx: Context, now: float, since_at: float | None) -> int:
    cutoff = _cutoff(now, ctx.config.retention.local_days)
    if cutoff is None:
        return 0
    removed = 0
    for case in _rows(ctx.conn, LOCAL_DUE_SQL, cutoff=cutoff, since=since_at, limit=BATCH):
        with per_item(ctx, case.case_id, "retention"):
            judged = judge_local(ctx.config, case, since_at, now)
            if not judged.remove:
                _kept(ctx, case, judged, now)
            elif remove_local_folder(ctx, case, judged.reason, now):
                removed += 1
                ctx.log.info("case %d: local folder removed (%s)", case.case_id, judged.reason,
                             extra=for_case(case.case_id, "retention"))
    return removed


UNREACHABLE = "unreachable"


def retire_remote(ctx: Context, case: Case, since_at: float | None, now: float) -> bool | str:
    """Remove one case's remote folder if the rules allow; ``UNREACHABLE`` ends the pass."""
    judged = judge_remote(ctx.conn, ctx.config, case, since_at, now)
    if not judged.remove:
        _kept(ctx, case, judged, now)
        return False
    try:
        how = remove_remote_folder(ctx, case)
    except Unreachable as exc:
        note_reach(ctx, ctx.hosts[case.host], exc)
        ctx.log.warning("retention: HPC unreachable (%s); trying again later", exc,
                        extra=for_case(case.case_id, "retention", exc))
        return UNREACHABLE
    except (RemoteFailure, RetentionRefused) as exc:
        flag_for_review(ctx.conn, case, f"retention could not remove {case.remote_dir}: {why(exc)}"[:500],
                        now=now, worker=ctx.name)
        ctx.log.error("case %d: cannot remove remote folder %s (%s)", case.case_id, case.remote_dir, why(exc),
                      extra=for_case(case.case_id, "retention", exc))
        return False
    ctx.log.info("case %d: remote folder %s %s (%s)", case.case_id, case.remote_dir, how, judged.reason,
                 extra=for_case(case.case_id, "retention"))
    return mark_remote_removed(ctx, case, how, judged.reason, now)


def apply_remote(ctx: Context, now: float, since_at: float | None) -> int:
    cutoff = _cutoff(now, ctx.config.retention.remote_days)
    if cutoff is None:
        return 0
    removed = 0
    for case in _rows(ctx.conn, REMOTE_DUE_SQL, cutoff=cutoff, since=since_at, limit=BATCH):
        if host_left_alone(ctx, case):
            continue
        result: bool | str = False
        with per_item(ctx, case.case_id, "retention"):
            result = retire_remote(ctx, case, since_at, now)
        if result == UNREACHABLE:
            continue  # the host is now marked down: its other cases are left alone
        removed += result is True
    return removed


def apply_retention(ctx: Context, now: float) -> int:
    """The clean-up step of a worker's tick: apply both rules to a batch each; return folders removed."""
    retention = ctx.config.retention
    if retention.remote_days is None and retention.local_days is None:
        return 0
    since_at = deliver_since(ctx.conn, ctx.config, now)
    return apply_local(ctx, now, since_at) + apply_remote(ctx, now, since_at)


def cleanup(ctx: Context, now: float, *, dry_run: bool) -> list[Verdict]:
    """What ``mqic cleanup`` does: judge every folder past its age; remove the allowed ones unless ``dry_run``."""
    verdicts = plan(ctx.conn, ctx.config, now)
    if dry_run:
        return verdicts
    return [_carry_out(ctx, v, now) if v.remove else v for v in verdicts]


def _carry_out(ctx: Context, verdict: Verdict, now: float) -> Verdict:
    """Remove one folder the plan allows, judging the case again first (it may have changed)."""
    case = get_case(ctx.conn, verdict.case_id)
    since_at = deliver_since(ctx.conn, ctx.config, now)
    judged = judge_local(ctx.config, case, since_at, now) if verdict.where == "local" else \
        judge_remote(ctx.conn, ctx.config, case, since_at, now)
    if not judged.remove:
        return Verdict(**{**verdict.__dict__, "remove": False, "reason": judged.reason})
    try:
        if verdict.where == "local":
            done = "removed" if remove_local_folder(ctx, case, verdict.reason, now) else "changed meanwhile"
        elif is_drained(ctx.conn, case.host or ""):
            done = f"skipped: host {case.host} drained"
        else:
            how = remove_remote_folder(ctx, case)
            done = how if mark_remote_removed(ctx, case, how, verdict.reason, now) else "changed meanwhile"
    except (RemoteFailure, RetentionRefused, OSError) as exc:
        done = f"FAILED: {type(exc).__name__}: {why(exc)[:200]}"
    return Verdict(**{**verdict.__dict__, "done": done})


def acknowledge(conn: sqlite3.Connection, case: Case, *, now: float, worker: str) -> bool:
    """An operator has seen this failed case: its remote folder may be cleaned up by the rules.

    Returns False when it is not failed or was already acknowledged.
    """
    if case.status is not CaseStatus.FAILED:
        return False
    with transaction(conn):
        cursor = conn.execute("UPDATE cases SET acknowledged_at = ? WHERE case_id = ?"
                              f" AND status = {CaseStatus.FAILED.sql} AND acknowledged_at IS NULL", (now, case.case_id))
        if cursor.rowcount != 1:
            return False
        record_case_event(conn, case.case_id, case.status, case.status, now=now, worker=worker,
                          detail="failure acknowledged by an operator (retention may remove its remote folder)")
        return True
