"""``mqic-top``: a live view of the state database for operators.

Reads through a read-only (``query_only``) connection, one snapshot per refresh,
so it never blocks a worker. A database that is missing or briefly locked shows
as a message in the frame and is tried again at the next refresh. ``--once``
prints a single frame (as wide as ``$COLUMNS``) and exits.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence
from zoneinfo import ZoneInfo

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from shared.eta import Eta, estimate, span
from shared.queries import STATUSES, CaseView, HostView, Overview, host_key_alerts, overview, read_snapshot, share_text
from shared.app import config_argument, load_or_exit
from shared.config import Config
from shared.db import connect
from shared.gpus import GpuView

READ_BUSY_TIMEOUT_MS = 500
STATUS_STYLES = {"submitted": "cyan", "submitting": "blue", "running": "yellow",
                 "completed": "green", "failed": "red", "available": "green",
                 "assigned": "yellow", "zombie": "red"}


# -- formatting ---------------------------------------------------------------------------------

def format_age(seconds: float | None) -> str:
    """A short duration (``shared.eta.span``), ``-`` for none."""
    return "-" if seconds is None else span(seconds)


def format_time(stamp: float | None, tz: ZoneInfo, *, full: bool = False) -> str:
    """A timestamp in the configured zone (``full`` adds the date and zone name)."""
    if stamp is None:
        return "-"
    moment = datetime.fromtimestamp(stamp, tz)
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z" if full else "%m-%d %H:%M:%S")


def format_eta(eta: Eta | None, now: float, tz: ZoneInfo) -> str:
    """``ends 14:32:10 (in 5m12s)`` or ``starts ~12-08 09:10:00 (in 18h02m)``; the date only when
    it is not today's; ``-`` without an estimate."""
    if eta is None:
        return "-"
    moment, today = datetime.fromtimestamp(eta.at, tz), datetime.fromtimestamp(now, tz)
    clock = moment.strftime("%H:%M:%S" if moment.date() == today.date() else "%m-%d %H:%M:%S")
    prefix = "ends " if eta.kind == "finish" else "starts ~"
    return f"{prefix}{clock} (in {format_age(eta.at - now)})"


def console_width(default: int = 100) -> int:
    """``$COLUMNS`` when set (so ``COLUMNS=60 mqic-top --once`` fits), else the terminal's."""
    try:
        return max(40, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        return shutil.get_terminal_size((default, 24)).columns


def styled(status: str | None) -> Text:
    return Text(status or "-", style=STATUS_STYLES.get(status or "", ""))


def progress_cell(percent: float | None) -> RenderableType:
    if percent is None:
        return Text("-")
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=100, completed=percent, width=10), Text(f"{percent:3.0f}%"))
    return grid


# -- sections -----------------------------------------------------------------------------------

def header(view: Overview | None, tz: ZoneInfo, now: float) -> Text:
    text = Text("MQI Communicator  ", style="bold")
    text.append(format_time(now, tz, full=True))
    if view is not None:
        text.append("  ")
        text.append("HEALTHY" if view.health.healthy else "UNHEALTHY",
                    style="bold green" if view.health.healthy else "bold red")
    return text


def totals_line(view: Overview) -> Text:
    """``submitted 3  submitting 1  running 2  completed 9  failed 1  (total 16)``."""
    text = Text("cases: ")
    for status in STATUSES:
        text.append(status, style=STATUS_STYLES[status])
        text.append(f" {view.totals[status]}  ")
    text.append(f"(total {sum(view.totals.values())})")
    return text


def upkeep_line(view: Overview, tz: ZoneInfo) -> Text | None:
    """Urgent cases waiting, results awaiting delivery and notices; None when there is nothing to say.

    Drains are on the host lines (``host_lines``)."""
    kept = view.upkeep
    parts: list[Text] = []
    if kept.urgent_waiting:
        parts.append(Text(f"urgent waiting {kept.urgent_waiting}", style="bold red"))
    if kept.share is not None:
        parts.append(Text(share_text(kept.share, view.now), style="bold red"))
    if kept.awaiting_delivery:
        text = Text(f"results awaiting delivery {kept.awaiting_delivery}")
        if kept.delivery_failing:
            text.append(f", {kept.delivery_failing} FAILING: {kept.delivery_error}", style="bold red")
        parts.append(text)
    if kept.notices_pending:
        parts.append(Text(f"notices unsent {kept.notices_pending}"
                          + (f" ({kept.notices_failing} failed, retrying)" if kept.notices_failing else "")))
    return Text("\n").join(parts) if parts else None


