"""``mqic``: the operator's command line.

Reading commands (``status``, ``cases``, ``show``, ``health``, ``cleanup --dry-run``)
open the database read-only. Commands that change a case (``retry``, ``cancel``,
``ack``, ``priority``) go through ``shared.actions`` and ``shared.priority``, which use
the same guarded moves as the workers, so they never race a worker into an
inconsistent row; ``drain``/``resume`` and ``cleanup`` call ``shared.maintenance`` and
``shared.retention``. Every error is one line on stderr: exit 2 for a bad config, 1
for anything else.
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from console import service
from console.top import (console_width, format_age, format_time, freshness, gpu_memory, gpus_table, host_lines,
                         slots_table, totals_line, upkeep_line)
from shared import actions, gpus, maintenance, queries, retention, share, tasks, verdicts, version
from shared.backends import backend_for, model, scheduler_of
from shared.app import EXIT_CONFIG, config_argument, load_or_exit
from shared.checks import Check, attempt, one_line, setting
from shared.config import Config, HostConfig, default_config_path, load_config
from shared.db import connect
from shared.doorbell import ring
from shared.eta import Eta, estimate
from shared.errors import ConfigError, HostKeyMismatch, MqicError, RemoteFailure
from shared.priority import PRIORITIES, PriorityRefused, set_priority
from shared.remote import Remote, TransferUnsupported, UnsafeControlDir, ensure_private_dir, presented_host_keys
from shared.spool import Spool
from shared.states import Outcome
from shared.store import Case, get_case
from shared.worker import Context, connect_hosts

PROGRAM = "mqic"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KEEP = 14
BACKUP_NAME = re.compile(r"^backup_(\d{8})(?:_(\d{6}))?(?:_(\d+))?\.db$")
PROBE_SCRIPT = 'probe="$1/.mqic-doctor-probe-$$" && touch -- "$probe" && rm -f -- "$probe"'
DOCTOR_CASE_ID = 0  # real case ids start at 1, so the probe upload's temporaries touch no case


class CliError(MqicError):
    """A refused or failed command: printed as one line, exit code 1."""


def operator() -> str:
    """Who the event history names for a command run by hand."""
    try:
        return f"mqic-cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment: still record the tool
        return "mqic-cli"


def out() -> Console:
    return Console(width=console_width(), highlight=False, soft_wrap=False)


def print_json(value: Any) -> None:
    print(json.dumps(queries.to_jsonable(value), indent=2, ensure_ascii=False))


def open_db(config: Config, *, write: bool = False) -> sqlite3.Connection:
    """The state database: read-only unless ``write``; CliError when it does not exist."""
    path = Path(config.database_path)
    if not path.exists():
        raise CliError(f"database {path} not found (the workers create it when they start)")
    return connect(path) if write else connect(path, readonly=True)


def existing_case(conn: sqlite3.Connection, case_id: int) -> Case:
    case = get_case(conn, case_id)
    if case is None:
        raise CliError(f"case {case_id} not found")
    return case


# -- status, cases, health ------------------------------------------------------------------------

def read_overview(config: Config) -> queries.Overview:
    conn = open_db(config)
    try:
        return queries.overview(conn, time.time(), config.unhealthy_after_seconds, recent=0, flags=0,
                                configured=config.hosts)
    finally:
        conn.close()


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    """Totals, every host (backend, reachable, drained, seats), every seat and the health summary."""
    view = read_overview(config)
    if args.json:
        print_json({"totals": view.totals, "hosts": view.hosts, "slots": view.slots, "workers": view.workers,
                    "last_change": view.last_change, "health": view.health,
                    "upkeep": view.upkeep, "drained": view.upkeep.drained, "gpus": view.gpus})
        return 0
    console = out()
    for alert in queries.host_key_alerts(view.hosts):  # a security event goes first
        console.print(alert, style="bold red")
    console.print(totals_line(view))
    upkeep = upkeep_line(view, config.tz)
    if upkeep is not None:
        console.print(upkeep)
    console.print(host_lines(view, config.tz))
    console.print(slots_table(view, config.tz))
    if view.gpus:
        console.print(gpus_table(view, config.gpus.interval_seconds))
    console.print(freshness(view, config.tz))
    return 0


def cmd_cases(config: Config, args: argparse.Namespace) -> int:
    """The newest cases, optionally of one status."""
    conn = open_db(config)
    try:
        cases = queries.list_cases(conn, args.status, max(1, args.limit))
    finally:
        conn.close()
    if args.json:
        print_json(cases)
        return 0
    if not cases:
        print("no cases" + (f" with status {args.status}" if args.status else ""))
    else:
        print("\n".join(cases_lines(cases, time.time())))
    return 0


CASES_HEADER = (f"{'ID':>7}  {'STATUS':<10}  {'PRIO':<6}  {'DONE':>4}  {'HOST':<8}  {'GROUP':<8}  {'TASK':>5}"
                f"  {'FAILS':>5}  {'UPDATED':>7}  NAME")


def case_note(case: queries.CaseView) -> str:
    """The bracketed note of a listing line: review flag, outcome, delivery."""
    notes = [f"REVIEW: {case.review_reason}"] if case.needs_review else ([case.outcome] if case.outcome else [])
    if case.delivery_error:
        notes.append(f"DELIVERY FAILING: {case.delivery_error}")
    elif case.delivered_at is not None:
        notes.append("delivered")
    return "; ".join(notes)


def cases_lines(cases: list[queries.CaseView], now: float) -> list[str]:
    """Plain aligned lines (greppable; long names and notes go last)."""
    lines = [CASES_HEADER]
    for case in cases:
        note = case_note(case)
        task = "-" if case.task_id is None else str(case.task_id)
        lines.append(f"{case.case_id:>7}  {case.status:<10}  {case.priority:<6}  {case.progress:>3.0f}%"
                     f"  {case.host or '-':<8}  {case.slot or '-':<8}  {task:>5}  {case.attempts:>5}"
                     f"  {format_age(now - case.updated_at):>7}  {case.case_name}" + (f"  [{note}]" if note else ""))
    return lines


def cmd_health(config: Config, args: argparse.Namespace) -> int:
    """Exit 0 when healthy; 1 with the reasons (stale heartbeats, no progress, integrity)."""
    try:
        conn = open_db(config)
    except CliError as exc:
        return report_health(args, False, [str(exc)])
    try:
        view = queries.overview(conn, time.time(), config.unhealthy_after_seconds, recent=0, flags=0,
                                configured=config.hosts)
        damage = queries.quick_check(conn)
    finally:
        conn.close()
    reasons = list(view.health.reasons) + ([f"database integrity: {damage}"] if damage else [])
    return report_health(args, not reasons, reasons, host_notes(view, config), view.hosts)


def host_notes(view: queries.Overview, config: Config) -> list[str]:
    """A note per drained host and per host last seen unreachable."""
    notes = []
    for host in view.hosts:
        drain, remote = host.drain, host.remote
        if drain is not None:
            notes.append(f"host {host.name} drained since {format_time(drain.since, config.tz)} by {drain.drained_by}"
                         + (f" ({drain.reason})" if drain.reason else "") + ": no new claims there")
        if remote.reachable is False and not remote.key_refused:  # a refused key is a reason, not a note
            since = remote.down_since if remote.down_since is not None else remote.checked_at
            notes.append(f"host {host.name} unreachable since {format_time(since, config.tz)}"
                         f" ({format_age(view.now - since)}): no new claims there until it answers")
    return notes


def report_health(args: argparse.Namespace, healthy: bool, reasons: list[str], notes: list[str] = (),
                  hosts: Sequence[queries.HostView] = ()) -> int:
    """``notes`` (a drained or unreachable host) are shown but do not make the system unhealthy:
    maintenance is deliberate, and an outage shows as cases that stop moving."""
    if args.json:
        print_json(queries.health_record(reasons, notes, hosts))
    else:
        print(("healthy" if healthy else "unhealthy: " + "; ".join(reasons))
              + (f" ({'; '.join(notes)})" if notes else ""))
    return 0 if healthy else 1


# -- show -----------------------------------------------------------------------------------------

def remote_task(config: Config, case: Case) -> dict[str, Any]:
    """The case's remote task (pueue task or Slurm job) as its host reports it now, or ``{"error": ...}``."""
    host = config.host(case.host)
    if host is None:
        return {"error": f"host {case.host!r} of the case is not configured, so its task cannot be looked up"}
    remote = Remote(host.hpc)
    try:
        snapshot = backend_for(config, host, remote).snapshot()
    except (RemoteFailure, OSError) as exc:
        return {"error": f"host {host.name} unreachable or {host.backend} failed ({one_line(exc)})"}
    task = tasks.task_of(case, snapshot)
    if task is None:
        return {"error": f"no {host.backend} task {case.task_id} with label {case.label} on host {host.name}"}
    return {"host": host.name, "task_id": task.id, "state": task.state.value, "exit_code": task.exit_code,
            "group": task.group, "label": task.label, "path": task.path,
            "start": task.start.isoformat() if task.start else None,
            "end": task.end.isoformat() if task.end else None,
            "verdict": verdict_record(config, case, snapshot)}


