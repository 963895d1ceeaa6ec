"""exporter: Prometheus metrics computed from the state database at every scrape.

Nothing is counted in the workers: every value comes from the database when
Prometheus asks, so all processes agree and a restart loses nothing. Counters
that must only grow (failures, phase durations) are read from the append-only
``case_events`` table; the exporter remembers how far it has read (a cache it
rebuilds from event 0 when it starts) so a scrape only reads the new events.

Served on ``metrics.host:metrics.port`` (``/metrics``); SIGTERM exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from shared import queries
from shared.app import config_argument, load_or_exit
from shared.config import Config
from shared.db import connect
from shared.gpus import GpuView, gpu_views
from shared.logs import for_case, setup_logging
from shared.settings import counters
from shared.states import SlotStatus

BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
           28800.0, 86400.0)
PHASES = ("upload", "queue_wait", "run")
UTILIZATION_WINDOW_SECONDS = 3600.0
SCRAPE_BUSY_TIMEOUT_MS = 2000
REMOTE_HELP = "1 when the workers' newest call to the host did not get through (host_reach)"
SEAT_STATES = tuple(s.value for s in SlotStatus)
MIB = 1024 * 1024
NO_HOST = "(none)"  # the label of a running case without a host (none should exist)

log = logging.getLogger("mqic.exporter")


@dataclass
class Histogram:
    """Observed durations: counts per bucket (the last one is +Inf) and their sum."""
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
        self.counts[index] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count <= le), ..., ("+Inf", all)]`` as Prometheus wants the buckets."""
        running, buckets = 0, []
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class Tally:
    """What the events up to ``cursor`` add up to; only grows while the database does."""
    cursor: int = 0
    failed: int = 0
    phases: dict[str, Histogram] = field(default_factory=lambda: {p: Histogram() for p in PHASES})

    def advance(self, conn: sqlite3.Connection, upto: int) -> None:
        """Add the events ``cursor < event_id <= upto`` (all read before any is counted)."""
        failed = queries.moves_into(conn, "failed", self.cursor, upto)
        samples = queries.phase_samples(conn, self.cursor, upto)
        self.failed += failed
        for sample in samples:
            self.phases[sample.phase].observe(sample.seconds)
        self.cursor = upto


