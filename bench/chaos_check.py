"""The chaos run's checker: what the clinic's promise means on the final state of a run.

No case lost, none run twice, none failed by mistake, nobody else's task touched. Read from
the final database, spool and ``pueue status --json``, plus what only the HPC keeps: the
simulation-start log (one line per start, written by the remote command) and each case's
exit-status record. Every broken invariant is one line in ``Verdict.violations``.
"""
from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

SPOOL_STAGES = ("queued", "active", "done", "failed")
RESULT_DIR = "output"  # the sandbox fetches hpc.result_files = ["output/*"]
EXIT_STATUS_RECORD = Path(".mqic") / "exit_status"  # in the case's remote folder (issue 10, defect 5)
UNREACHABLE_MARGIN_S = 2.0  # a decision this soon after an outage began may rest on an answer from before it


@dataclass(frozen=True)
class Expected:
    """What the driver knows about a run, beyond the database.

    ``victims``: label -> how many times its task was killed by a signal we did not send (a
    pueued restart, another user's ``pueue kill``); each allows one more start, and the case
    must still end by its own merits (requeued, not failed ``killed``). ``long_cases``: names
    whose simulation outlasts ``running_case_timeout_hours``. ``cleaned``: label -> {task id:
    its state} of the finished tasks another user's ``pueue clean`` removed (their logs went too).
    ``starts``: case id -> simulation starts on the HPC (None: not recorded). ``foreign``:
    another user's task id -> its command; ``foreign_excused``: those our own chaos killed (a
    pueued restart); ``foreign_host``: the host they were added on (None: the one snapshot).
    ``outages``: (begin, end) epoch seconds when nothing could reach the HPC; with several hosts,
    ``host_outages`` gives them per host name instead, and each case is judged only against the
    outages of the host it is on (``cases.host``).
    """
    modes: dict[str, str]
    victims: Mapping[str, int] = field(default_factory=dict)
    long_cases: frozenset[str] = frozenset()
    cleaned: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    starts: Mapping[int, int] | None = None
    foreign: Mapping[int, str] = field(default_factory=dict)
    foreign_excused: frozenset[int] = frozenset()
    foreign_host: str | None = None
    outages: tuple[tuple[float, float], ...] = ()
    host_outages: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    def outages_of(self, host: str | None) -> tuple[tuple[float, float], ...]:
        """The windows when nothing could reach ``host`` (with one host: ``outages``)."""
        return self.host_outages.get(host or "", ()) if self.host_outages else self.outages