def verdict_record(config: Config, case: Case, snapshot: model.Snapshot) -> dict[str, Any]:
    """The row of the verdict table (``shared.verdicts``) for what became of the case's task:
    what the poller does with it while the case is running."""
    link = tasks.resolve(case, snapshot)
    overdue = tasks.overdue(link, snapshot, config.main_loop.running_case_timeout_hours * 3600)
    ruling = verdicts.verdict_for(link, verdicts.Phase.RUNNING, by_us=verdicts.killed_by_us(case.outcome),
                                  overdue=overdue)
    return {"action": ruling.action.value, "outcome": ruling.outcome and ruling.outcome.value,
            "uses_attempt": ruling.uses_attempt, "why": ruling.why}


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    """One case: its row, every event, and the remote task when there is one."""
    conn = open_db(config)
    try:
        with queries.read_snapshot(conn):
            case = existing_case(conn, args.case_id)
            events = queries.events_of(conn, case.case_id)
            eta = estimate(conn, config, time.time()).get(case.case_id)
            case_gpus = gpus.gpus_of_case(conn, case, gpus.gpu_views(conn, case.host)) \
                if case.status.value == "running" else []
    finally:
        conn.close()
    remote = remote_task(config, case) if case.task_id is not None else None
    if args.json:
        print_json({"case": case, "events": events, "remote": remote, "eta": eta, "gpus": case_gpus})
        return 0
    print_case(config, case, events, remote, eta)
    print_case_gpus(config, case_gpus)
    return 0