class DbCollector:
    """A prometheus_client collector that reads the database on each ``collect()``."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config, self.clock = config, clock
        self.tally = Tally()
        self.lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            try:
                conn = connect(Path(self.config.database_path), readonly=True,
                               busy_timeout_ms=SCRAPE_BUSY_TIMEOUT_MS)
            except sqlite3.Error as exc:
                return self._down(exc)
            try:
                return [self._up(1), *self._families(conn, self.clock())]
            except sqlite3.Error as exc:
                return self._down(exc)
            finally:
                conn.close()

    def _down(self, exc: Exception) -> list[Metric]:
        log.warning("scrape could not read the database: %s", exc, extra=for_case(None, "scrape", exc))
        return [self._up(0)]

    @staticmethod
    def _up(value: int) -> Metric:
        return GaugeMetricFamily("mqi_database_up", "1 when the exporter could read the state database", value=value)

    def _families(self, conn: sqlite3.Connection, now: float) -> list[Metric]:
        stale_after = self.config.unhealthy_after_seconds
        with queries.read_snapshot(conn):
            totals = queries.status_totals(conn)
            newest = queries.newest_event_id(conn)
            if newest < self.tally.cursor:  # the database was replaced (restored): count again
                self.tally = Tally()
            self.tally.advance(conn, newest)
            busy = queries.slot_busy_seconds(conn, now, UTILIZATION_WINDOW_SECONDS)
            seen = queries.workers(conn, now, stale_after)
            last = queries.last_db_change(conn)
            hosts = queries.hosts(conn, self.config.hosts)
            seats = queries.slots(conn)
            kept = queries.upkeep(conn)
            counts = counters(conn)
            waiting = queries.waiting_by_priority(conn)
            gpu_list = gpu_views(conn)
        return [*gpu_families(gpu_list, now), *case_families(totals, self.tally), phase_family(self.tally),
                *host_families(hosts, seats, busy, totals["running"]), *upkeep_families(kept, counts, waiting),
                labelled_gauge("mqi_worker_up", "1 when the worker's heartbeat is fresh", "worker",
                               {w.name: float(w.alive) for w in seen}),
                GaugeMetricFamily("mqi_last_db_update_age_seconds",
                                  "Seconds since a case last changed (status, progress or event)",
                                  value=float("nan") if last is None else max(0.0, now - last))]


def case_families(totals: dict[str, int], tally: Tally) -> list[Metric]:
    return [
        CounterMetricFamily("mqi_cases_received", "Cases registered", value=sum(totals.values())),
        CounterMetricFamily("mqi_cases_completed", "Cases completed", value=totals["completed"]),
        CounterMetricFamily("mqi_cases_failed", "Moves of a case into failed (a retried case that"
                            " fails again counts twice)", value=tally.failed),
        labelled_gauge("mqi_cases_by_status", "Cases per lifecycle status", "status",
                       {status: float(count) for status, count in totals.items()}),
    ]


def host_families(hosts: list[queries.HostView], seats: list[queries.SlotView],
                  busy: dict[tuple[str, str], float], all_running: int) -> list[Metric]:
    """Per host: running cases, reachability, drain; per slot: its seats by state and its GPU use."""
    running = {h.name: float(h.running) for h in hosts}
    if all_running > sum(h.running for h in hosts):
        running[NO_HOST] = float(all_running - sum(h.running for h in hosts))
    by_state = {(s.host, s.group, state): 0.0 for s in seats for state in SEAT_STATES}
    for seat in seats:
        by_state[(seat.host, seat.group, seat.status)] += 1.0
    return [
        labelled_gauge("mqi_active_jobs", "Cases running on the host", "host", running),
        labelled_gauge("mqi_remote_unreachable", REMOTE_HELP, "host",
                       {h.name: float(h.remote.reachable is False) for h in hosts}),
        labelled_gauge("mqi_drained", "1 while the host is drained (no new claims there)", "host",
                       {h.name: float(h.drained) for h in hosts}),
        gauge_by("mqi_slots", "Seats of each slot (host, group) by state", ("host", "group", "status"), by_state),
        gauge_by("mqi_slot_assigned_percent",
                 f"Share of the last {UTILIZATION_WINDOW_SECONDS:g} s each slot had a case assigned"
                 " (not what the GPU did: see mqi_gpu_utilization_percent)",
                 ("host", "group"), {slot: 100.0 * s / UTILIZATION_WINDOW_SECONDS for slot, s in busy.items()}),
    ]


def gpu_families(views: list[GpuView], now: float) -> list[Metric]:
    """Per GPU, from its newest nvidia-smi reading; a value the GPU did not report (or a GPU that does
    not answer) is left out rather than shown as 0."""
    def per_gpu(value) -> dict[tuple[str, str], float]:
        return {(v.host, str(v.index)): float(value(v)) for v in views if v.answering and value(v) is not None}
    labels = ("host", "gpu")
    return [
        gauge_by("mqi_gpu_utilization_percent", "GPU utilization reported by nvidia-smi", labels,
                 per_gpu(lambda v: v.utilization)),
        gauge_by("mqi_gpu_memory_used_bytes", "GPU memory in use (nvidia-smi)", labels,
                 per_gpu(lambda v: None if v.memory_used_mb is None else v.memory_used_mb * MIB)),
        gauge_by("mqi_gpu_memory_total_bytes", "GPU memory (nvidia-smi)", labels,
                 per_gpu(lambda v: None if v.memory_total_mb is None else v.memory_total_mb * MIB)),
        gauge_by("mqi_gpu_temperature_celsius", "GPU temperature (nvidia-smi)", labels,
                 per_gpu(lambda v: v.temperature)),
        gauge_by("mqi_gpu_foreign_processes", "Processes on the GPU that are not our cases' (over"
                 " gpus.foreign_memory_mb)", labels, per_gpu(lambda v: v.foreign_processes)),
        gauge_by("mqi_gpu_answering", "0 when the GPU does not answer (lost, driver failure): its seats get"
                 " no new case", labels, {(v.host, str(v.index)): float(v.answering) for v in views}),
        gauge_by("mqi_gpu_reading_age_seconds", "Seconds since the GPU's newest reading (grows while the host"
                 " is unreachable or nvidia-smi hangs)", labels,
                 {(v.host, str(v.index)): max(0.0, now - v.seen_at) for v in views}),
    ]


def upkeep_families(kept: queries.Upkeep, counts: dict[str, int], waiting: dict[str, int]) -> list[Metric]:
    """Priorities, results delivery, clean-up and notices."""
    return [
        labelled_gauge("mqi_cases_waiting", "Submitted cases waiting for a GPU, by priority", "priority",
                       {p: float(n) for p, n in waiting.items()}),
        CounterMetricFamily("mqi_results_delivered", "Cases whose results were delivered to results.deliver_to",
                            value=counts.get("results_delivered", 0)),
        CounterMetricFamily("mqi_results_delivery_failures", "Failed delivery attempts (each is retried)",
                            value=counts.get("delivery_failures", 0)),
        GaugeMetricFamily("mqi_results_awaiting_delivery", "Completed cases whose results are not delivered yet",
                          value=kept.awaiting_delivery),
        GaugeMetricFamily("mqi_results_delivery_failing", "Completed cases whose last delivery attempt failed",
                          value=kept.delivery_failing),
        labelled_counter("mqi_retention_removed", "Case folders removed by the retention rules", "where",
                         {"remote": counts.get("retention_remote_removed", 0),
                          "local": counts.get("retention_local_removed", 0)}),
        labelled_counter("mqi_notices", "Notifier runs by result (a failed one is retried)", "result",
                         {"sent": counts.get("notices_sent", 0), "failed": counts.get("notices_failed", 0)}),
        GaugeMetricFamily("mqi_notices_unsent", "Notices not sent yet (waiting or being retried)",
                          value=kept.notices_pending),
        GaugeMetricFamily("mqi_share_up", "0 while the results share is recorded as not answering or not mounted"
                          " (results.share_state), else 1", value=0.0 if kept.share is not None else 1.0),
    ]


def labelled_counter(name: str, documentation: str, label: str, values: dict[str, float]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def phase_family(tally: Tally) -> Metric:
    family = HistogramMetricFamily(
        "mqi_task_execution_duration_seconds",
        "Duration of each phase: upload (claim -> running), queue_wait (running -> task start),"
        " run (task start -> completed)", labels=["phase"])
    for phase in PHASES:
        histogram = tally.phases[phase]
        family.add_metric([phase], histogram.cumulative(), histogram.total)
    return family


def labelled_gauge(name: str, documentation: str, label: str, values: dict[str, float]) -> Metric:
    return gauge_by(name, documentation, (label,), {(key,): value for key, value in values.items()})


def gauge_by(name: str, documentation: str, labels: tuple[str, ...], values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def build_registry(config: Config) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DbCollector(config))
    return registry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqic-exporter", description="Prometheus metrics of MQI Communicator")
    config_argument(parser)
    parser.add_argument("--host", help="listen address (default: metrics.host)")
    parser.add_argument("--port", type=int, help="listen port (default: metrics.port)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_or_exit(args.config, "mqic-exporter")
    setup_logging(config.logging, "exporter")
    host, port = args.host or config.metrics.host, args.port or config.metrics.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
    server, thread = start_http_server(port, addr=host, registry=build_registry(config))
    log.info("serving metrics on http://%s:%d/metrics", host, port, extra=for_case(None, "serve"))
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
    log.info("exporter stopped", extra=for_case(None, "serve"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