@dataclass
class Verdict:
    counts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def add(self, key: str, message: str | None = None, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount
        if message:
            self.violations.append(message)

    @property
    def ok(self) -> bool:
        return not self.violations


# ---------------------------------------------------------------------------------------------
# What the HPC keeps: simulation starts and exit-status records
# ---------------------------------------------------------------------------------------------

def recording_starts(remote_command: str, starts_log: Path) -> str:
    """``remote_command`` that first appends the case id to ``starts_log`` (one line per start)."""
    log = shlex.quote(str(starts_log)).replace("{", "{{").replace("}", "}}")
    return f"echo {{case_id}} >> {log} && {remote_command}"


def read_starts(starts_log: Path) -> dict[int, int]:
    """case id -> how many times its simulation was started (see ``recording_starts``)."""
    try:
        lines = starts_log.read_text().split()
    except FileNotFoundError:
        return {}
    return dict(Counter(int(word) for word in lines if word.isdigit()))


def exit_status_record(remote_dir: str | None) -> int | None:
    """The exit code the wrapper recorded in the case's remote folder, or None (no record)."""
    if not remote_dir:
        return None
    try:
        words = (Path(remote_dir) / EXIT_STATUS_RECORD).read_text().split()
    except OSError:
        return None
    return int(words[0]) if words and words[0].lstrip("-").isdigit() else None


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------

def check_final_state(db_path: Path, spool_root: Path, watch_path: Path, status_json: str | Mapping[str, str],
                      expected: Expected, groups: tuple[str, ...] = ()) -> Verdict:
    """Check every invariant of a finished run; each broken one is a line in ``violations``.

    ``status_json``: the final ``pueue status --json`` of the one host, or {host name: its
    answer} with several hosts; then each case is judged by the snapshot of the host it is on
    (``cases.host``), remote tasks per label are counted over every host, and orphan tasks and
    paused groups are looked for on each.

    Every dropped case has exactly one row, final, its folder in the right stage; its
    simulation started once (once more per kill we did not send); at most as many remote tasks
    per label; a completed case's task succeeded (or, its task cleaned away, its exit-status
    record says 0); a failure only for its true reason (mode=fail: ``failed`` exit 1 with the
    simulator's FATAL ERROR line; a long case: ``timed_out``) and never while the HPC could not
    be reached; another user's tasks ran to their natural end; no slot busy; every event chain
    a path through the ALLOWED tables; nothing left in the drop, staging or rejected folders,
    nor a stray folder in a stage; ``PRAGMA integrity_check`` ok.
    """
    from shared.db import connect

    verdict = Verdict()
    conn = connect(db_path, readonly=True)
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM cases ORDER BY case_id")]
        events = _events_by_case(conn)
        _check_integrity(conn, verdict)
        _check_slots(conn, verdict)
        _check_slot_chains(conn, verdict)
    finally:
        conn.close()
    snapshots = parse_snapshots(status_json)
    _check_rows_against_drops(rows, expected, verdict)
    for key in ("run_twice", "duplicate_tasks", "wrongly_failed", "wrongly_completed", "failed_while_unreachable",
                "orphan_tasks", "paused_groups"):
        verdict.add(key, None, 0)
    for row in rows:
        _check_case(row, events.get(row["case_id"], []), snapshots, expected, spool_root, verdict)
    for host, snapshot in snapshots.items():
        _check_orphan_tasks(rows, snapshot, host, verdict)
        _check_groups_running(groups_of(status_json, host), groups, host, verdict)
    check_foreign_tasks(snapshot_of(snapshots, expected.foreign_host), expected, verdict)
    _check_folders(rows, spool_root, watch_path, verdict)
    return verdict


def parse_snapshots(status_json: str | Mapping[str, str]) -> dict[str | None, object]:
    """{host name: its snapshot}; one answer (the one-host call) is filed under None, for every case."""
    from shared.backends import pueue_parse
    if isinstance(status_json, str):
        return {None: pueue_parse.parse_status(status_json)}
    return {host: pueue_parse.parse_status(text) for host, text in status_json.items()}


def groups_of(status_json: str | Mapping[str, str], host: str | None) -> dict:
    """The pueue groups in the final ``status --json`` of ``host`` (of the one host: None)."""
    from shared.backends import pueue_parse
    return pueue_parse.parse_status_groups(status_json if isinstance(status_json, str) else status_json[host])


def snapshot_of(snapshots: Mapping[str | None, object], host: str | None):
    """The snapshot of ``host`` (the only one, in a one-host call; an empty one for a host never used)."""
    from shared.backends.model import Snapshot
    if None in snapshots:
        return snapshots[None]
    return snapshots.get(host) or Snapshot(tasks={})


def tasks_by_label(snapshots: Mapping[str | None, object], label: str) -> list:
    """The tasks carrying ``label`` on every host."""
    return [task for snapshot in snapshots.values() for task in snapshot.by_label(label)]


def _events_by_case(conn) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for row in conn.execute("SELECT * FROM case_events ORDER BY event_id"):
        grouped.setdefault(row["case_id"], []).append(dict(row))
    return grouped


def _check_integrity(conn, verdict: Verdict) -> None:
    result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    verdict.add("integrity_errors", None, 0)
    if result != ["ok"]:
        verdict.add("integrity_errors", f"PRAGMA integrity_check: {result[:3]}")


def _check_slots(conn, verdict: Verdict) -> None:
    verdict.add("busy_slots", None, 0)
    for row in conn.execute("SELECT * FROM gpu_resources WHERE status != 'available'"):
        verdict.add("busy_slots", f"slot {seat_name(row)} left {row['status']} (case {row['assigned_case_id']})")


def seat_name(row) -> str:
    """``host/group`` (``#seat`` past the first), as ``shared.seats.Slot.name`` says it."""
    return f"{row['host']}/{row['pueue_group']}" + (f"#{row['seat']}" if row["seat"] else "")


def chain_problems(moves: list[tuple[str | None, str]], allowed: dict, final: str | None) -> list[str]:
    """Why a list of (from, to) events is not a valid path through ``allowed`` ending at ``final``.

    ``allowed`` is one of the tables of ``shared.states``. The first move must come from
    nothing; a move to the same status (a review flag) is allowed anywhere.
    """
    table = {str(frm.value): {str(to.value) for to in tos} for frm, tos in allowed.items()}
    problems, current = [], None
    for index, (frm, to) in enumerate(moves):
        if frm != current:
            problems.append(f"event {index}: from {frm} but the status was {current}")
        elif frm is not None and to != frm and to not in table[frm]:
            problems.append(f"event {index}: {frm} -> {to} is not allowed")
        current = to
    if final is not None and current != final:
        problems.append(f"events end at {current} but the row says {final}")
    return problems


def _check_slot_chains(conn, verdict: Verdict) -> None:
    from shared.states import SLOT_ALLOWED
    verdict.add("bad_event_chains", None, 0)
    slots = {seat_name(r): r["status"] for r in conn.execute("SELECT * FROM gpu_resources")}
    moves: dict[str, list] = {}
    for row in conn.execute("SELECT * FROM slot_events ORDER BY event_id"):
        moves.setdefault(seat_name(row), []).append((row["from_status"], row["to_status"]))
    for seat, chain in moves.items():
        for problem in chain_problems(chain, SLOT_ALLOWED, slots.get(seat)):
            verdict.add("bad_event_chains", f"slot {seat}: {problem}")


def _check_rows_against_drops(rows: list[dict], expected: Expected, verdict: Verdict) -> None:
    names = [row["case_name"] for row in rows]
    verdict.add("cases", None, len(expected.modes))
    for name in expected.modes:
        if names.count(name) == 0:
            verdict.add("lost", f"case {name!r} was dropped but has no row")
        elif names.count(name) > 1:
            verdict.add("duplicates", f"case {name!r} registered {names.count(name)} times")
    for name in sorted(set(names) - set(expected.modes)):
        verdict.add("duplicates", f"row for {name!r} that nobody dropped")
    verdict.add("lost", None, 0)
    verdict.add("duplicates", None, 0)


def _check_case(row: dict, events: list[dict], snapshots: Mapping, expected: Expected, spool_root: Path,
                verdict: Verdict) -> None:
    from shared.states import ALLOWED
    case = f"case {row['case_id']} ({row['case_name']!r})"
    _check_starts(row, case, expected, verdict)
    if row["status"] not in ("completed", "failed"):
        verdict.add("lost", f"{case} never finished: {row['status']}")
        return
    verdict.add(row["status"])
    if None not in snapshots:
        verdict.add(f"{row['status']}_on:{row['host']}")
    for problem in chain_problems([(e["from_status"], e["to_status"]) for e in events], ALLOWED, row["status"]):
        verdict.add("bad_event_chains", f"{case}: {problem}")
    if row["needs_review"]:
        verdict.add("flagged_for_review", f"{case} flagged for review: {row['review_reason']}")
    _check_stage(row, case, spool_root, verdict)
    label = f"mqic_case_{row['case_id']}"
    _check_tasks(row, case, tasks_by_label(snapshots, label), snapshot_of(snapshots, row["host"]).by_label(label),
                 expected, verdict)
    _check_true_reason(row, case, expected, verdict)
    _check_not_failed_while_unreachable(case, events, expected.outages_of(row["host"]), verdict)


def allowed_runs(label: str, expected: Expected) -> int:
    """Once, and once more after each kill by a signal we did not send."""
    return 1 + expected.victims.get(label, 0)


def _check_starts(row: dict, case: str, expected: Expected, verdict: Verdict) -> None:
    if expected.starts is None:
        return
    starts, allowed = expected.starts.get(row["case_id"], 0), allowed_runs(f"mqic_case_{row['case_id']}", expected)
    if starts > allowed:
        verdict.add("run_twice", f"{case}: its simulation started {starts} times on the HPC, allowed {allowed} "
                                 f"(once, plus once per kill we did not send)")
    elif starts > 1:
        verdict.add("rerun_after_a_foreign_kill")


def _check_stage(row: dict, case: str, spool_root: Path, verdict: Verdict) -> None:
    stage = "done" if row["status"] == "completed" else "failed"
    path = Path(row["case_path"])
    if row["spool_stage"] != stage or path.parent != spool_root / stage or not path.is_dir():
        verdict.add("misplaced", f"{case} is {row['status']} but its folder is {path} "
                                 f"(stage {row['spool_stage']}, exists: {path.is_dir()})")
    elif row["status"] == "completed" and not any((path / RESULT_DIR).glob("*")):
        verdict.add("results_lost", f"{case} completed but {path / RESULT_DIR} holds no results")


def _check_tasks(row: dict, case: str, everywhere: list, here: list, expected: Expected, verdict: Verdict) -> None:
    """``everywhere``: the tasks carrying the case's label on every host; ``here``: on its own host."""
    allowed = allowed_runs(f"mqic_case_{row['case_id']}", expected)
    if len(everywhere) > allowed:
        where = f" ({len(here)} on its host {row['host']})" if len(everywhere) != len(here) else ""
        verdict.add("duplicate_tasks", f"{case} has {len(everywhere)} remote tasks {[t.id for t in everywhere]}"
                                       f"{where}, allowed {allowed}")
    if row["status"] != "completed":
        return
    recorded = [t for t in here if t.id == row["pueue_task_id"]]
    if recorded and recorded[0].state.value == "success":
        return
    if not recorded and expected.cleaned.get(f"mqic_case_{row['case_id']}", {}).get(row["pueue_task_id"]) == "success":
        verdict.add("completed_task_cleaned_later")  # it had succeeded when another user cleaned it away
        return
    if not recorded and exit_status_record(row["remote_dir"]) == 0:
        verdict.add("completed_from_the_record")  # its task was cleaned away; the wrapper's record says 0
        return
    state = recorded[0].state.value if recorded else "gone, and no exit-status record says 0"
    verdict.add("wrongly_completed", f"{case} completed but task {row['pueue_task_id']} is {state}")


def _check_true_reason(row: dict, case: str, expected: Expected, verdict: Verdict) -> None:
    mode = expected.modes.get(row["case_name"], "ok")
    label = f"mqic_case_{row['case_id']}"
    long_case = row["case_name"] in expected.long_cases
    if row["status"] == "completed":
        if mode == "fail":
            verdict.add("wrongly_completed", f"{case} was set to fail but completed")
        verdict.add("victims_completed", None, int(label in expected.victims))
        verdict.add("long_cases_completed", None, int(long_case))
        return
    if mode == "fail" and row["outcome"] == "failed" and row["exit_code"] == 1:
        verdict.add("failed_as_designed")
        _check_log_tail(row, case, label in expected.cleaned, verdict)
    elif long_case and row["outcome"] == "timed_out":
        verdict.add("timed_out_as_designed")
    else:
        why = (" (killed by a signal we did not send: it should have been requeued)"
               if label in expected.victims and row["outcome"] == "killed" else "")
        verdict.add("wrongly_failed", f"{case} (mode {mode}{', long' if long_case else ''}) failed with outcome "
                                      f"{row['outcome']}{why}: {row['error_type']}: "
                                      f"{(row['error_message'] or '')[:200]}")


def _check_log_tail(row: dict, case: str, cleaned: bool, verdict: Verdict) -> None:
    if "FATAL ERROR" in (row["log_tail"] or ""):
        return
    if cleaned:  # another user's clean deleted pueue's log with the task
        verdict.add("log_tail_gone_with_a_cleaned_task")
        return
    verdict.add("log_tail_lost", f"{case} failed as designed but its log tail lacks the simulator's "
                                 f"FATAL ERROR line: {row['log_tail']!r}")


def _check_not_failed_while_unreachable(case: str, events: list[dict], outages: tuple[tuple[float, float], ...],
                                        verdict: Verdict) -> None:
    for event in events:
        if event["to_status"] != "failed":
            continue
        for begin, end in outages:
            if begin + UNREACHABLE_MARGIN_S < event["at"] < end:
                verdict.add("failed_while_unreachable",
                            f"{case} was failed {event['at'] - begin:.1f} s into an outage that lasted "
                            f"{end - begin:.1f} s (nothing could reach the HPC): {event['detail'][:160]}")


def _check_orphan_tasks(rows: list[dict], snapshot, host: str | None, verdict: Verdict) -> None:
    """No task on ``host`` carries a label no case has; with several hosts, none left unfinished
    on a host other than its case's (the reaper stops those)."""
    cases = {f"mqic_case_{row['case_id']}": row for row in rows}
    on = f" on {host}" if host else ""
    for task in snapshot.tasks.values():
        if not (task.label and task.label.startswith("mqic_case_")):
            continue
        row = cases.get(task.label)
        if row is None:
            verdict.add("orphan_tasks", f"remote task {task.id}{on} carries {task.label}, which no case has")
        elif host is not None and row["host"] != host and not task.state.is_done:
            verdict.add("orphan_tasks", f"remote task {task.id}{on} of case {row['case_id']} is "
                                        f"{task.state.value}, but the case is on {row['host']}")


def check_foreign_tasks(snapshot, expected: Expected, verdict: Verdict) -> None:
    """Another user's tasks (``expected.foreign``) must still be in ``snapshot`` under their own
    command, and have run to their natural end (``sleep N; exit 0``: Success) or still be
    waiting or running; one our own chaos killed (``foreign_excused``) is excused."""
    verdict.add("foreign_touched", None, 0)
    for task_id, command in sorted(expected.foreign.items()):
        task = snapshot.tasks.get(task_id)
        if task is None or task.command != command:
            now = "gone" if task is None else f"now {task.label or 'unlabelled'} ({task.command[:60]!r})"
            verdict.add("foreign_touched", f"another user's task {task_id} ({command!r}) was removed: id {now}")
        elif task_id in expected.foreign_excused or task.state.value == "success" or not task.state.is_done:
            verdict.add("foreign_untouched")
        else:
            verdict.add("foreign_touched", f"another user's task {task_id} ({command!r}) ended {task.state.value}"
                                           f"{f' {task.exit_code}' if task.exit_code is not None else ''}: "
                                           "someone killed it")


def _check_groups_running(known: Mapping[str, object], groups: tuple[str, ...], host: str | None,
                          verdict: Verdict) -> None:
    for group in groups:
        info = known.get(group)
        if info is None or info.paused:
            verdict.add("paused_groups", f"pueue group {group}{f' on {host}' if host else ''} is "
                                         f"{info and info.status} at the end")


def _check_folders(rows: list[dict], spool_root: Path, watch_path: Path, verdict: Verdict) -> None:
    owned = {row["case_path"] for row in rows}
    verdict.add("stray_folders", None, 0)
    verdict.add("results_lost", None, 0)
    verdict.add("log_tail_lost", None, 0)
    for stage in SPOOL_STAGES:
        for entry in sorted((spool_root / stage).iterdir()):
            if str(entry) not in owned:
                verdict.add("stray_folders", f"{entry} belongs to no case")
    for where in (spool_root / "rejected", spool_root / ".staging", watch_path):
        leftovers = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
        if leftovers:
            verdict.add("stray_folders", f"{where} is not empty: {leftovers[:5]}")