def print_case_gpus(config: Config, views: list) -> None:
    """The running case's GPU(s) as nvidia-smi last saw them."""
    now = time.time()
    for gpu in views:
        if not gpu.answering:
            print(f"gpu: {gpu.host} GPU {gpu.index} NOT ANSWERING ({gpu.error})")
            continue
        util = "-" if gpu.utilization is None else f"{gpu.utilization:.0f}%"
        temp = "-" if gpu.temperature is None else f"{gpu.temperature:.0f}C"
        stale = " STALE" if gpu.stale(now, config.gpus.interval_seconds) else ""
        foreign = f", someone else's process ({gpu.foreign_processes})" if gpu.foreign_processes else ""
        print(f"gpu: {gpu.host} GPU {gpu.index}: utilization {util}, memory {gpu_memory(gpu)}, {temp}{foreign}"
              f" (read {format_age(gpu.age(now))} ago{stale})")


TIME_FIELDS = ("submitted_at", "status_updated_at", "started_at", "completed_at", "next_attempt_at",
               "lease_until", "delivered_at", "next_delivery_at", "acknowledged_at", "remote_removed_at",
               "local_removed_at", "running_since", "add_uncertain_until", "stop_requested_at", "staged_at")


def eta_line(case: Case, eta: Eta | None, now: float, config: Config) -> str | None:
    """``ends 2026-12-07 14:32:10 KST (in 5m12s); <basis>`` for an unfinished case; None for a final one."""
    if case.status.value in ("completed", "failed"):
        return None
    if eta is None:
        return "no estimate: no host takes new cases now (drained or unreachable)"
    what = "ends" if eta.kind == "finish" else "starts about"
    return f"{what} {format_time(eta.at, config.tz, full=True)} (in {format_age(eta.at - now)}); {eta.basis}"


def print_case(config: Config, case: Case, events: list[dict], remote: dict | None, eta: Eta | None = None) -> None:
    tz = config.tz
    record = queries.case_record(case)
    long_text = {"log_tail", "error_message", "result_checksums"}
    for key, value in record.items():
        if value is None or value == "" or key in long_text:
            continue
        print(f"{key:>18}: {format_time(value, tz, full=True) if key in TIME_FIELDS else value}")
    estimated = eta_line(case, eta, time.time(), config)
    if estimated is not None:
        print(f"{'eta':>18}: {estimated}")
    if case.result_checksums:
        print(f"{'result_checksums':>18}: recorded for {len(json.loads(case.result_checksums))} fetched files"
              f" (`mqic show {case.case_id} --json` lists them)")
    if case.error_message:
        print(f"{'error_message':>18}: {case.error_message}")
    print("events:")
    for event in events:
        print(f"  {format_time(event['at'], tz)}  {event['from_status'] or '-':>10} -> {event['to_status']:<10}"
              f"  {event['worker']}  {event['detail']}")
    if remote is None:
        print("remote: no remote task recorded yet")
    elif "error" in remote:
        print(f"remote: {remote['error']}; local data shown above")
    else:
        print(f"remote: task {remote['task_id']} {remote['state']} in group {remote['group']} on host {remote['host']}"
              + (f" (exit code {remote['exit_code']})" if remote["exit_code"] is not None else ""))
        ruling = remote["verdict"]
        print(f"verdict: {ruling['action']}" + (f" ({ruling['outcome']})" if ruling["outcome"] else "")
              + (", an attempt used" if ruling["uses_attempt"] else "") + f": {ruling['why']}"
              + ("" if case.status.value == "running" else f" (the case is {case.status.value}; the poller acts only on running cases)"))
    if case.log_tail:
        print("log tail:\n" + case.log_tail.rstrip())


# -- retry, cancel, ack ---------------------------------------------------------------------------

def operator_on(config: Config) -> tuple[sqlite3.Connection, actions.Operator]:
    conn = open_db(config, write=True)
    return conn, actions.Operator(conn, config, operator())


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    """failed -> submitted with a fresh attempt count; one case, or every failed one (of an outcome)."""
    if (args.case_id is None) == (not (args.all_failed or args.outcome)):
        raise CliError("give one case id, or --all-failed / --outcome OUTCOME")
    conn, op = operator_on(config)
    try:
        ids = [args.case_id] if args.case_id is not None else actions.failed_case_ids(conn, args.outcome)
        results = actions.retry(op, ids, now=time.time())
    except actions.Refused as exc:
        raise CliError(str(exc)) from None
    finally:
        conn.close()
    refused = [case_id for case_id, text in results if text.startswith("refused")]
    if args.case_id is not None and refused:
        raise CliError(results[0][1].removeprefix("refused: "))
    if len(refused) < len(results):
        ring(Spool(config.spool_path).root, "submitter")
    for case_id, text in results:
        print(f"case {case_id}: {text}")
    if not results:
        print("no failed case matches")
    return 1 if refused else 0


