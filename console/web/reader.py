"""What the pages show, read from the database through the read model of ``mqic-top`` (``shared.queries``).

Every read opens a read-only connection (``mode=ro`` + ``query_only``), so this program can
never write the database by reading it. ``Cache`` shares one answer per key for
``web.cache_seconds``: twenty browsers polling every two seconds cost one query set per second.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from console.cli import host_notes
from shared import queries
from shared.config import Config
from shared.db import connect
from shared.spool import STAGE_OF_STATUS
from shared.states import CaseStatus

from shared import eta as eta_model
from shared import plots as plot_model

READ_BUSY_TIMEOUT_MS = 2000
RECENT = 15
FLAGS = 20
HEALTH_CHECK_SECONDS = 60.0  # PRAGMA quick_check reads the whole file: at most once a minute


class Cache:
    """One computed value per key, shared by every request for ``ttl`` seconds."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic, size: int = 256):
        self.ttl, self.clock, self.size = ttl, clock, size
        self.lock = threading.RLock()  # a cached value may be built from another cached value
        self.entries: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        # Computing under the lock is the point: concurrent pollers wait for one query set.
        with self.lock:
            now = self.clock()
            hit = self.entries.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
            value = compute()
            if len(self.entries) >= self.size:
                self.entries.pop(min(self.entries, key=lambda k: self.entries[k][0]))
            self.entries[key] = (now, value)
            return value

    def clear(self) -> None:
        """Forget every value (after an action, so the next page shows its effect)."""
        with self.lock:
            self.entries.clear()


@dataclass(frozen=True)
class Attention:
    """One thing an operator should look at, most urgent kinds first."""
    kind: str  # host_down, host_key, drained, delivery, review, health, notices
    text: str
    case_id: int | None = None
    host: str | None = None
    since: float | None = None  # shown in the configured time zone after the text


class Reader:
    """The read side of the web program: each method opens, reads and closes one connection."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config, self.clock = config, clock
        self.cache = Cache(config.web.cache_seconds)
        self.checked: tuple[float, str | None] | None = None

    def connection(self) -> sqlite3.Connection:
        path = Path(self.config.database_path)
        if not path.exists():
            raise sqlite3.OperationalError(f"database {path} not found (the workers create it when they start)")
        return connect(path, readonly=True, busy_timeout_ms=READ_BUSY_TIMEOUT_MS)

    def read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self.connection()
        try:
            with queries.read_snapshot(conn):
                return work(conn)
        finally:
            conn.close()

    # -- overview -------------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        return self.cache.get("overview", self._overview)

    def _overview(self) -> dict[str, Any]:
        now = self.clock()

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            view = queries.overview(conn, now, self.config.unhealthy_after_seconds, recent=RECENT, flags=FLAGS,
                                    configured=self.config.hosts)
            return {"view": view, "etas": eta_model.estimate(conn, self.config, now), "attention": attention(view),
                    "gpu_interval": self.config.gpus.interval_seconds}
        return self.read(work)

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``mqic health --json`` says (the integrity check at most once a minute)."""
        data = self.overview()
        view: queries.Overview = data["view"]
        damage = self.integrity()
        reasons = list(view.health.reasons) + ([f"database integrity: {damage}"] if damage else [])
        return queries.health_record(reasons, host_notes(view, self.config), view.hosts)

    def integrity(self) -> str | None:
        now = self.clock()
        if self.checked is None or now - self.checked[0] > HEALTH_CHECK_SECONDS:
            self.checked = (now, self.read(queries.quick_check))
        return self.checked[1]

    # -- cases ----------------------------------------------------------------------------------

    def cases(self, wanted: queries.CaseFilter) -> queries.CasePage:
        return self.read(lambda conn: queries.search_cases(conn, wanted))

    def case(self, case_id: int) -> dict[str, Any] | None:
        return self.cache.get(("case", case_id), lambda: self._case(case_id))

    def _case(self, case_id: int) -> dict[str, Any] | None:
        now = self.clock()

        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            case = queries.find_case(conn, case_id)
            if case is None:
                return None
            events = queries.events_of(conn, case_id)
            etas = eta_model.estimate(conn, self.config, now) if case.status.value in queries.ACTIVE_STATUSES else {}
            return {"case": case, "events": events, "eta": etas.get(case_id), "attempts": attempts(events),
                    "checksums": checksums(case.result_checksums), "folders": self.folders(case), "now": now}
        return self.read(work)

    def folders(self, case: Any) -> dict[str, str | None]:
        stage = STAGE_OF_STATUS[CaseStatus(case.status)]
        return {"spool": str(Path(self.config.spool_path) / stage / case.folder_name),
                "remote": f"{case.host}:{case.remote_dir}" if case.remote_dir else None,
                "delivered_to": case.delivered_to}

    # -- plots ----------------------------------------------------------------------------------

    def plots(self) -> list[tuple[str, str]]:
        """(name, SVG) of each plot."""
        return self.cache.get("plots", self._plots)

    def _plots(self) -> list[tuple[str, str]]:
        now, tz, p = self.clock(), self.config.tz, plot_model
        month = now - 30 * 86400

        def labelled(points: list[tuple[float, int]], fmt: str) -> list[tuple[str, float]]:
            return [(datetime.fromtimestamp(start, tz).strftime(fmt), float(n)) for start, n in points]

        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return [  # hourly buckets start on the hour in UTC: in a zone offset by :30 that is :30 there
                ("per_hour", p.bar_chart_svg(labelled(p.completed_per_hour(conn, now), "%H:%M"),
                                             title="Cases completed per hour (last 24 h)", unit="cases")),
                ("per_day", p.bar_chart_svg(labelled(p.completed_per_day(conn, now, tz), "%m-%d"),
                                            title="Cases completed per day (last 30 days)", unit="cases")),
                ("turnaround", p.histogram_svg([s / 60 for s in p.turnaround_seconds(conn, month)], bins=20,
                                               title="Drop to completed (last 30 days)", unit="min")),
                ("gpu_wait", p.histogram_svg([s / 60 for s in p.gpu_wait_seconds(conn, month)], bins=20,
                                             title="Waiting for a GPU (last 30 days)", unit="min")),
                ("gpu_busy", p.share_bars_svg(p.gpu_busy_share(conn, now, 86400),
                                              title="GPU busy share per host (last 24 h)")),
            ]
        return self.read(work)