def host_line(host: HostView, now: float, tz: ZoneInfo) -> Text:
    """``host gpu1 (pueue, root@10.0.0.5): reachable at …; seats 1/2 in use, 1 running`` (and a drain)."""
    text = Text("host ")
    text.append(host.name or "(unnamed)", style="bold")
    text.append(f" ({host.backend}, {host.address}): " if host.configured else " (not configured any more): ")
    remote = host.remote
    if remote.reachable is None:
        text.append("no contact recorded yet")
    elif remote.reachable:
        text.append("reachable", style="green")
        text.append(f" at {format_time(remote.checked_at, tz)}")
    else:
        since = remote.down_since if remote.down_since is not None else remote.checked_at
        text.append("HOST KEY REFUSED" if remote.key_refused else "UNREACHABLE", style="bold red")
        text.append(f" since {format_time(since, tz)} ({format_age(now - since)})")
        text.append(f": {remote.error}" if remote.error else "")
    text.append(f"; seats {host.in_use}/{host.seats} in use, {host.running} running")
    if host.drain is not None:
        drain = host.drain
        why = f" ({drain.reason})" if drain.reason else ""
        text.append(f"\n  DRAINED {host.name} since {format_time(drain.since, tz)} by {drain.drained_by}{why}:"
                    f" no new claims there (`mqic resume {host.name}`)", style="bold yellow")
    return text


def host_lines(view: Overview, tz: ZoneInfo) -> Text:
    """One line per host: how it is reached, whether it answered, its seats and its drain."""
    if not view.hosts:
        return Text("hosts: none recorded yet")
    return Text("\n").join(host_line(host, view.now, tz) for host in view.hosts)


def slots_table(view: Overview, tz: ZoneInfo) -> Table:
    table = Table(title="GPU slots", box=box.SIMPLE_HEAD, title_justify="left", expand=False)
    for name in ("host", "group", "seat", "gpu", "state", "case", "task", "for"):
        table.add_column(name, overflow="fold")
    for slot in view.slots:
        case = f"{slot.case_id} {slot.case_name}" if slot.case_id is not None else "-"
        table.add_row(slot.host, slot.group, str(slot.seat), slot.gpu or "-", styled(slot.status), case,
                      "-" if slot.task_id is None else str(slot.task_id),
                      format_age(view.now - slot.since))
    if not view.slots:
        table.add_row("(no slots yet: the workers create them from the configured slots)", *[""] * 7)
    return table


def gpu_who(gpu: GpuView, names: dict[int, str]) -> Text:
    """Whose work is on the GPU: our case(s), someone else's process, or that it does not answer."""
    if not gpu.answering:
        return Text(f"NOT ANSWERING: {gpu.error or '?'}; no new case", style="bold red")
    text = Text(", ".join(f"case {i} {names.get(i, '')}".rstrip() for i in gpu.case_ids))
    if gpu.foreign_processes:
        text.append("; " if gpu.case_ids else "")
        text.append(f"someone else's process ({gpu.foreign_processes})"
                    + ("; no new case" if gpu.blocks_claims else ""), style="bold yellow")
    return text if text.plain else Text("-")


def gpu_memory(gpu: GpuView) -> str:
    if gpu.memory_used_mb is None:
        return "-"
    total = f"/{gpu.memory_total_mb / 1024:.1f}" if gpu.memory_total_mb else ""
    return f"{gpu.memory_used_mb / 1024:.1f}{total} GiB"


def gpus_table(view: Overview, interval: float) -> Table:
    """One row per GPU from nvidia-smi: utilization bar, memory, temperature, whose work, reading age."""
    table = Table(title="GPUs (nvidia-smi)", box=box.SIMPLE_HEAD, title_justify="left", expand=False)
    for name in ("host", "gpu", "utilization", "memory", "temp", "on it", "read"):
        table.add_column(name, overflow="fold", no_wrap=name == "utilization")
    names = {slot.case_id: slot.case_name for slot in view.slots if slot.case_id is not None}
    for gpu in view.gpus:
        age = Text(f"{format_age(gpu.age(view.now))} ago",
                   style="bold red" if gpu.stale(view.now, interval) else "")
        if gpu.stale(view.now, interval):
            age.append(" STALE")
        temp = "-" if gpu.temperature is None else f"{gpu.temperature:.0f}C"
        table.add_row(gpu.host, str(gpu.index), progress_cell(gpu.utilization if gpu.answering else None),
                      gpu_memory(gpu), temp, gpu_who(gpu, names), age)
    return table


def cases_table(title: str, cases: Sequence[CaseView], view: Overview, tz: ZoneInfo,
                etas: dict[int, Eta] | None = None) -> Table:
    """The cases with their progress and, for running and waiting ones, their ETA (``etas``)."""
    etas = etas or {}
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("name", overflow="fold", max_width=30)
    table.add_column("status")
    table.add_column("host", overflow="fold")
    table.add_column("progress", no_wrap=True)
    table.add_column("updated", overflow="fold")
    table.add_column("eta", overflow="fold")
    for case in cases:
        name = Text(case.case_name)
        if case.priority == "urgent":
            name.append(" URGENT", style="bold red")
        table.add_row(str(case.case_id), name, styled(case.status), case.host or "-", progress_cell(case.progress),
                      f"{format_age(view.now - case.updated_at)} ago",
                      format_eta(etas.get(case.case_id), view.now, tz))
    if not cases:
        table.add_row("", "(none)", "", "", "", "", "")
    return table