def cmd_cancel(config: Config, args: argparse.Namespace) -> int:
    """A running or submitted case becomes failed (``cancelled``); a running task gets SIGTERM."""
    conn, op = operator_on(config)
    try:
        case, stopped = actions.cancel(op, args.case_id, now=time.time())
    except actions.Refused as exc:
        raise CliError(str(exc)) from None
    finally:
        conn.close()
    ring(Spool(config.spool_path).root, "reaper")
    print(f"case {case.case_id}: {case.status.value} -> failed (cancelled); {stopped}")
    return 0


def cmd_ack(config: Config, args: argparse.Namespace) -> int:
    """Clear a case's review flag; for a failed case, also record that its failure was seen."""
    conn, op = operator_on(config)
    try:
        case, cleared, acknowledged = actions.acknowledge(op, args.case_id, now=time.time())
    except actions.Refused as exc:
        raise CliError(str(exc)) from None
    finally:
        conn.close()
    if cleared:
        print(f"case {case.case_id}: review flag cleared ({case.review_reason})")
    if acknowledged:
        print(f"case {case.case_id}: failure acknowledged; retention may now remove its remote folder")
    return 0


# -- priority, drain, resume, cleanup -------------------------------------------------------------

def cmd_priority(config: Config, args: argparse.Namespace) -> int:
    """Make a waiting (or failed) case urgent or normal."""
    conn = open_db(config, write=True)
    try:
        before = existing_case(conn, args.case_id)
        try:
            case = set_priority(conn, before.case_id, args.priority, now=time.time(), worker=operator())
        except PriorityRefused as exc:
            raise CliError(str(exc)) from None
    finally:
        conn.close()
    print(f"case {case.case_id}: priority {case.priority} (was {before.priority})")
    return 0


def host_argument(config: Config, args: argparse.Namespace) -> str:
    """The configured host ``mqic drain/resume [HOST]`` (or ``--host HOST``) names."""
    if args.host and args.host_option and args.host != args.host_option:
        raise CliError(f"two hosts given ({args.host}, --host {args.host_option}); name one")
    return maintenance.check_host(config, args.host or args.host_option)


def cmd_drain(config: Config, args: argparse.Namespace) -> int:
    """Stop new claims on a host; its running cases finish, waiting ones go to other hosts or wait."""
    host = host_argument(config, args)
    conn = open_db(config, write=True)
    try:
        new = maintenance.drain(conn, host, now=time.time(), by=operator(), reason=args.reason or "")
        current = next(d for d in maintenance.drains(conn) if d.host == host)
        in_flight = queries.in_flight_on(conn, host)
        waiting = queries.status_totals(conn)["submitted"]
    finally:
        conn.close()
    state = "drained" if new else "already drained"
    elsewhere = "go to the other hosts or wait" if len(config.hosts) > 1 else "wait"
    print(f"{host}: {state} since {format_time(current.since, config.tz)} by {current.drained_by}; no new claims"
          f" there. {in_flight} cases in flight there finish, {waiting} waiting cases {elsewhere}."
          f" `mqic resume {host}` starts claims there again.")
    return 0


def cmd_resume(config: Config, args: argparse.Namespace) -> int:
    """Allow claims on a drained host again and wake the submitter."""
    host = host_argument(config, args)
    conn = open_db(config, write=True)
    try:
        ended = maintenance.resume(conn, host)
    finally:
        conn.close()
    if ended is None:
        print(f"{host}: was not drained; nothing to resume")
        return 0
    ring(Spool(config.spool_path).ensure().root, "submitter")
    print(f"{host}: resumed (drained since {format_time(ended.since, config.tz)} by {ended.drained_by})")
    return 0