def attention(view: queries.Overview) -> list[Attention]:
    """What needs an operator, most urgent first: down hosts, host-key problems, failing deliveries,
    unhealthy reasons, review flags, drained hosts, notices that fail."""
    items: list[Attention] = []
    for host in view.hosts:
        remote = host.remote
        if remote.reachable is False:
            since = remote.down_since if remote.down_since is not None else remote.checked_at
            if remote.key_refused:
                items.append(Attention("host_key", f"HOST KEY CHANGED on host {host.name}: possible interception; "
                                                   f"nothing is sent there (mqic doctor shows the key it presents)",
                                       host=host.name, since=since))
            else:
                items.append(Attention("host_down", f"host {host.name} unreachable ({remote.error or 'no answer'})",
                                       host=host.name, since=since))
    kept = view.upkeep
    if kept.delivery_failing:
        items.append(Attention("delivery", f"results delivery failing for {kept.delivery_failing} cases: "
                                           f"{kept.delivery_error}"))
    items += [Attention("health", reason) for reason in view.health.reasons if "delivery" not in reason]
    items += [Attention("review", f"case {c.case_id} {c.case_name}: {c.review_reason or 'needs review'}",
                        case_id=c.case_id) for c in view.flagged]
    for host in view.hosts:
        if host.drain is not None:
            d = host.drain
            items.append(Attention("drained", f"host {host.name} drained by {d.drained_by}"
                                              + (f" ({d.reason})" if d.reason else ""), host=host.name, since=d.since))
    if kept.notices_failing:
        items.append(Attention("notices", f"{kept.notices_failing} notices could not be sent (retried)"))
    items += gpu_attention(view)
    return items


def gpu_attention(view: queries.Overview) -> list[Attention]:
    """GPUs that do not answer, and GPUs kept from new cases by someone else's process."""
    items = []
    for gpu in view.gpus:
        if not gpu.answering:
            items.append(Attention("gpu", f"host {gpu.host} GPU {gpu.index} does not answer ({gpu.error or '?'}): "
                                          f"no new case on it", host=gpu.host))
        elif gpu.blocks_claims:
            items.append(Attention("gpu", f"host {gpu.host} GPU {gpu.index} has someone else's process "
                                          f"({gpu.foreign_processes}): no new case on it", host=gpu.host))
    return items


def attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim (submitted -> submitting) begins an attempt; what became of it is the next move
    out of it that is not running (or running itself while it still runs)."""
    found: list[dict[str, Any]] = []
    for event in events:
        if event["from_status"] == "submitted" and event["to_status"] == "submitting":
            found.append({"number": len(found) + 1, "claimed_at": event["at"], "by": event["worker"],
                          "task": None, "ended": None, "result": "in progress"})
        elif found and event["to_status"] == "running" and event["from_status"] == "submitting":
            found[-1]["task"] = event["detail"]
        elif found and found[-1]["ended"] is None and event["to_status"] in ("completed", "failed", "submitted"):
            found[-1].update(ended=event["at"], result=f"{event['to_status']}: {event['detail']}")
    return found


def checksums(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    try:
        return sorted(json.loads(text).items())
    except (ValueError, AttributeError):
        return [("(unreadable)", text)]