def review_table(view: Overview) -> Table:
    table = Table(title=f"Review ({len(view.flagged)} flagged; `mqic ack ID` clears)",
                  box=box.SIMPLE_HEAD, title_justify="left", title_style="bold red")
    table.add_column("id", justify="right")
    table.add_column("name", overflow="fold", max_width=24)
    table.add_column("status")
    table.add_column("reason", overflow="fold")
    for case in view.flagged:
        table.add_row(str(case.case_id), case.case_name, styled(case.status), case.review_reason or "-")
    return table


def workers_table(view: Overview, tz: ZoneInfo) -> Table:
    table = Table(title="Workers", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("worker", "pid", "heartbeat", "state"):
        table.add_column(name, overflow="fold")
    for worker in view.workers:
        table.add_row(worker.name, str(worker.pid), f"{format_age(view.now - worker.heartbeat)} ago",
                      Text("alive", style="green") if worker.alive else Text("STALE", style="bold red"))
    if not view.workers:
        table.add_row("(no heartbeat yet)", "", "", "")
    return table


def freshness(view: Overview, tz: ZoneInfo) -> Text:
    text = Text("last DB change: ")
    if view.last_change is None:
        text.append("never")
    else:
        text.append(f"{format_age(view.now - view.last_change)} ago ({format_time(view.last_change, tz)})")
    text.append("  ")
    text.append("healthy" if view.health.healthy else "unhealthy",
                style="green" if view.health.healthy else "bold red")
    for reason in view.health.reasons:
        text.append(f"\n  ! {reason}", style="red")
    return text


def render(view: Overview | None, config: Config, now: float, message: str | None = None,
           etas: dict[int, Eta] | None = None) -> RenderableType:
    """One frame; ``message`` (e.g. the database is locked) is shown above the last good data;
    ``etas`` (``shared.eta.estimate``) fill the cases' eta column."""
    tz = config.tz
    parts: list[RenderableType] = [header(view, tz, now)]
    if view is not None:
        parts += [Text(alert, style="bold red") for alert in host_key_alerts(view.hosts)]
    if message:
        parts.append(Text(f"! {message}", style="bold yellow"))
    if view is None:
        return Group(*parts)
    if message:
        parts.append(Text(f"(showing data read at {format_time(view.now, tz)})", style="dim"))
    parts.append(totals_line(view))
    upkeep = upkeep_line(view, tz)
    if upkeep is not None:
        parts.append(upkeep)
    parts += [host_lines(view, tz), slots_table(view, tz)]
    if view.gpus:
        parts.append(gpus_table(view, config.gpus.interval_seconds))
    parts.append(cases_table("Recent cases", view.recent, view, tz, etas))
    if view.flagged:
        parts.append(review_table(view))
    parts += [workers_table(view, tz), freshness(view, tz)]
    return Group(*parts)


# -- reading --------------------------------------------------------------------------------------

class Reader:
    """Holds one read-only connection and reopens it after any database error."""

    def __init__(self, config: Config, recent: int = 10):
        self.config, self.recent = config, recent
        self.conn: sqlite3.Connection | None = None
        self.last: Overview | None = None
        self.etas: dict[int, Eta] = {}

    def read(self, now: float) -> tuple[Overview | None, str | None]:
        """(newest overview or the last good one, a message when this read failed)."""
        path = Path(self.config.database_path)
        try:
            if self.conn is None:
                if not path.exists():
                    return self.last, f"database {path} not found (workers not started yet?); retrying"
                self.conn = connect(path, readonly=True, busy_timeout_ms=READ_BUSY_TIMEOUT_MS)
            with read_snapshot(self.conn):  # the ETAs see the same state as the frame
                self.last = overview(self.conn, now, self.config.unhealthy_after_seconds, recent=self.recent,
                                     configured=self.config.hosts)
                self.etas = estimate(self.conn, self.config, now)
            return self.last, None
        except sqlite3.Error as exc:
            self.close()
            return self.last, f"database unavailable ({exc}); retrying"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_live(reader: Reader, console: Console, interval: float) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while not stop.is_set():
                now = time.time()
                view, message = reader.read(now)
                live.update(render(view, reader.config, now, message, reader.etas), refresh=True)
                stop.wait(interval)
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqic-top", description="live view of MQI Communicator")
    config_argument(parser)
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--recent", type=int, default=10, help="how many recent cases to show")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_or_exit(args.config, "mqic-top")
    console = Console(width=console_width(), highlight=False)
    reader = Reader(config, recent=max(1, args.recent))
    if not args.once:
        return run_live(reader, console, max(0.2, args.interval))
    now = time.time()
    view, message = reader.read(now)
    reader.close()
    console.print(render(view, config, now, message, reader.etas))
    return 0 if message is None else 1


if __name__ == "__main__":
    sys.exit(main())