def cmd_cleanup(config: Config, args: argparse.Namespace) -> int:
    """Apply the retention rules now (or, with --dry-run, only show what they say)."""
    if config.retention.remote_days is None and config.retention.local_days is None:
        print("retention.remote_days and retention.local_days are not set: nothing is ever cleaned up")
        return 0
    conn = open_db(config, write=not args.dry_run)
    try:
        ctx = Context(config=config, conn=conn, spool=Spool(config.spool_path).ensure(),
                      hosts=connect_hosts(config), name=operator(), log=logging.getLogger("mqic.cli"))
        verdicts = retention.cleanup(ctx, time.time(), dry_run=args.dry_run)
    finally:
        conn.close()
    for verdict in verdicts:
        print(verdict.line())
    removing = [v for v in verdicts if v.remove]
    failed = [v for v in removing if v.done.startswith("FAILED")]
    verb = "would be removed" if args.dry_run else "removed"
    print(f"{len(removing) - len(failed)} folders {verb}, {len(verdicts) - len(removing)} kept"
          + (f", {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


# -- doctor ---------------------------------------------------------------------------------------

MIN_QUIET_SECONDS = 30


def check_readiness(config: Config) -> Check:
    """Copies over SMB can pause longer than a short quiet period: want a marker or >= 30 s."""
    scanner = config.scanner
    if scanner.ready_marker:
        return Check("readiness", True, f"a folder is taken once {scanner.ready_marker} exists"
                                        f" (or after {scanner.quiescence_period_seconds:g} s without change)")
    if scanner.quiescence_period_seconds >= MIN_QUIET_SECONDS:
        return Check("readiness", True, f"a folder is taken after {scanner.quiescence_period_seconds:g} s"
                                        f" without change")
    return Check("readiness", True, f"no scanner.ready_marker and a quiet period of only"
                 f" {scanner.quiescence_period_seconds:g} s: a slow or paused copy (SMB) can be taken half-done",
                 f"have the planning side write a ready marker last and set scanner.ready_marker (README:"
                 f" \"Readiness\"), or set scanner.quiescence_period_seconds to {MIN_QUIET_SECONDS} or more", warn=True)


def check_notify(config: Config) -> Check | None:
    command = config.notify.command
    if not command:
        return None
    found = shutil.which(command[0])
    if found is None:
        return Check("notify.command", False, f"{command[0]} not found", "install it or give its full path")
    return Check("notify.command", True, f"{found} (timeout {config.notify.timeout_seconds:g} s)")


def check_delivery(config: Config) -> Check | None:
    target = config.results.deliver_to
    if target is None:
        return None
    request = {**share.share_request(config), "clean": False}
    try:  # in a child with a time limit, like every access to the share
        answer = share.run_on_share("probe", request, timeout=config.results.share_timeout_seconds)
    except share.ShareNotAnswering as exc:
        return Check("results.deliver_to", False, str(exc), "check the share's server and the mount")
    except (share.ShareProblem, share.ShareWriteError) as exc:
        return Check("results.deliver_to", False, str(exc), "mount the share (or create the folder and "
                     "set results.expect_mount: false, or create the results.share_marker file in it)")
    if not answer["writable"]:
        return Check("results.deliver_to", False, f"{target} is not writable", f"let this user write to {target}")
    proof = (f"holds {config.results.share_marker}" if config.results.share_marker else
             "is a mount point" if config.results.expect_mount else "is a folder (expect_mount: false)")
    return Check("results.deliver_to", True, f"{target} {proof} and is writable")


def check_identity(host: HostConfig) -> Check:
    path = host.hpc.identity_file
    if not path.is_file():
        return Check("identity_file", False, f"{path} does not exist",
                     f"ssh-keygen -t ed25519 -f {path} -N '' and add {path}.pub to the HPC's authorized_keys",
                     host=host.name)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Check("identity_file", False, f"{path} has mode {mode:o} (readable by others)", f"chmod 600 {path}",
                     host=host.name)
    return Check("identity_file", True, f"{path} (mode {mode:o})", host=host.name)


def known_host_name(host: HostConfig) -> str:
    return host.hpc.host if host.hpc.port == 22 else f"[{host.hpc.host}]:{host.hpc.port}"


def check_known_hosts(host: HostConfig) -> Check:
    path, name = host.hpc.known_hosts_file, known_host_name(host)
    scan = f"ssh-keyscan -p {host.hpc.port} {host.hpc.host} >> {path} (compare the fingerprint first)"
    if not path.is_file():
        return Check("known_hosts", False, f"{path} does not exist", scan, host=host.name)
    try:
        found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("known_hosts", False, f"cannot run ssh-keygen -F: {one_line(exc)}", "install openssh-client",
                     host=host.name)
    if found.returncode != 0:
        return Check("known_hosts", False, f"no entry for {name} in {path}", scan, host=host.name)
    return Check("known_hosts", True, f"{name} found in {path}", host=host.name)


def host_checks(config: Config, host: HostConfig) -> list[Check]:
    """Everything the doctor checks of one host, each line naming it."""
    checks = [check_identity(host), check_known_hosts(host), check_control_dir(config, host),
              *remote_checks(config, host)]
    return [replace(check, host=host.name) for check in checks]


def remote_checks(config: Config, host: HostConfig) -> list[Check]:
    """ssh, the scheduler, our slots and the base dir, each asked once; later checks need ssh."""
    hpc = host.hpc
    remote, timeout = Remote(hpc), hpc.command_timeout_seconds
    target = f"{hpc.user}@{hpc.host}:{hpc.port}"
    try:
        remote.run(["true"], timeout=hpc.connect_timeout_seconds + 10)
    except HostKeyMismatch as exc:
        return [key_check(config, host, exc), *skipped_checks(host, "skipped: the host's key was refused")]
    except (RemoteFailure, OSError) as exc:
        hint = (f"check the host is up and the key is authorized: ssh -i {hpc.identity_file}"
                f" -p {hpc.port} {hpc.user}@{hpc.host} true")
        return [Check("ssh", False, f"{target}: {one_line(exc)}", hint),
                *skipped_checks(host, "skipped: ssh is not reachable")]
    checks = [Check("ssh", True, f"{target} answers")]
    checks += scheduler_of(host).doctor_checks(config, host, remote)
    checks.append(attempt("remote base dir", lambda: probe_base_dir(remote, timeout),
                          f"create {hpc.remote_base_dir} on the HPC and make it writable by {hpc.user}"))
    checks.append(check_transfer(config, host, remote))
    return checks


def skipped_checks(host: HostConfig, why: str) -> list[Check]:
    return [Check(name, False, why) for name in (*scheduler_of(host).check_names, "remote base dir", "transfer")]


def key_check(config: Config, host: HostConfig, exc: HostKeyMismatch) -> Check:
    """ssh refused the host's key: name the key it presents now and how to accept it after checking.
    Nothing here writes known_hosts: accepting a key is the operator's decision."""
    hpc, name = host.hpc, known_host_name(host)
    try:
        seen = "; ".join(presented_host_keys(hpc, timeout=hpc.connect_timeout_seconds)) or "no key"
    except RemoteFailure as scan_error:  # e.g. reached only through a jump host: ssh's own word then
        seen = exc.fingerprint or f"(could not list it: {one_line(scan_error)})"
    what = "no key for it in known_hosts" if exc.unknown else "HOST KEY CHANGED: possible interception"
    known = shlex.quote(str(hpc.known_hosts_file))
    hint = (f"verify that fingerprint with the cluster's admins (never accept it unchecked); if it is theirs:"
            f" ssh-keygen -R {shlex.quote(name)} -f {known} && ssh-keyscan -p {hpc.port} {shlex.quote(hpc.host)}"
            f" >> {known} (compare what it adds); the workers resume by themselves")
    return Check("ssh host key", False, f"{hpc.user}@{hpc.host}:{hpc.port}: {what}; it presents {seen}", hint)


def check_control_dir(config: Config, host: HostConfig) -> Check:
    """The ssh control folder must be a real folder of ours with mode 0700 (created if missing)."""
    path = Remote(host.hpc).control_dir
    try:
        ensure_private_dir(path)
    except UnsafeControlDir as exc:
        return Check("control dir", False, one_line(exc),
                     f"remove {path} (as its owner or root) and let mqic create it, or set"
                     f" {setting(config, host, 'control_dir')}")
    except OSError as exc:
        return Check("control dir", False, one_line(exc),
                     f"set {setting(config, host, 'control_dir')} to a folder we can create")
    return Check("control dir", True, f"{path} is ours, mode 0700")


def check_transfer(config: Config, host: HostConfig, remote: Remote) -> Check:
    """Upload a tiny folder with the configured transfer, exactly as a case goes, then remove it."""
    method = host.hpc.transfer
    name = f".mqic-doctor-{os.getpid()}-{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="mqic-doctor-") as folder:
        Path(folder, "probe.txt").write_text("mqic doctor\n")
        Path(folder, "sub dir").mkdir()
        Path(folder, "sub dir", "probe 2.txt").write_text("mqic doctor\n")
        try:
            result = remote.upload(Path(folder), name, case_id=DOCTOR_CASE_ID)
            remote.run(["rm", "-rf", "--", result.remote_dir])
        except TransferUnsupported as exc:
            return Check("transfer", False, f"{method}: {one_line(exc)}",
                         f'set {setting(config, host, "transfer")}: tar, or {setting(config, host, "scp_command")}:'
                         f' "scp -O"')
        except (RemoteFailure, OSError) as exc:
            return Check("transfer", False, f"{method}: {one_line(exc)}",
                         f"make {method} work from here to the HPC, or set {setting(config, host, 'transfer')}: tar"
                         f" (needs only ssh and tar)")
    return Check("transfer", True, f"{method} upload of {result.files} files verified and removed again")


def probe_base_dir(remote: Remote, timeout: float) -> str:
    base = remote.base_dir()
    remote.run_script(PROBE_SCRIPT, base, timeout=timeout)
    return f"{base} is writable"


def check_database(config: Config) -> Check:
    path = Path(config.database_path)
    if not path.exists():
        return Check("database", True, f"{path} not created yet (the workers create it)")
    try:
        conn = connect(path, readonly=True)
        try:
            damage = queries.quick_check(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Check("database", False, f"{path}: {one_line(exc)}", "stop the workers and restore the newest backup")
    if damage:
        return Check("database", False, f"{path}: {damage}", "stop the workers and restore the newest backup")
    return Check("database", True, f"{path} passes quick_check")


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per check with OK/FAIL and a fix; exit 1 when any fails (2: bad config)."""
    source = args.config or default_config_path()
    try:
        config = load_config(source)
    except ConfigError as exc:
        for problem in str(exc).splitlines():  # one line per problem of the file
            print(Check("config", False, problem, f"edit {source}; every key is described in README.md").line())
        return EXIT_CONFIG
    checks = [Check("config", True, f"{config.source} is valid")]
    checks += [check for host in config.hosts for check in host_checks(config, host)]
    checks += [check_database(config), check_readiness(config)]
    checks += [c for c in (check_notify(config), check_delivery(config)) if c is not None]
    for check in checks:
        print(check.line(), flush=True)
    return 0 if all(c.ok for c in checks) else 1


# -- backup ---------------------------------------------------------------------------------------

def backup_path(folder: Path, now: float, config: Config) -> Path:
    """``backup_YYYYMMDD.db``; ``backup_YYYYMMDD_HHMMSS.db`` (then ``_N``) when that is taken."""
    moment = datetime.fromtimestamp(now, config.tz)
    day, stamp = moment.strftime("%Y%m%d"), moment.strftime("%Y%m%d_%H%M%S")
    candidates = [folder / f"backup_{day}.db", folder / f"backup_{stamp}.db"]
    candidates += (folder / f"backup_{stamp}_{n}.db" for n in range(1, 1000))
    for candidate in candidates:
        if not candidate.exists():
            return candidate
    raise CliError(f"too many backups named backup_{stamp}_N.db in {folder}")


def backup_order(path: Path) -> tuple[str, str, int]:
    day, clock, number = BACKUP_NAME.match(path.name).groups()
    return day, clock or "", int(number or 0)


def prune_backups(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups in ``folder``; return what was deleted."""
    backups = sorted((p for p in folder.iterdir() if BACKUP_NAME.match(p.name)), key=backup_order)
    doomed = backups[:-keep] if keep > 0 else backups
    for path in doomed:
        path.unlink()
    return doomed


def copy_database(source: Path, target: Path) -> None:
    """Copy with SQLite's online backup in one step: a consistent snapshot while workers write.

    The copy is written under a temporary name, integrity-checked, then renamed into place.
    """
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    src = connect(source, readonly=True)
    dst = sqlite3.connect(partial, isolation_level=None)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode = DELETE")  # a self-contained file, no -wal beside it
        rows = [r[0] for r in dst.execute("PRAGMA integrity_check").fetchall()]
    finally:
        dst.close()
        src.close()
    if rows != ["ok"]:
        partial.unlink(missing_ok=True)
        raise CliError(f"backup copy failed its integrity check: {'; '.join(rows[:3])}")
    os.rename(partial, target)


def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    """Back the database up into ``backups/`` (or ``--dest``) and keep the newest ``--keep``."""
    if args.keep < 1:
        raise CliError(f"--keep must be at least 1, got {args.keep}")
    source = Path(config.database_path)
    if not source.exists():
        raise CliError(f"database {source} not found; nothing to back up")
    folder = Path(args.dest) if args.dest else config.root_dir / "backups"
    folder.mkdir(parents=True, exist_ok=True)
    target = backup_path(folder, time.time(), config)
    copy_database(source, target)
    print(target)
    for old in prune_backups(folder, args.keep):
        print(f"{PROGRAM}: removed old backup {old}", file=sys.stderr)
    return 0


# -- sandbox --------------------------------------------------------------------------------------

def cmd_sandbox(args: argparse.Namespace) -> int:
    """Start or stop the local sandbox HPC (sshd + pueue stand-in, or a real Slurm with --slurm)."""
    try:
        from sandbox import hpc  # only here: a production install does not carry the sandbox
    except ModuleNotFoundError as exc:
        if exc.name != "sandbox":
            raise
        raise CliError("the sandbox HPC is not installed (a production install does not carry it); from a "
                       f"checkout: {sys.prefix}/bin/pip install -e ./sandbox (scripts/setup.sh does it)") from None

    root = Path(args.root) if args.root else PROJECT_ROOT / ".sandbox"
    if args.action == "down":
        hpc.down(root)
        print(f"sandbox stopped (files kept in {root.resolve()})")
        return 0
    box_ = hpc.up(root, slurm=args.slurm, second_host=args.second_host)
    kind = " (Slurm)" if args.slurm else ""
    if args.second_host:
        kind += f" and a second host ({args.second_host}, its own sshd)"
    print(f"sandbox HPC{kind} is up: ssh {box_.endpoint.user}@{box_.endpoint.host} -p {box_.endpoint.port}")
    print(f"config: {box_.config_path}")
    print("next:")
    print(f"  export MQIC_CONFIG={shlex.quote(str(box_.config_path))}")
    print("  supervisord -c supervisord.conf")
    print(f"  drop case folders into {box_.root / 'incoming'} and watch them with mqic-top")
    return 0


# -- service --------------------------------------------------------------------------------------

def service_user(args: argparse.Namespace) -> str | None:
    """Who the system service runs as: --as, else whoever ran sudo, else the project folder's owner."""
    if args.user_mode:
        return None
    name = args.as_user or os.environ.get("SUDO_USER") or pwd.getpwuid(PROJECT_ROOT.stat().st_uid).pw_name
    try:
        service.check_user(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return name


def cmd_service(config: Config, args: argparse.Namespace) -> int:
    """Install the systemd units (supervisord at boot, a daily backup), or say how they stand."""
    if args.action == "status":
        print("\n".join(service.status_lines(PROJECT_ROOT, args.user_mode)))
        return 0
    install = service.Install(project=PROJECT_ROOT, venv=Path(sys.prefix), config=config.source.resolve(),
                              user=service_user(args), keep=args.keep)
    folder = Path(args.unit_dir) if args.unit_dir else service.unit_dir(args.user_mode)
    try:
        written = service.write_units(install, folder)
    except PermissionError as exc:
        raise CliError(f"cannot write the units into {folder} ({exc.strerror}): run as root, or use --user") from None
    for path in written:
        print(f"wrote {path}")
    print("next:\n" + "\n".join(f"  {step}" for step in service.next_steps(args.user_mode, install.user)))
    return 0


# -- entry point ----------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text}")
    return value


class VersionAction(argparse.Action):
    """``mqic --version``: the release and the schema of the code and of the configured database."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and the database schema, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            database = load_config(namespace.config or default_config_path()).database_path
        except ConfigError:
            database = None
        print(version.describe(database))
        parser.exit()


def add_sandbox_parser(sub) -> None:
    """``mqic sandbox``: the sandbox names the schedulers it starts (pueue's stand-in, a real Slurm)."""
    sandbox = sub.add_parser("sandbox", help="start or stop the local sandbox HPC")
    sandbox.add_argument("action", choices=("up", "down"))
    sandbox.add_argument("--root", help="sandbox folder (default: .sandbox in the project)")
    sandbox.add_argument("--slurm", action="store_true",
                         help="up: a real single-node Slurm instead of the pueue stand-in (needs root)")
    sandbox.add_argument("--second-host", choices=("pueue", "slurm"),
                         help="up: a second host beside the first (own sshd), in a config with a hosts: list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="MQI Communicator operator commands")
    config_argument(parser)
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="totals per status, GPU slots, health summary")
    status.add_argument("--json", action="store_true")
    cases = sub.add_parser("cases", help="list the newest cases")
    cases.add_argument("--status", choices=queries.STATUSES)
    cases.add_argument("--limit", type=positive_int, default=50)
    cases.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one case with its history and remote task")
    show.add_argument("case_id", type=int)
    show.add_argument("--json", action="store_true")
    retry = sub.add_parser("retry", help="send a failed case (or every failed one) back to the queue")
    retry.add_argument("case_id", type=int, nargs="?")
    retry.add_argument("--all-failed", action="store_true", help="every failed case")
    retry.add_argument("--outcome", choices=[o.value for o in Outcome], help="only failed cases with this outcome")
    for name, text in (("cancel", "stop a submitted or running case"),
                       ("ack", "clear a case's review flag; acknowledge a failed case")):
        sub.add_parser(name, help=text).add_argument("case_id", type=int)
    priority = sub.add_parser("priority", help="make a waiting case urgent or normal")
    priority.add_argument("case_id", type=int)
    priority.add_argument("priority", choices=PRIORITIES)
    drain = sub.add_parser("drain", help="stop new claims on a host (maintenance); running cases finish")
    resume = sub.add_parser("resume", help="start claims on a host again after a drain")
    for command in (drain, resume):
        command.add_argument("host", nargs="?", help="the configured host name (may be left out with one host)")
        command.add_argument("--host", dest="host_option", metavar="HOST", help="the same, as an option")
    drain.add_argument("--reason", help="shown with the drain, e.g. 'GPU driver update'")
    cleanup = sub.add_parser("cleanup", help="apply the retention rules now")
    cleanup.add_argument("--dry-run", action="store_true", help="only show what would be removed and what is kept")
    health = sub.add_parser("health", help="exit 0 when healthy, 1 otherwise")
    health.add_argument("--json", action="store_true")
    sub.add_parser("doctor", help="check config, keys, ssh, each host's scheduler, and the remote folder")
    backup = sub.add_parser("backup", help="consistent copy of the database, with retention")
    backup.add_argument("--dest", help="folder for the copies (default: backups/ in the project)")
    backup.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="how many copies to keep (14)")
    add_sandbox_parser(sub)
    svc = sub.add_parser("service", help="install systemd units (start at boot, daily backup) or show them")
    svc.add_argument("action", choices=("install", "status"))
    svc.add_argument("--user", dest="user_mode", action="store_true",
                     help="units of the calling account (~/.config/systemd/user) instead of the system's")
    svc.add_argument("--as", dest="as_user", metavar="USER",
                     help="system install: the unprivileged account that runs it (default: $SUDO_USER or the "
                          "project folder's owner)")
    svc.add_argument("--keep", type=positive_int, default=DEFAULT_KEEP, help="backups the daily timer keeps (14)")
    svc.add_argument("--unit-dir", help="write the units here instead (to review them first)")
    return parser


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "status": cmd_status, "cases": cmd_cases, "show": cmd_show, "retry": cmd_retry,
    "cancel": cmd_cancel, "ack": cmd_ack, "health": cmd_health, "backup": cmd_backup,
    "priority": cmd_priority, "drain": cmd_drain, "resume": cmd_resume, "cleanup": cmd_cleanup,
    "service": cmd_service,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sandbox":
            return cmd_sandbox(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        config = load_or_exit(args.config, PROGRAM)
        return COMMANDS[args.command](config, args)
    except CliError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
    except sqlite3.Error as exc:
        print(f"{PROGRAM}: database error: {one_line(exc)}", file=sys.stderr)
    except MqicError as exc:
        print(f"{PROGRAM}: {one_line(exc)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
